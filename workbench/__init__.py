"""Circuit Workbench: per-session state (`workbench.state`), shared services (`workbench.services`)
and Panel views (`workbench.views`). State and services import no panel; see workbench/API.md."""
