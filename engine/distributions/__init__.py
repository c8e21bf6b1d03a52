"""Input distributions, one family per module; `register` plugs in a family defined elsewhere."""

from engine.distributions.base import Distribution, from_json, register, registered
from engine.distributions.bernoulli import Bernoulli
from engine.distributions.categorical import Categorical
from engine.distributions.gaussian import Gaussian

__all__ = ["Distribution", "Categorical", "Bernoulli", "Gaussian", "register", "registered", "from_json"]
