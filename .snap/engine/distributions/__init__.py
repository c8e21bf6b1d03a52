"""Input distributions, one family per module; `register` plugs in a family defined elsewhere."""

from engine.distributions.base import Distribution, from_json, register, registered
from engine.distributions.bernoulli import Bernoulli
from engine.distributions.binomial import Binomial
from engine.distributions.categorical import Categorical
from engine.distributions.discrete_logistic import DiscreteLogistic
from engine.distributions.gaussian import Gaussian
from engine.distributions.indicator import Indicator

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
