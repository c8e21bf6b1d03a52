"""Input distributions (the families live in engine/distributions/, one module each)."""

from engine.distributions import (
    Bernoulli,
    Categorical,
    Distribution,
    Gaussian,
    from_json,
    register,
    registered,
)

__all__ = ["Distribution", "Categorical", "Bernoulli", "Gaussian", "register", "registered", "from_json"]
