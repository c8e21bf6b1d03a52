"""The distribution base class and the registry of families by name.

A family is one subclass in one file (see categorical.py): its PyTorch log-probability, flow-weighted
statistics, EM update, sampling and mode, and the Triton device functions the input kernels call.
Every method is vectorised over an *input layer*: all input nodes of one family, with
`params: [n, num_params]`, the observed value of each node's variable `xv: [n, B]` and a boolean
`miss: [n, B]` (True = marginalised: the node's value is log 1 = 0).

`@register` makes a family loadable by name (`from_json`, the .cw reader), also from outside the
engine: a family defined in any module plugs in once that module is imported.
"""

from __future__ import annotations

import importlib

import torch

_REGISTRY: dict[str, type[Distribution]] = {}


def register(cls: type[Distribution]) -> type[Distribution]:
    """Class decorator: make `cls` loadable by its `name` (names are unique)."""
    old = _REGISTRY.get(cls.name)
    if old is not None and old.__qualname__ != cls.__qualname__:
        raise ValueError(f"distribution name {cls.name!r} is already taken by {old.__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def registered() -> dict[str, type[Distribution]]:
    """Family name -> class, for every registered family."""
    return dict(_REGISTRY)


def from_json(d: dict) -> Distribution:
    """Rebuild a distribution from `to_json()` output; unknown names raise ValueError. An engine
    family not imported yet is found by its file name (engine/distributions/<name>.py)."""
    name = d.get("name")
    if name not in _REGISTRY and isinstance(name, str) and name.isidentifier():
        try:
            importlib.import_module(f"engine.distributions.{name}")
        except ModuleNotFoundError:
            pass
    cls = _REGISTRY.get(name)
    if cls is None:
        raise ValueError(f"unknown input distribution {d.get('name')!r}")
    return cls.from_json(d)


class Distribution:
    """Base class; a subclass defines one univariate family.

    Kernel hooks (None / False: the Triton backend runs the PyTorch methods instead):
    - `kernel_log_prob(prm, n64, nm, xv, P, C) -> [BN, BB]`: a `@triton.jit` device function; `prm`
      the layer's params (row stride P), `n64: [BN]` node ids, `nm` their mask, `xv: [BN, BB]` the
      observed values (int32 if `discrete`, else float32), C = `kernel_constant()`.
    - `kernel_stats_tile(prm, n64, nm, P, xv, miss, f) -> (a0, a1, a2)`: `[BN]` increments of the
      (at most 3) statistics from one batch tile with flows `f: [BN, BB]`.
    - `kernel_stats` / `kernel_em_update`: launchers a family overrides for a specialised kernel.
    """

    name = "abstract"
    num_params = 0
    num_stats = 0
    discrete = True
    fixed = False  # True: nothing to learn (EM leaves it alone; not counted as a learnable parameter)
    kernel_log_prob = None
    kernel_stats_tile = None
    # the constructor's arguments, kept as attributes of the same names: they tell two instances of
    # the family apart (`key`) and are what `to_json` saves and `from_json` passes back
    config: tuple[str, ...] = ()

    def _config(self) -> dict:
        return {k: getattr(self, k) for k in self.config}

    def key(self) -> tuple:
        """Input nodes whose distributions share a key are executed in one layer."""
        return (self.name, *self._config().values())

    def to_json(self) -> dict:
        return {"name": self.name, **self._config()}

    @classmethod
    def from_json(cls, d: dict) -> Distribution:
        return cls(**{k: d[k] for k in cls.config if k in d})

    def init_params(self, n: int) -> torch.Tensor:
        raise NotImplementedError

    def check_params(self, params: torch.Tensor) -> None:
        if not torch.isfinite(params).all():
            raise ValueError(f"{self.name} params must be finite")

    def check_data(self, column: torch.Tensor, var: int) -> None:
        """Raise ValueError naming `var` if an observed value is outside the support."""
        if not torch.isfinite(column.double()).all():
            raise ValueError(f"variable {var}: data contains NaN or inf")

    def log_prob(self, params, xv, miss) -> torch.Tensor:
        """`[n, B]` log-probabilities (densities for continuous families), 0 where `miss`."""
        raise NotImplementedError

    def accumulate_stats(self, stats, params, xv, miss, flows) -> None:
        """stats: [n, num_stats] += the flow-weighted sufficient statistics of this batch.

        Row-local: node i's row reads only row i of params, xv, miss and flows, so the executor may
        call it on a slice of the nodes (early statistics, engine/circuit.py)."""
        raise NotImplementedError

    def em_update(self, params, stats, step_size: float, pseudocount: float) -> torch.Tensor:
        """New params `[n, num_params]`: (1 - step) * old + step * the M-step from `stats`; row-local
        like `accumulate_stats` (data-parallel EM updates the rows whose statistics arrived first)."""
        raise NotImplementedError

    def sample(self, params) -> torch.Tensor:
        raise NotImplementedError

    def mode(self, params) -> tuple[torch.Tensor, torch.Tensor]:
        """Most likely value of each node and its log-probability (density for continuous)."""
        raise NotImplementedError

    def value_probs(self, params) -> torch.Tensor:
        """`[n, K]` probability of each value 0..K-1 (discrete families; used by `conditional`)."""
        raise ValueError(f"{self.name} has no finite value table")

    # ------------------------------------------------------------------ Triton hooks
    def kernel_constant(self) -> int:
        """The integer C handed to `kernel_log_prob` (e.g. the number of categories)."""
        return 0

    def kernel_stats(self, stats, params, vars_, xt, mt, flows, segments, opts) -> bool:
        """Add this batch's statistics through a kernel; False when the family has none."""
        if self.kernel_stats_tile is None or self.num_stats > 3:
            return False
        from engine.kernels.inputs import tile_stats

        tile_stats(self, stats, params, vars_, xt, mt, flows, opts)
        return True

    def kernel_em_update(self, params, stats, step_size: float, pseudocount: float, opts) -> bool:
        """In-place EM update through a kernel; False (nothing done) when the family has none."""
        return False
