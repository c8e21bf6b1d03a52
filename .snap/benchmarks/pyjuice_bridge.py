"""The same circuit, with the same parameters, in PyJuice 2.6.3: for equal-work benchmarks.

    import pyjuice as juice
    from benchmarks.pyjuice_bridge import to_pyjuice, max_ll_gap, make_optimizer, record_graphs, tutorial_epoch

    root = engine.structures.hclt(train, 16, input_dist=Categorical(256))
    ours = engine.compile(root, device="cuda")            # compile BEFORE training: both start from
    pj = juice.compile(to_pyjuice(root, juice)).to("cuda")  # the params stored in the node vectors
    print(max_ll_gap(ours, pj, x))                        # nats; fp32 on both sides by default
    opt = make_optimizer(juice, pj, step_size=0.1, pseudocount=0.1)
    record_graphs(pj, batches[0])                         # the tutorial's dry run (CUDA graphs)
    ll_sum = tutorial_epoch(pj, opt, batches)             # the tutorial's loop, one sync at the end

What `to_pyjuice` builds (facts from PyJuice 2.6.3's source, `src/pyjuice/...`):

- One PyJuice node vector per vector of ours, after the same normalisation our compiler does
  (`engine/compiler/ir.py`): products of products are flattened (PyJuice's `multiply` only takes sum
  or input children, `nodes/construction.py`); a sum over a sum or an input gets an identity product
  (PyJuice's `summate` only takes product or input children and wraps inputs itself,
  `SumNodes._standardize_chs` in `nodes/sum_nodes.py`); a root that is not a one-node sum gets a
  one-child sum on top, as `engine.compiler.ir.wrap_root` does.
- Sum parameters: PyJuice keeps `ns._params: [num_block_edges, block_size, ch_block_size]`, entry
  `[e, i, j]` = weight from node `i` of node block `edge_ids[0, e]` to node `j` of child block
  `edge_ids[1, e]` (`SumNodes.set_params`, dim-3 branch; `get_params(as_matrix=True)` shows the
  layout). Ours are `[E, bs, bs]` with the same meaning (`engine/executor/tensors.py` reads tile
  `[e, parent, child]`). PyJuice blocks are `block_size` parent nodes by `ch_block_size` child nodes
  (the children's block size, equal for all children), so our `bs x bs` tiles are re-cut into PyJuice
  tiles; every PyJuice tile must be made of real edges only (a padded zero would get pseudocount in
  EM), which the block-size choice below guarantees.
- Block sizes: PyJuice needs powers of two (`CircuitNodes.__init__`, `nodes/nodes.py`), a product and
  all its children share one block size (`multiply` asserts it; `ProdNodes.block_size =
  chs[0].block_size`), and all children of a sum share one block size (`SumNodes.__init__`). So the
  vectors fall into classes that must share a block size (a product with its factors; the children
  of one sum). Each class starts at `block_size` (argument) or at the smallest power of two dividing
  its members' own block sizes, and is halved until every sum's PyJuice tiles are fully covered by
  our edges. A product whose node-level wiring is not aligned to its class block size is passed with
  `sparse_edges=True` (node-level `edge_ids`, `ProdNodes.SPARSE`), which PyJuice's product layer
  supports (`layer/prod_layer.py`).
- Input parameters: PyJuice stores one flat vector per input vector (`InputNodes.set_params`):
  Categorical `num_cats` probabilities per node, node-major (`Categorical.fw_mar_fn` reads
  `params[s_pids + x]`); Bernoulli one number per node, p(x=1) (`Bernoulli.fw_mar_fn`); Gaussian
  `(mu, sigma)` per node (`Gaussian.fw_mar_fn`). Ours have the same meaning per row. Params are set
  with `normalize=False`: `Categorical.normalize_parameters` divides *in place* through a view (it
  would rewrite our tensor if passed without a copy) and would re-round already normalised values.
- `juice.compile` copies node params into `pc.params` (`TensorCircuit._init_parameters`,
  `model/tensorcircuit.py`: `ns.gather_parameters`) and then renormalises every sum node with
  pseudocount 0 (`_normalize_parameters`), so PyJuice's starting sum weights equal ours up to float32
  rounding of that division; input params are copied as they are (`InputLayer._init_parameters`).
- PyJuice's compiler *mutates the node graph*: a sum whose child product sits at a lower depth than
  the sum gets a pass-through sum + product inserted (`TensorCircuit._create_node_layers`), with
  identity weights (so log-likelihoods are unchanged). PD circuits have such sums (splits of one box
  into halves of different sizes have different depths). Those identity sums are trainable in
  PyJuice: with `pseudocount > 0` and `keep_zero_params=False` (the tutorial's default) EM moves
  pseudocount mass onto their zero off-diagonal weights, which our engine (no pass-through nodes)
  never does. `make_optimizer(..., keep_zero_params=True)` keeps them exact; for circuits whose own
  weights are all positive it changes nothing else (`model/backend/par_update.py`: with all weights
  > 0 both branches compute `(flow + pc/nch) / (sum flow + pc)`). `passthrough_sums(pc)` counts them.
- A sum child that no block edge reaches (our PD's sparse mixtures leave some splits unconnected
  when a sum has a single node block, e.g. PD-16) is left out of the PyJuice sum, together with what
  is reachable only through it: PyJuice 2.6.3 back-propagates stale scratch values through such a
  child (see `_drop_dangling`). Values and EM of everything else are unchanged; PyJuice then does
  not compute the unreachable part at all (ours does, at no effect on the log-likelihood).

Nothing in `engine/` imports this module or PyJuice; it is only used by `benchmarks/`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from engine.dists import Bernoulli, Categorical, Gaussian
from engine.nodes import InputNodes, NodeVector, ProdNodes, SumNodes

__all__ = [
    "to_pyjuice",
    "max_ll_gap",
    "make_optimizer",
    "record_graphs",
    "tutorial_epoch",
    "pj_lls",
    "passthrough_sums",
    "BridgeInfo",
]


# ----------------------------------------------------------------------------- normalised graph
@dataclass(eq=False)
class _Prod:
    """A PyJuice product vector: `factors[k] = (sum or input vector, node index [num_nodes])`."""

    key: tuple
    num_nodes: int
    factors: list


@dataclass
class BridgeInfo:
    """What `to_pyjuice(..., return_info=True)` also returns (for reports and tests)."""

    block_sizes: dict = field(default_factory=dict)  # ("v" / "p" / "i", our uid) -> PyJuice block size
    sparse_products: int = 0  # products passed with node-level (sparse) edges
    num_products: int = 0
    num_sums: int = 0
    num_inputs: int = 0
    reduced: list = field(default_factory=list)  # (uid, kind, our bs, PyJuice bs) where they differ
    dangling_children: int = 0  # sum children without any edge, left out (see _drop_dangling)
    partly_dangling: int = 0  # sum children with some blocks unreached (kept; PyJuice may misflow)


def _pow2_divisor(n: int) -> int:
    return n & -n  # largest power of two dividing n (n >= 1)


def _wrap_root(root: NodeVector) -> SumNodes:
    if root.num_nodes != 1:
        raise ValueError(f"the root vector must have exactly one node, got {root.num_nodes}")
    if isinstance(root, SumNodes):
        return root
    return SumNodes([root], 1, block_size=1, params=torch.ones(1, 1, 1))


def _flatten(p: ProdNodes, memo: dict) -> _Prod:
    """Products of products -> one product over sums/inputs (as engine.compiler.ir does)."""
    if p.uid in memo:
        return memo[p.uid]
    edges = p.node_edges()  # [num_nodes, num_children]: node index inside each child
    factors = []
    for k, c in enumerate(p.children):
        if isinstance(c, ProdNodes):
            inner = _flatten(c, memo)
            factors.extend((v, idx[edges[:, k]]) for v, idx in inner.factors)
        else:
            factors.append((c, edges[:, k].astype(np.int64)))
    out = _Prod(("p", p.uid), p.num_nodes, factors)
    memo[p.uid] = out
    return out


class _UnionFind:
    def __init__(self):
        self.parent = {}

    def find(self, a):
        self.parent.setdefault(a, a)
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:  # path compression
            self.parent[a], a = root, self.parent[a]
        return root

    def union(self, a, b):
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra


# ----------------------------------------------------------------------------- sum tiles
def _retile(s: SumNodes, P: int, C: int, check_only: bool = False):
    """Our `[E, bs, bs]` tiles of `s` re-cut into PyJuice `[E', P, C]` tiles.

    Returns `(edge_ids [2, E'] long, params [E', P, C] float32)`; with `check_only`, whether every
    PyJuice tile touched is made of real edges only (no node pair without an edge in our circuit).
    """
    bs = s.block_size
    gr, gc = math.gcd(P, bs), math.gcd(C, bs)  # a common grain of both tilings
    rr, cc = bs // gr, bs // gc  # grains per our tile along rows / cols
    pr, pc = P // gr, C // gc  # grains per PyJuice tile
    e = s.edge_ids.shape[1]
    ei = torch.as_tensor(s.edge_ids, dtype=torch.long)
    fr = (ei[0][:, None] * rr + torch.arange(rr)[None, :])[:, :, None].expand(e, rr, cc)  # grain row
    fc = (ei[1][:, None] * cc + torch.arange(cc)[None, :])[:, None, :].expand(e, rr, cc)  # grain col
    num_child = sum(c.num_nodes for c in s.children)
    ncols = num_child // C
    tile = (fr // pr) * ncols + (fc // pc)  # PyJuice tile id of every grain
    keys, inv, counts = torch.unique(tile.reshape(-1), return_inverse=True, return_counts=True)
    full = bool((counts == pr * pc).all())
    if check_only:
        return full
    if not full:
        raise AssertionError("PyJuice tiles not covered by our edges (block-size choice is wrong)")
    grains = s.params.reshape(e, rr, gr, cc, gc).permute(0, 1, 3, 2, 4).reshape(-1, gr, gc)
    out = torch.zeros(keys.numel(), pr, pc, gr, gc, dtype=torch.float32)
    out[inv, (fr % pr).reshape(-1), (fc % pc).reshape(-1)] = grains.float()
    params = out.permute(0, 1, 3, 2, 4).reshape(keys.numel(), P, C)
    edge_ids = torch.stack([keys // ncols, keys % ncols])
    return edge_ids, params.contiguous()


# ----------------------------------------------------------------------------- inputs
def _pj_dist(juice, dist):
    if isinstance(dist, Categorical):
        return juice.distributions.Categorical(num_cats=dist.num_cats)
    if isinstance(dist, Bernoulli):
        return juice.distributions.Bernoulli()
    if isinstance(dist, Gaussian):
        # mu / sigma only seed PyJuice's random init, which is never used: params are set below
        return juice.distributions.Gaussian(mu=0.0, sigma=1.0, min_sigma=dist.min_std)
    raise ValueError(f"no PyJuice counterpart for input distribution {dist.name!r}")


def _pj_input_params(v: InputNodes) -> torch.Tensor:
    p = v.params.detach().float().cpu()
    if isinstance(v.dist, Bernoulli):
        p = p[:, :1]  # both store p(x = 1) per node
    return p.reshape(-1).clone().contiguous()  # node-major; a copy: PyJuice may divide in place


# ----------------------------------------------------------------------------- conversion
def _drop_dangling(s: SumNodes, info) -> tuple:
    """`s` without the children that no block edge reaches, and those children.

    PyJuice 2.6.3 mishandles a sum child with no edges: the sum layer's backward never writes that
    product's element flows, so the product layer below propagates whatever an earlier layer left
    in the shared `element_flows` scratch rows to the product's children (observed: wrong parameter
    flows in 42 of 100 sum vectors of a 4x4 PD whose sparse mixtures leave one split unconnected,
    against a float64 autograd reference; ours were right). Such a child contributes nothing to
    `s`, so dropping it changes no value. Children reached only in some of their blocks are kept
    and counted in `info.partly_dangling`.
    """
    bs = s.block_size
    ranges = s.child_block_ranges()
    used = np.zeros(sum(hi - lo for lo, hi in ranges), dtype=bool)
    used[s.edge_ids[1]] = True
    keep = [k for k, (lo, hi) in enumerate(ranges) if used[lo:hi].any()]
    info.partly_dangling += sum(1 for k in keep if not used[ranges[k][0] : ranges[k][1]].all())
    if len(keep) == len(ranges):
        return s, list(s.children)
    info.dangling_children += len(ranges) - len(keep)
    shift = np.zeros(used.size, dtype=np.int64)  # new child-block id of every kept block
    new_start = 0
    for k in keep:
        lo, hi = ranges[k]
        shift[lo:hi] = np.arange(new_start, new_start + hi - lo)
        new_start += hi - lo
    view = copy.copy(s)  # a shallow view for _retile: same params, fewer children
    view.children = [s.children[k] for k in keep]
    view.edge_ids = np.stack([s.edge_ids[0], shift[s.edge_ids[1]]])
    assert all(c.num_nodes % bs == 0 for c in view.children)
    return view, view.children


def to_pyjuice(
    root: NodeVector,
    juice,
    block_size: int | None = None,
    return_info: bool = False,
    drop_dangling: bool = True,
):
    """Build the circuit under `root` in PyJuice (`juice` is the imported `pyjuice` module).

    The result is PyJuice's root node vector, carrying the parameters currently stored in our node
    vectors (so convert before training, or after writing trained params back). `block_size=None`
    keeps our block sizes (reduced to powers of two where PyJuice's rules need it); an int asks for
    that block size everywhere (as PyJuice's own HCLT/PD builders use one), reduced per class where
    the structure does not allow it. `return_info=True` also returns a `BridgeInfo`.

    `drop_dangling=True` leaves out sum children without any edge and what only they reach (see
    `_drop_dangling`: PyJuice 2.6.3's backward is wrong with them in); the distribution is the same,
    but PyJuice then computes fewer products than ours (PD-16 on 28x28: 2,369 of 3,136 products
    remain). `False` keeps the same node vectors in both (equal FLOPs), with PyJuice's wrong flows.
    """
    if block_size is not None and (block_size < 1 or block_size & (block_size - 1)):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    top = _wrap_root(root)
    info = BridgeInfo()
    memo: dict = {}
    sum_children: dict = {}  # sum uid -> [_Prod] of its children that have at least one edge
    sum_view: dict = {}  # sum uid -> the sum with only those children (edge ids renumbered)
    prods: dict = {}  # key -> _Prod
    # walk down from the root through connected children only, so that vectors reachable only
    # through a dangling child are not built (PyJuice would compute them, flows and all, for nothing)
    reached, stack = {top.uid: top}, [top]
    while stack:
        s = stack.pop()
        if not isinstance(s, SumNodes):
            continue
        view, kept = _drop_dangling(s, info) if drop_dangling else (s, list(s.children))
        sum_view[s.uid] = view
        kids = []
        for c in kept:
            if isinstance(c, ProdNodes):
                pr = _flatten(c, memo)
            else:  # identity product over a sum or input child (one per child vector, shared)
                pr = prods.get(("i", c.uid)) or _Prod(
                    ("i", c.uid), c.num_nodes, [(c, np.arange(c.num_nodes))]
                )
            prods.setdefault(pr.key, pr)
            kids.append(pr)
            for f, _ in pr.factors:
                if f.uid not in reached:
                    reached[f.uid] = f
                    stack.append(f)
        sum_children[s.uid] = kids
    order = [v for v in top.topological() if v.uid in reached]  # children before parents
    sums = [v for v in order if isinstance(v, SumNodes)]
    inputs = [v for v in order if isinstance(v, InputNodes)]

    # classes of vectors that must share one PyJuice block size
    by_uid = {v.uid: v for v in top.topological()}
    uf = _UnionFind()
    own_bs: dict = {}  # key -> our block size (a product: its ProdNodes'; an identity: its child's)
    sizes: dict = {}
    for v in order:
        if isinstance(v, (SumNodes, InputNodes)):
            uf.find(("v", v.uid))
            own_bs[("v", v.uid)], sizes[("v", v.uid)] = v.block_size, v.num_nodes
    for pr in prods.values():
        own_bs[pr.key], sizes[pr.key] = by_uid[pr.key[1]].block_size, pr.num_nodes
        for f, _ in pr.factors:
            uf.union(pr.key, ("v", f.uid))
    for s in sums:
        kids = sum_children[s.uid]
        for k in kids[1:]:
            uf.union(kids[0].key, k.key)
    cls_bs: dict = {}
    for key in own_bs:
        b = _pow2_divisor(sizes[key])
        b = min(b, block_size if block_size is not None else _pow2_divisor(own_bs[key]))
        r = uf.find(key)
        cls_bs[r] = min(cls_bs.get(r, b), b)

    # halve classes until every sum's PyJuice tiles are made of real edges only
    checked: dict = {}  # sum uid -> (P, C) found fully covered
    changed = True
    while changed:
        changed = False
        for s in sums:
            rp, rc = uf.find(("v", s.uid)), uf.find(sum_children[s.uid][0].key)
            P, C = cls_bs[rp], cls_bs[rc]
            if checked.get(s.uid) == (P, C):
                continue
            if (s.block_size % P == 0 and s.block_size % C == 0) or _retile(
                sum_view[s.uid], P, C, check_only=True
            ):
                checked[s.uid] = (P, C)
                continue
            if s.block_size % P:  # shrink the side that does not divide our block size
                cls_bs[rp] = P // 2
            else:
                cls_bs[rc] = C // 2
            changed = True

    bs_of = {key: cls_bs[uf.find(key)] for key in own_bs}
    pj: dict = {}  # our uid / product key -> PyJuice node vector

    for v in inputs:
        b = bs_of[("v", v.uid)]
        ns = juice.inputs(v.var, num_node_blocks=v.num_nodes // b, dist=_pj_dist(juice, v.dist), block_size=b)
        ns.set_params(_pj_input_params(v), normalize=False)
        pj[("v", v.uid)] = ns
        info.num_inputs += 1

    def build_prod(pr: _Prod):
        if pr.key in pj:
            return pj[pr.key]
        b = bs_of[pr.key]
        chs = [pj[("v", f.uid)] for f, _ in pr.factors]
        idx = np.stack([i for _, i in pr.factors], axis=1)  # [num_nodes, K]
        blocks = idx.reshape(-1, b, idx.shape[1])
        aligned = bool((blocks[:, 0, :] % b == 0).all()) and bool(
            (blocks == blocks[:, :1, :] + np.arange(b)[None, :, None]).all()
        )
        if aligned:
            ns = juice.multiply(*chs, edge_ids=torch.as_tensor(blocks[:, 0, :] // b, dtype=torch.long))
        else:
            ns = juice.multiply(*chs, edge_ids=torch.as_tensor(idx, dtype=torch.long), sparse_edges=True)
            info.sparse_products += 1
        pj[pr.key] = ns
        info.num_products += 1
        return ns

    for s in sums:  # children before parents
        kids = [build_prod(pr) for pr in sum_children[s.uid]]
        P = bs_of[("v", s.uid)]
        C = bs_of[sum_children[s.uid][0].key]
        assert checked[s.uid] == (P, C)
        eid, prm = _retile(sum_view[s.uid], P, C)
        ns = juice.summate(*kids, num_node_blocks=s.num_nodes // P, edge_ids=eid, block_size=P)
        ns.set_params(prm, normalize=False)
        ns._cw_uid = s.uid  # marks the sums we made (PyJuice's compiler may insert pass-through sums)
        pj[("v", s.uid)] = ns
        info.num_sums += 1

    for key, b in bs_of.items():
        if key[0] == "v" and b != own_bs[key]:
            info.reduced.append((key[1], "vector", own_bs[key], b))
        info.block_sizes[key] = b
    out = pj[("v", top.uid)]
    return (out, info) if return_info else out


# ----------------------------------------------------------------------------- checks
@torch.no_grad()
def pj_lls(
    pj_pc, x: torch.Tensor, batch_size: int | None = None, force_use_fp32: bool = True
) -> torch.Tensor:
    """PyJuice log-likelihoods `[N]` (float32, on PyJuice's device), in chunks of `batch_size`.

    `force_use_fp32=True` turns off PyJuice's default bf16 tiles in the block-sparse sum forward
    (`SumLayer._forward_block_sparse`: bf16 whenever the tiles are >= 16); the call is eager
    (`apply_cudagraph=False`) so that this holds after `record_graphs`. Caution: every batch size
    other than the one PyJuice's CUDA graphs were recorded at re-allocates its buffers, so after
    this call the recorded graphs are no longer replayed (see `record_graphs`).
    """
    dev = pj_pc.device
    n = x.shape[0]
    bsz = batch_size or n
    outs = []
    for i in range(0, n, bsz):
        xb = x[i : i + bsz].to(dev)
        xb = xb if xb.is_floating_point() else xb.long()  # discrete data as long (PyJuice's dtype)
        # eager: a recorded CUDA graph would be replayed whatever `force_use_fp32` says (the graph
        # signature in TensorCircuit.forward is buffers + batch size only, not the precision)
        outs.append(pj_pc(xb, force_use_fp32=force_use_fp32, apply_cudagraph=False)[:, 0].float())
    return torch.cat(outs)


@torch.no_grad()
def max_ll_gap(
    our_pc,
    pj_pc,
    x: torch.Tensor,
    batch_size: int | None = None,
    force_use_fp32: bool = True,
    relative: bool = False,
) -> float:
    """Largest |LL_ours - LL_pyjuice| over the rows of `x` (nats), or that divided by max |LL_ours|.

    Ours run through `our_pc(x)` (its default precision), PyJuice's in fp32 unless
    `force_use_fp32=False` (then PyJuice's default bf16 tiles).
    """
    bsz = batch_size or x.shape[0]
    ours = torch.cat([our_pc(x[i : i + bsz].to(our_pc.device)).float() for i in range(0, x.shape[0], bsz)])
    theirs = pj_lls(pj_pc, x, batch_size, force_use_fp32).to(ours.device)
    gap = (ours.double() - theirs.double()).abs().max()
    if relative:
        gap = gap / ours.double().abs().max().clamp_min(1e-30)
    return float(gap)


def passthrough_sums(pj_pc) -> int:
    """Number of sum vectors in the compiled PyJuice circuit that `to_pyjuice` did not make: the
    pass-through sums PyJuice's compiler inserts (`TensorCircuit._create_node_layers`)."""
    return sum(1 for ns in pj_pc.root_ns if ns.is_sum() and not hasattr(ns, "_cw_uid"))


# ----------------------------------------------------------------------------- the tutorial loop
def make_optimizer(juice, pc, step_size: float, pseudocount: float, keep_zero_params: bool = False):
    """`juice.optim.MiniBatchEM(pc, step_size=..., pseudocount=...)` as the tutorial makes it.

    PyJuice 2.6.3's signature (`optim/mini_batch_em.py`): `MiniBatchEM(pc, step_size=0.1,
    niters_per_update=1, pseudocount=0.0, keep_zero_params=False, ddp=False, ...)`; there is no `lr`.
    Its constructor sets `pc._optim_hyperparams["flows_memory"] = 1.0` (the backward hook accumulates
    flows) and zeroes the flows. `step()` runs `pc.mini_batch_em(step_size, pseudocount,
    keep_zero_params)` and then zeroes the flows; `step(step_size=s)` overrides the step size for one
    update (how PyJuice's own tests run a schedule). See the module docstring on keep_zero_params.
    """
    return juice.optim.MiniBatchEM(
        pc, step_size=step_size, pseudocount=pseudocount, keep_zero_params=keep_zero_params
    )


def record_graphs(pc, x: torch.Tensor, zero_flows: bool = True) -> None:
    """The tutorial's dry run: `lls = pc(x, record_cudagraph=True); lls.mean().backward()`.

    Records one CUDA graph for the inner layers of the forward and one for the backward
    (`TensorCircuit.forward` / `.backward`: 3 eager warm-up runs on a side stream, then capture, then
    one replay), keyed by the batch size and the ids of PyJuice's buffers. Later calls replay them only
    while those buffers are the same tensors: any batch of another size re-allocates `node_mars`,
    `element_mars`, `node_flows`, `element_flows` (`TensorCircuit._init_buffer`), and from then on
    every step runs eagerly (the tutorial's `drop_last=True` avoids this). Needs CUDA.

    The backward's warm-up runs accumulate parameter flows (three warm-ups plus the replay add the
    batch's sum-layer flows four times, the input layers' once) and the tutorial's first
    `optimizer.step()` consumes them; `zero_flows=True` (default) clears them so that EM starts from
    the same state as ours. `zero_flows=False` is the tutorial verbatim.
    """
    lls = pc(x, record_cudagraph=True)
    lls.mean().backward()
    if zero_flows:
        pc.init_param_flows(flows_memory=0.0)


def tutorial_epoch(pc, optimizer, batches, step_size: float | None = None) -> float:
    """One epoch of PyJuice's tutorial mini-batch EM loop; returns the summed log-likelihood (nats).

    Per batch, exactly the tutorial's calls (`examples/01_train_pc.py` at v2.6.3): `lls = pc(x)`,
    `lls.mean().backward()` (the hook runs `pc.backward` with root flows 1 per example and
    accumulates parameter flows), `optimizer.step()` (or `optimizer.step(step_size=step_size)`).
    `batches`: an iterable of `[B, num_vars]` long tensors on PyJuice's device, all of the same size
    `B` (the tutorial's `drop_last=True`; a different size stops CUDA-graph replay, see
    `record_graphs`). The tutorial also calls `lls.mean().item()` per batch; here the sum stays on the
    device and is read once at the end. PyJuice's backward still syncs once per batch by itself
    (`TensorCircuit.backward`: `self._cum_flow += ll_weights.sum().item()`).
    """
    total = None
    for x in batches:
        lls = pc(x)
        lls.mean().backward()
        if step_size is None:
            optimizer.step()
        else:
            optimizer.step(step_size=step_size)
        s = lls.detach().double().sum()
        total = s if total is None else total + s
    return 0.0 if total is None else float(total)
