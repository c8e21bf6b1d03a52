"""One translator from a template spec (a plain dict) to a circuit, shared by the CLI and the workbench.

    build_template({"template": "hclt", "num_latents": 16}, dataset)       # root NodeVector

A spec is JSON-able so the workbench can store it and send it to a worker; the CLI builds the same
dict from its flags, so the same request gives the same circuit wherever it is made. Keys absent from
a spec take `TEMPLATE_DEFAULTS`; a default of None means "derived from the dataset" (PD's square
grid and split step, RAT-SPN's depth), written out in `_derived`.
"""

from __future__ import annotations

import math

from engine import dists
from engine.nodes import CircuitError, NodeVector

TEMPLATES = ("hclt", "pd", "rat_spn", "hmm")
DIST_NAMES = ("auto", "categorical", "bernoulli", "gaussian")
SPARSE_BLOCK_SIZE = 4  # sum vectors of a sparse template are cut into blocks of at most 4 nodes

# Every key the builders read, with its default.
TEMPLATE_DEFAULTS: dict = {
    "template": "hclt",
    "num_latents": 16,
    "input_dist": "auto",  # see input_dist()
    "num_cats": 2,  # categorical inputs when no dataset decides it
    "num_vars": 16,  # rat_spn without a dataset
    "data_shape": None,  # pd: grid (H, W); None: the square grid of the dataset's variables
    "split_intervals": None,  # pd: split step per axis; None: a quarter of each side
    "max_split_depth": None,  # pd: cap on nested splits (None: no cap)
    "depth": None,  # rat_spn: split levels; None: from the number of variables
    "num_repetitions": 4,  # rat_spn
    "num_pieces": 2,  # rat_spn
    "seq_length": 8,  # hmm without a dataset
    "num_emits": 4,  # hmm without a dataset
    "homogeneous": False,  # hmm: one tied transition / emission set for all steps
    "chow_liu_samples": 20000,  # hclt
    "seed": 0,
    "sum_density": 1.0,  # share of sum block edges kept (< 1: block-sparse, see engine.structures.sparse)
}


def input_dist(name: str, num_cats: int = 2, dataset=None) -> dists.Distribution:
    """Input family by name. "auto" follows the data: Gaussian for continuous, Bernoulli for binary
    (one parameter per node instead of two), Categorical for more categories."""
    if name == "auto":
        if dataset is None:
            return dists.Bernoulli() if int(num_cats) == 2 else dists.Categorical(int(num_cats))
        if dataset.kind == "continuous":
            return dists.Gaussian()
        return dists.Bernoulli() if int(dataset.num_cats) == 2 else dists.Categorical(int(dataset.num_cats))
    if name == "categorical":
        cats = dataset.num_cats if dataset is not None and dataset.num_cats else num_cats
        return dists.Categorical(int(cats))
    if name == "bernoulli":
        if dataset is not None and dataset.num_cats not in (None, 2):
            raise CircuitError(
                f"Bernoulli inputs need binary data; this dataset has {dataset.num_cats} categories"
            )
        return dists.Bernoulli()
    if name == "gaussian":
        return dists.Gaussian()
    raise CircuitError(f"unknown input distribution {name!r}; choose one of {', '.join(DIST_NAMES)}")


def template_vars(spec: dict, dataset=None) -> int:
    """Variables the template will cover: the dataset's, else what the spec says (PD: its grid)."""
    if dataset is not None:
        return int(dataset.num_vars)
    s = {**TEMPLATE_DEFAULTS, **spec}
    if s["template"] == "pd":
        if s["data_shape"] is None:
            raise CircuitError("PD without a dataset needs data_shape, e.g. [8, 8]")
        return math.prod(int(d) for d in s["data_shape"])
    return int(s["seq_length"] if s["template"] == "hmm" else s["num_vars"])


def build_template(spec: dict, dataset=None, device: str = "cpu") -> NodeVector:
    """HCLT, PD, RAT-SPN or HMM from `spec`, block-sparse when `sum_density` < 1.

    `device` only places HCLT's Chow-Liu statistics. Raises CircuitError (a ValueError) naming the
    problem."""
    from engine.structures.sparse import block_sparse

    s = _derived({**TEMPLATE_DEFAULTS, **spec}, dataset)
    root = _dense(s, dataset, device)
    return block_sparse(root, float(s["sum_density"]), SPARSE_BLOCK_SIZE, int(s["seed"]))


def _derived(s: dict, dataset) -> dict:
    """Fill the None defaults that depend on the data."""
    if s["template"] == "pd":
        if s["data_shape"] is None:
            n = _num_vars(s, dataset)
            side = math.isqrt(n)
            if side * side != n:
                raise CircuitError(f"PD needs a grid: {n} variables are not a square; set data_shape")
            s["data_shape"] = [side, side]
        if s["split_intervals"] is None:
            s["split_intervals"] = [max(int(d) // 4, 1) for d in s["data_shape"]]
    if s["template"] == "rat_spn" and s["depth"] is None:
        n = _num_vars(s, dataset)
        s["depth"] = max(1, min(4, int(math.log2(max(n, 2))) - 1))
    return s


def _num_vars(s: dict, dataset) -> int:
    """The dataset's variables, else the spec's `num_vars`."""
    return int(dataset.num_vars) if dataset is not None else int(s["num_vars"])


def _dense(s: dict, dataset, device: str) -> NodeVector:
    from engine import structures

    name, k = s["template"], int(s["num_latents"])
    if name not in TEMPLATES:
        raise CircuitError(f"unknown template {name!r}; choose one of {', '.join(TEMPLATES)}")
    if name == "hmm":
        homogeneous = bool(s["homogeneous"])
        if dataset is None:
            return structures.hmm(int(s["seq_length"]), k, int(s["num_emits"]), homogeneous=homogeneous)
        if dataset.kind == "continuous":
            raise CircuitError("HMM needs discrete observations; this dataset is continuous")
        return structures.hmm(dataset.num_vars, k, int(dataset.num_cats), homogeneous=homogeneous)
    dist = input_dist(s["input_dist"], s["num_cats"], dataset)
    if name == "hclt":
        if dataset is None:
            raise CircuitError("HCLT learns its tree from data: choose a dataset first")
        return structures.hclt(
            dataset.train,
            k,
            input_dist=dist,
            chow_liu_samples=int(s["chow_liu_samples"]),
            seed=int(s["seed"]),
            device=device,
        )
    if name == "pd":
        shape = [int(d) for d in s["data_shape"]]
        if dataset is not None and math.prod(shape) != dataset.num_vars:
            raise CircuitError(
                f"PD data_shape {shape} covers {math.prod(shape)} variables "
                f"but the dataset has {dataset.num_vars}"
            )
        depth = s["max_split_depth"]
        return structures.pd(
            shape,
            k,
            s["split_intervals"],
            input_dist=dist,
            seed=int(s["seed"]),
            max_split_depth=None if depth is None else int(depth),
        )
    nv = _num_vars(s, dataset)
    return structures.rat_spn(
        nv,
        k,
        int(s["depth"]),
        int(s["num_repetitions"]),
        input_dist=dist,
        num_pieces=int(s["num_pieces"]),
        seed=int(s["seed"]),
    )
