"""The Triton backend: a namespace with the same calls as `circuit.TORCH_BACKEND`, plus input layers
and the EM update, dispatching each partition to the kernel that `select.choose_kernels` named.

`attach(pc, opts)` prepares the per-partition tables the kernels need (child-major CSRs for flows,
sparse edge lists), stores them on the partition objects (so `pc.to(device)` moves them) and
returns the namespace.
"""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace

import torch
from torch.utils.weak import WeakTensorKeyDictionary

from engine.compiler.plan import PAD_ROWS
from engine.executor import torch_ops
from engine.kernels import em, inputs, product, sum_block, sum_sparse
from engine.kernels.options import KernelOptions
from engine.kernels.select import choose_kernels


def _sum_forward(pt, params, element_mars, node_mars, *, opts):
    if pt.kernel == "sum_block":
        sum_block.sum_forward_block(pt, params, element_mars, node_mars, opts)
    elif pt.kernel == "sum_sparse":
        sum_sparse.sum_forward_sparse(pt, params, element_mars, node_mars, opts)
    else:
        torch_ops.sum_forward(pt, params, element_mars, node_mars)


def _sum_backward(pt, params, element_mars, node_mars, node_flows, element_flows, param_flows, *, opts):
    args = (pt, params, element_mars, node_mars, node_flows, element_flows, param_flows)
    if pt.kernel == "sum_block":
        sum_block.sum_backward_block(*args, opts, torch_ops.EXP_CLAMP)
    elif pt.kernel == "sum_sparse":
        sum_sparse.sum_backward_sparse(*args, opts, torch_ops.EXP_CLAMP)
    else:
        torch_ops.sum_backward(*args)


def _prod_forward(pt, node_mars, element_mars, *, opts):
    product.prod_forward(pt, node_mars, element_mars, opts)


def _prod_backward(pt, element_flows, node_flows, *, opts):
    product.prod_backward(pt, element_flows, node_flows, opts)


def _sum_em_update(pt, params, param_flows, mask, step_size, pseudocount, *, opts):
    em.sum_em_update(pt, params, param_flows, mask, step_size, pseudocount, opts)


class _InputKernels:
    """Input layers through the kernels; distributions without a kernel use their PyTorch methods."""

    def __init__(self, opts: KernelOptions):
        self.opts = opts
        # per vars_ tensor object, dropped with it: a data_ptr key was reused by the next circuit's
        # tensor at the same address (the allocator recycles it) and gave it another circuit's segments
        self._segments = WeakTensorKeyDictionary()

    def forward(self, dist, params, vars_, x, missing, out):
        """Writes `out: [N, B]`; returns the cache that `stats` needs."""
        if not inputs.supports(dist):
            xv, miss = x[:, vars_].T, missing[:, vars_].T
            out.copy_(dist.log_prob(params, xv.long() if dist.discrete else xv, miss))
            return ("torch", xv, miss)
        xt, mt = inputs.prepare_data(dist, x, missing)
        inputs.input_forward(dist, params, vars_, xt, mt, out, self.opts)
        return ("triton", xt, mt)

    def stats(self, dist, stats, params, vars_, cache, flows):
        how, a, b = cache
        if how == "torch":
            dist.accumulate_stats(stats, params, a.long() if dist.discrete else a, b, flows)
            return
        segs = self._segments.get(vars_)
        if segs is None:
            segs = tuple(t.to(vars_.device) for t in inputs.segments(vars_, self.opts.input_nodes))
            self._segments[vars_] = segs
        if not inputs.input_stats(dist, stats, params, vars_, a, b, flows, segs, self.opts):
            xv, miss = a[vars_], b[vars_].bool()
            dist.accumulate_stats(stats, params, xv.long() if dist.discrete else xv, miss, flows)


def _input_em_update(dist, params, stats, step_size, pseudocount, *, opts):
    return inputs.input_em_update(dist, params, stats, step_size, pseudocount, opts)


def _overwrites_element_flows(pts) -> bool:
    """True when the layer's one partition writes every element-flow row below it (no zeroing needed)."""
    return len(pts) == 1 and getattr(pts[0], "sole_writer", False)


