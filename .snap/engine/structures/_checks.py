"""Argument checks shared by the structure builders (each raises a ValueError naming the argument)."""

from __future__ import annotations

from engine.dists import Distribution


def positive_int(name: str, value, minimum: int = 1) -> int:
    """`value` as an int, or ValueError if it is not an integer >= `minimum`."""
    if isinstance(value, bool) or int(value) != value:
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if int(value) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_dist(dist, builder: str) -> Distribution:
    """`dist` if it is an engine distribution instance, else a ValueError saying what to pass."""
    if dist is None:
        raise ValueError(f"{builder} needs input_dist=, e.g. engine.dists.Categorical(num_cats=256)")
    if not isinstance(dist, Distribution):
        raise ValueError(
            f"input_dist must be an engine.dists Distribution instance (e.g. Categorical(num_cats=2)), "
            f"got {type(dist).__name__}"
        )
    return dist


def check_block_size(block_size, num_latents: int) -> int | None:
    """None, or a block size that divides `num_latents`."""
    if block_size is None:
        return None
    bs = positive_int("block_size", block_size)
    if num_latents % bs:
        raise ValueError(f"block_size {bs} does not divide num_latents {num_latents}")
    return bs
