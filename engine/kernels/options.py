"""Kernel options (a frozen, hashable dataclass: the cache key of a compiled variant) and thresholds.

`precision` selects how the tile matmuls run on the tensor cores:
- "tf32x3" (default): each float32 operand split into a high and a low tf32 part, three MMAs;
  float32-level accuracy (measured relative error ~1e-6 to 1e-7, see benchmarks/README.md). The
  categorical statistics kernel meets an exact 0/1 one-hot, so `stats_split` runs two MMAs there
  (each flow within 2^-21 relative, truncated toward zero; engine/distributions/categorical.py).
- "ieee": plain float32 FMA, no tensor cores; the slowest, the exact float32 reference.
- "tf32" / "bf16": opt-in, one MMA per product instead of three, less accurate (errors reported by
  benchmarks/check_kernels_gpu.py; bf16's epoch times against PyJuice are in benchmarks/README.md,
  round 3: 2.05-3.41x, LLs within 0.05% of the default's).
"""

from __future__ import annotations

from dataclasses import dataclass

PRECISIONS = ("tf32x3", "ieee", "tf32", "bf16")

# tl.dot needs every dimension >= 16: smaller node blocks run the sparse (per-node) kernels.
MIN_DOT_BLOCK = 16
FWD_ROWS = (1, 2, 4)  # node blocks per program of the row-grouped forward, node scale and parameter flows
ELEM_SETS = (0, 1, 2, 4, 8, 16)  # child blocks per program of the parent-set element-flow kernel (0: off)


