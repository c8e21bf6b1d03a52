"""Input distributions (the families live in engine/distributions/, one module each): this name is kept
for existing imports and re-exports exactly what `engine.distributions` exports."""

from engine.distributions import *  # noqa: F403
from engine.distributions import __all__  # noqa: F401