def make_backend(opts: KernelOptions = KernelOptions()) -> SimpleNamespace:
    ins = _InputKernels(opts)
    return SimpleNamespace(
        name="triton",
        options=opts,
        sum_forward=partial(_sum_forward, opts=opts),
        sum_backward=partial(_sum_backward, opts=opts),
        prod_forward=partial(_prod_forward, opts=opts),
        prod_backward=partial(_prod_backward, opts=opts),
        sum_em_update=partial(_sum_em_update, opts=opts),
        input_forward=ins.forward,
        input_stats=ins.stats,
        input_em_update=partial(_input_em_update, opts=opts),
        overwrites_element_flows=_overwrites_element_flows,
        first_writes_node_flows=True,
    )


TRITON_BACKEND = make_backend()


def _mark_sole_writer(below, pts) -> None:
    """A sum layer of one tiled partition whose child blocks tile the product layer's rows exactly."""
    if len(pts) != 1 or pts[0].kernel != "sum_block" or below.kind != "product":
        return
    pt = pts[0]
    _, lo, hi = below.writes
    cb = pt.cblocks.cpu()
    starts = torch.arange(lo, hi, pt.block_size)
    pt.sole_writer = bool((hi - lo) % pt.block_size == 0 and cb.numel() == starts.numel()
                          and torch.equal(torch.sort(cb).values, starts))


def mark_first_flow_writers(plan, parts, device) -> None:
    """Flag, per child-major row of each product layer, whether it is the first layer of the top-down
    flows pass to reach that node row (it stores; later layers add). Every node row except row 0 and
    the root is some product's child, so node_flows can start uninitialised."""
    seen = torch.zeros(plan.num_node_rows, dtype=torch.bool)
    for layer in sorted((lay for lay in plan.layers if lay.kind == "product" and parts[lay.index]),
                        key=lambda lay: -lay.index):
        first = parts[layer.index][0]
        rows = first.flow_rows.cpu()
        first.flow_first = (~seen[rows]).to(torch.uint8).to(device)
        seen[rows] = True


def prepare_partitions(plan, parts, device) -> None:
    """Attach kernel names and kernel tables to the partition tensors of `parts` (in place)."""
    long = partial(torch.as_tensor, dtype=torch.long, device=device)
    for layer in plan.layers:
        if layer.kind == "product" and parts[layer.index]:
            _prepare_product_layer(parts[layer.index], long)
        for p, pt in zip(layer.partitions, parts[layer.index]):
            pt.kernel = p.kernel
            if layer.kind == "product":
                continue
            elif p.kernel == "sum_block":
                pt.node_rows, pt.child_rows = long(p.node_rows), long(p.child_rows)
                cb, ptr, pi, pk = sum_block.child_major_blocks(pt.child_rows, PAD_ROWS)
                pt.cblocks, pt.cptr, pt.par_i, pt.par_k = long(cb), long(ptr), long(pi), long(pk)
                pt.max_parents = int((ptr[1:] - ptr[:-1]).max()) if len(cb) else 1
            elif p.kernel == "sum_sparse":
                for k, v in sum_sparse.sparse_edges(pt, PAD_ROWS).items():
                    setattr(pt, k, long(v))
        if layer.kind == "sum" and layer.index > 0:
            _mark_sole_writer(plan.layers[layer.index - 1], parts[layer.index])
    mark_first_flow_writers(plan, parts, device)


def _prepare_product_layer(pts, long) -> None:
    """One launch per product layer: the first partition carries the merged tables, the rest skip."""
    elem_rows, child_rows = product.merge_layer(pts)
    crows, table = product.child_major_products(elem_rows, child_rows)
    first = pts[0]
    first.layer_elem_rows, first.layer_child_rows = long(elem_rows), long(child_rows)
    first.flow_rows, first.parent_table = long(crows), long(table)
    for i, pt in enumerate(pts):
        pt.merged_into_first = i > 0


def attach(pc, opts: KernelOptions | None = None) -> SimpleNamespace:
    """Select kernels for `pc.plan`, prepare its partitions, return the backend namespace."""
    choose_kernels(pc.plan, pc.device, "triton")
    prepare_partitions(pc.plan, pc.parts, pc.device)
    return TRITON_BACKEND if opts is None or opts == TRITON_BACKEND.options else make_backend(opts)