@dataclass(frozen=True)
class KernelOptions:
    """Variant selection for all kernels of one compiled circuit (hashable: a cache key)."""

    precision: str = "tf32x3"
    block_b: int = 32  # batch columns per program: node scale, parameter flows, product, input and sparse
    # sum kernels (32 from an H200 A/B, benchmarks/README.md round 3)
    num_warps: int = 4
    prod_rows: int = 32  # product rows per program
    sparse_children: int = 32  # children per step in the sparse sum kernel
    input_nodes: int = 32  # input nodes per program of the generic input kernels
    # input forward by variable segments: programs of `input_rows` nodes of one variable walking
    # `input_cols` batch columns, `input_block_b` at a time (False: `input_nodes` nodes a program).
    # A/B on an H200 2026-12-01 (results/kernel_breakdown_h200_input_fwd_*.json; Categorical, run then
    # as the family's own kernel with the same loads), input forward ms
    # generic -> segments: HCLT-128 0.276 -> 0.165, PD-128 0.274 -> 0.162, HCLT-256 0.545 -> 0.321,
    # PD-256 0.546 -> 0.317 (graph step -0.11 to -0.27 ms)
    input_fwd: bool = True
    input_rows: int = 16
    input_block_b: int = 64
    input_cols: int = 256  # batch columns per program of the segment forward (it loops over them)
    group_cols: int = 64  # child columns per tl.dot step in the block sum kernels (G = group_cols // bs)
    fwd_block_b: int = 128  # largest batch tile of the block sum forward (smaller for small partitions)
    # node blocks with equal child lists per program of the block sum forward (sum_block.row_groups):
    # each child tile read and exponentiated once for all of them, one dot of R * bs rows. Two shapes,
    # each from an A/B on an H200 (sum forward ms, off -> grouped):
    # - block size 32 is ruled by fwd_rows_32 below; any other block size >= fwd_rows_min_block:
    #   fwd_rows blocks, batch tiles of at most fwd_rows_block_b.
    #   2026-12-01 (results/kernel_breakdown_h200_fwd_rows_*.json): 2 x 64 rows at 64 columns,
    #   HCLT-256 (bs 64) 2.46 -> 1.94 (step 8.49 -> 8.01), HCLT-128 0.81 -> 0.78
    # - block size 32 (PD): fwd_rows_32 blocks at fwd_rows_32_block_b columns. 2026-12-01 05:28
    #   (results/kernel_breakdown_h200_pd_rows_*.json): 4 x 32 rows at 32 columns, PD-128 1.59 -> 1.42
    #   (step 7.91 -> 7.74), PD-256 5.58 -> 4.82 (24.51 -> 23.81); at 64 columns no gain (1.64, 5.55),
    #   2 rows at 64 or 128 columns slower (PD-256 9.1-18.9)
    fwd_rows: int = 2
    fwd_rows_min_block: int = 64
    fwd_rows_block_b: int = 64
    fwd_rows_32: int = 4
    fwd_rows_32_block_b: int = 32
    # the node scale and parameter flows by row groups too (sum_block.flow_rows), in partitions of
    # block size flow_rows_min_block..flow_rows_max_block: one node-scale max per group, so the
    # parameter flows exponentiate each child tile once for the group's blocks (1: off). Same call:
    # parameter flows PD-128 1.34 -> 1.20 (step 7.91 -> 7.77), PD-256 4.70 -> 3.93 (24.51 -> 23.81);
    # 4 rows less (1.24, 4.02). At HCLT's block size 64 slower (results/kernel_breakdown_h200_
    # flow_rows64_*.json: step HCLT-128 3.43 -> 3.64, HCLT-256 7.99 -> 8.12), so not there. The price:
    # a node whose `log f - v` lies ~87 below its group's max (not its block's) has its scale underflow
    # to 0 in float32, so the group widens the range a block of 32 already had to 64 rows
    flow_rows: int = 2
    flow_rows_min_block: int = 32
    flow_rows_max_block: int = 32
    elem_block_b: int = 64  # batch columns per program of the block element-flow kernel
    # element flows *parent-set-major* (sum_block._sum_bwd_elem_sets_kernel): child blocks with the same
    # parent node blocks (PD: a region's products under its sums) share one program per `elem_sets` of
    # them, which reads the parents' scale tiles once; 0: child-major (one program per child block).
    # A/B on an H200 2026-11-30 (results/kernel_breakdown_h200_elem_sets*.json), graph step ms 0 -> 4:
    # PD-128 9.03 -> 8.01, PD-64 3.61 -> 3.12, PD-32 1.64 -> 1.50, HCLT-128 3.76 -> 3.56, HCLT-32
    # 1.52 -> 1.48; HCLT-256 8.77 / 8.74 and PD-256 25.96 / 26.05 (their sets exceed elem_set_max_rows)
    elem_sets: int = 4
    # child blocks per program for sets wider than elem_set_max_rows (run as launches over slices of the
    # parents, below): the wider slab is read once for more children. A/B on an H200 2026-12-01 05:41
    # (results/kernel_breakdown_h200_pd_opts_*.json): PD-256 (bs 32, 8 parents) element flows 7.98 ->
    # 7.44 ms, step 23.14 -> 22.60 with 8; PD-128 (4 parents, one launch) 7.58 either way
    elem_sets_wide: int = 8
    # tf32x3 in that kernel: the register-held parents' slab split into its tf32 hi / lo parts once per
    # program instead of inside every child block's dot (the same three MMAs, sum_block._tf32_split)
    elem_split_once: bool = True
    elem_set_rows: int = 32  # child rows per tl.dot step of that kernel (child blocks per step: rows // bs)
    elem_set_max_rows: int = 128  # only parent sets of at most this many rows (P * bs) run it
    elem_set_slab: int = 8192  # its batch tile is cut so the parents' slab [P * bs, BB] holds at most this
    # wider sets of partitions with block size <= elem_set_split run it too, in launches of at most
    # elem_set_max_rows parent rows (0: never). A/B on two H200s (results/kernel_breakdown_h200_ab3{a,b}.json, where
    # `elem_set_split=1` split every block size, i.e. 64 today):
    # PD-256 (bs 32, 8 parents) 25.93 -> 24.79 ms a step; HCLT-256 / 512 (bs 64, whose child-major
    # kernel runs 64-row dots as fast as their forward) 8.70 -> 8.99 and 25.41 -> 25.76, so not there
    elem_set_split: int = 32
    # categorical statistics kernel; defaults from benchmarks/stats_kernel_sweep.py on an H200
    # (2026-11-30: 0.77 ms against 1.63 for the previous 32 nodes x 256 categories, tf32x3, at HCLT-256)
    stats_block_b: int = 32  # batch columns per step
    stats_cats: int = 128  # categories per program
    stats_nodes: int = 64  # nodes of one variable per program (the input layer's segments)
    stats_cats_major: bool = True  # tile as [categories, nodes]: the MMA's long side is the categories
    stats_split: bool = True  # flows x one-hot as 2 tf32 MMAs (flow hi + lo; the one-hot is exact)
    stats_warps: int = 0  # 0: num_warps
    # training steps' flows pass on three streams: product recompute ahead, parameter flows behind
    # (engine/executor/streams.py); A/B on an H200 2026-11-30 13:54, step -15% HCLT-128, -9% HCLT-256,
    # -6% PD-64, -2% PD-128 (benchmarks/results/kernel_breakdown_h200_overlap2.json)
    overlap: bool = True
    # with `overlap`: the second element buffer of the flows pass (the recompute runs ahead into it)
    # lives in node-value rows of sum layers whose readers are done (stream_schedule.recompute_buffers),
    # not in a spare as large as the largest product layer; the spare keeps only the top layers that
    # do not fit (HCLT-128, MNIST: 320 rows instead of 12,096). Off: the spare layout, for A/B
    recompute_in_node_rows: bool = True
    # with `overlap`: the input statistics of rows whose flows are final early (HCLT: most rows) run
    # on the parameter-flow stream during the pass (LayerPlan.input_flows_ready), the rest at its end
    early_stats: bool = True
    # with `overlap`, in a training step (`CompiledCircuit.train_step` with an EM update): each sum
    # layer's weight update runs on the parameter-flow stream right after its parameter flows (their
    # last reader), an early input range's right after its statistics, the rest at the end; the same
    # kernels on the same flows, so bit-identical to the update after the pass (ties, profiled
    # batches: after the pass). A step that fails mid-pass keeps the updates made before (its error
    # says so). Off: the A/B on two H200s (results/kernel_breakdown_h200_ab3{a,b}.json) gave HCLT-256
    # 8.70 -> 8.61 ms a step but HCLT-128 3.56 -> 3.63, PD within 0.05 ms
    em_in_pass: bool = False

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        for name, allowed in (
            ("num_warps", (1, 2, 4, 8, 16)),
            ("stats_warps", (0, 1, 2, 4, 8, 16)),
            ("fwd_rows", FWD_ROWS),
            ("fwd_rows_32", FWD_ROWS),
            ("flow_rows", FWD_ROWS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in (
            "block_b",
            "prod_rows",
            "sparse_children",
            "input_nodes",
            "input_rows",
            "input_block_b",
            "input_cols",
            "group_cols",
            "fwd_block_b",
            "fwd_rows_min_block",
            "fwd_rows_block_b",
            "fwd_rows_32_block_b",
            "flow_rows_max_block",
            "flow_rows_min_block",
            "elem_block_b",
            "elem_set_rows",
            "elem_set_max_rows",
            "elem_set_slab",
            "stats_block_b",
            "stats_cats",
            "stats_nodes",
        ):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {v}")
        if self.flow_rows_min_block > self.flow_rows_max_block:
            raise ValueError(
                f"flow_rows_min_block ({self.flow_rows_min_block}) must not exceed flow_rows_max_block "
                f"({self.flow_rows_max_block}): no block size would be grouped"
            )
        if self.elem_set_split and (
            self.elem_set_split < 16 or self.elem_set_split & (self.elem_set_split - 1)
        ):
            raise ValueError(f"elem_set_split must be 0 or a power of two >= 16, got {self.elem_set_split!r}")
        for name in ("elem_sets", "elem_sets_wide"):
            if getattr(self, name) not in ELEM_SETS:
                raise ValueError(f"{name} must be one of {ELEM_SETS}, got {getattr(self, name)!r}")
        for name in (
            "overlap",
            "early_stats",
            "em_in_pass",
            "input_fwd",
            "elem_split_once",
            "recompute_in_node_rows",
        ):
            if getattr(self, name) not in (0, 1):
                raise ValueError(f"{name} must be a bool (or 0 / 1), got {getattr(self, name)!r}")
