"""Input distributions (the families live in engine/distributions/, one module each)."""

from engine.distributions import (
    Bernoulli,
    Binomial,
    Categorical,
    DiscreteLogistic,
    Distribution,
    Gaussian,
    Indicator,
    from_json,
    register,
    registered,
)

__all__ = [
    "Distribution",
    "Bernoulli",
    "Binomial",
    "Categorical",
    "DiscreteLogistic",
    "Gaussian",
    "Indicator",
    "register",
    "registered",
    "from_json",
]
