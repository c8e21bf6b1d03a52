"""Hidden Markov models as circuits (PyJuice's `HMM`), built backwards along the chain.

With emissions `input_t` (`num_latents` categorical leaves over x_t, one per hidden state):

    prod_{T-1} = input_{T-1}
    next_t     = summate(prod_{t+1}, num_nodes=num_latents)   # transition z_t -> z_{t+1}
    prod_t     = multiply(input_t, next_t)
    root       = summate(prod_0, num_nodes=1)                 # initial distribution of z_0

By default emissions and transitions are separate per step (an inhomogeneous HMM); with
`homogeneous=True` (PyJuice's `HMM`) every step's emission vector and transition vector are tied to
the first ones built (`NodeVector.tie_to`), so the learnable parameters do not grow with the length.
"""

from __future__ import annotations

from engine.dists import Categorical, Distribution
from engine.nodes import NodeVector, inputs, multiply, summate
from engine.structures._checks import check_block_size, check_dist, positive_int


def hmm(
    seq_length: int,
    num_latents: int,
    num_emits: int,
    input_dist: Distribution | None = None,
    block_size: int | None = None,
    homogeneous: bool = False,
) -> NodeVector:
    """HMM over `seq_length` observations (variable t = step t) with `num_emits` symbols; returns the root.

    `input_dist` defaults to `Categorical(num_cats=num_emits)`; `block_size` goes to the transition
    sum vectors. `homogeneous`: one emission and one transition parameter set shared by all steps
    (tied); otherwise one per step. The initial distribution (the root) is never shared.
    """
    seq_length = positive_int("seq_length", seq_length)
    num_latents = positive_int("num_latents", num_latents)
    num_emits = positive_int("num_emits", num_emits, minimum=2)
    dist = Categorical(num_cats=num_emits) if input_dist is None else check_dist(input_dist, "hmm")
    bs = check_block_size(block_size, num_latents)
    if not isinstance(homogeneous, bool):
        raise ValueError(f"homogeneous must be True or False, got {homogeneous!r}")
    emit = inputs(seq_length - 1, num_latents, dist)
    prod: NodeVector = emit
    trans = None
    for t in range(seq_length - 2, -1, -1):
        tie_t = trans if homogeneous else None
        trans = summate(prod, num_nodes=num_latents, block_size=bs, tie_to=tie_t)
        prod = multiply(inputs(t, num_latents, dist, tie_to=emit if homogeneous else None), trans)
    return summate(prod, num_nodes=1)
