"""Entry file: `panel serve apps/workbench.py` (from the repository root)."""

import sys
from pathlib import Path

# This file is named like the `workbench` package and its folder is put on sys.path by `panel serve`:
# drop that folder (and any half-imported copy of this file) so `import workbench` finds the package,
# and put the repository root first so a plain checkout works without `pip install -e .`.
HERE, ROOT = Path(__file__).resolve().parent, Path(__file__).resolve().parent.parent
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() not in (HERE, ROOT)]
if "workbench" in sys.modules and not hasattr(sys.modules["workbench"], "__path__"):
    del sys.modules["workbench"]

from workbench.app import create_app  # noqa: E402
from workbench.offline import pin_local_resources  # noqa: E402

pin_local_resources()  # before any model exists: no stylesheet URL ever points at a CDN
create_app().servable(title="Circuit Workbench")
