"""Shrink: the scaled rank-space projection t of x, split over K so that it fills the GPU, in one launch.

Dense (PER_ROW False): grid (M tiles, segments, splits). A segment (philox.segment_table) is a run of at most
BLOCK_R ranks sharing one dropout mask: t[:, lo:hi] = (drop_seg(x) @ A[lo:hi]^T) * scale[lo:hi] * 1/(1-p).
Per row (PER_ROW True): grid (M tiles, rank chunks, splits). Row m uses adapter row_ids[m]; its t row is compact:
t[m, j] = (drop_a(x_m) @ A[lo_a + j]^T) * scale[lo_a + j] * 1/(1-p_a) for j < r_a, 0 for j >= r_a (and 0 for rows
without an adapter). A program computes the stacked ranks [c * BLOCK_R, (c + 1) * BLOCK_R) for all its rows as one
matmul (each row masked by its own adapter's dropout) and keeps, per row, the ranks of the row's adapter; chunks
that no row of the tile uses are skipped. Split 0 of each chunk writes the zeros of t's unused compact columns.

Split over K: each split reduces a contiguous share of K; partials are combined in a fixed order by the
last program to arrive (kernels/blocks.py), so t is bit-reproducible. The split count brings the launch to
config.target_programs (2 per SM): at M = 512, 8 row tiles become 256 programs instead of 8.
fp32 accumulation; the scale and 1/(1-p) apply to the fp32 sum (one rounding less than scaling x).

PDL producer (USE_GDC, sm_90 with FUSED_LORA_PDL=1, kernels/config.py): every program calls gdc_launch_dependents
first, so the consumer launched after it (decode or fused GEMM, launch_pdl=True) starts streaming W at once; the
consumer's gdc_wait still waits for this whole launch to complete and flush before it reads t.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fused_lora.kernels import config
from fused_lora.kernels.blocks import dot_k_range, reduce_splits, row_adapters, row_dropout, split_range
from fused_lora.kernels.philox import SEG_FIELDS, SEG_HI, SEG_INV_KEEP, SEG_LO, SEG_SALT, SEG_THRESHOLD
from fused_lora.kernels.spec import PDL_PRODUCER_PTX, SPLIT_REDUCTION_PTX, KernelSpec


@triton.jit
def shrink_kernel(
    x_ptr,
    a_ptr,
    scale_ptr,
    table_ptr,
    row_ids_ptr,
    seed_ptr,
    t_ptr,
    part_ptr,
    counter_ptr,
    M,
    K,
    R,
    n_adapters,
    r_out,
    n_splits,
    split_stride,
    stride_xm,
    stride_xk,
    stride_tm,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    PER_ROW: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    PACKED: tl.constexpr,
    PRECISION: tl.constexpr,
    USE_GDC: tl.constexpr = False,
):
    if USE_GDC:  # PDL producer: let the consumer launch now (it waits for this launch before it reads t)
        tl.extra.cuda.gdc_launch_dependents()
    pid_m = tl.program_id(0)
    group = tl.program_id(1)
    split = tl.program_id(2)
    offs_m = tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    rows = (pid_m * BLOCK_M + offs_m).to(tl.int64)
    row_ok = rows < M
    if PER_ROW:
        has, entry, row_lo, row_hi = row_adapters(row_ids_ptr, rows, row_ok, n_adapters, table_ptr)
        ranks = group * BLOCK_R + offs_r
        ranks_ok = ranks < R
        inside = (ranks[None, :] >= row_lo[:, None]) & (ranks[None, :] < row_hi[:, None]) & row_ok[:, None]
        salt, threshold, inv_keep = row_dropout(has, entry)
        if split == 0:  # compact columns [c * BLOCK_R, (c + 1) * BLOCK_R) past each row's rank are zeros
            cols = group * BLOCK_R + offs_r
            unused = row_ok[:, None] & (cols[None, :] >= (row_hi - row_lo)[:, None]) & (cols < r_out)[None, :]
            tl.store(
                t_ptr + rows[:, None] * stride_tm + cols[None, :], tl.zeros((BLOCK_M, BLOCK_R), tl.float32), mask=unused
            )
        touched = tl.sum(tl.sum(inside.to(tl.int32), 1), 0) > 0
    else:
        seg = table_ptr + group * SEG_FIELDS
        lo = tl.load(seg + SEG_LO)
        ranks = lo + offs_r
        ranks_ok = ranks < tl.load(seg + SEG_HI)
        inside = row_ok[:, None] & ranks_ok[None, :]
        salt = tl.zeros((BLOCK_M,), tl.int32) + tl.load(seg + SEG_SALT)
        threshold = tl.zeros((BLOCK_M,), tl.int32) + tl.load(seg + SEG_THRESHOLD)
        inv_keep = tl.load(seg + SEG_INV_KEEP).to(tl.float32, bitcast=True)
        touched = True
    if touched:
        k_begin, k_end = split_range(split, n_splits, tl.cdiv(K, BLOCK_K), BLOCK_K)
        offs_k = (k_begin + tl.arange(0, BLOCK_K)).to(tl.int64)
        x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
        # A^T as a [BLOCK_K, BLOCK_R] tile: A is [R, K] contiguous
        a_ptrs = a_ptr + ranks.to(tl.int64)[None, :] * K + offs_k[:, None]
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        dropped = False
        if HAS_DROPOUT:
            dropped = tl.max(threshold, 0) > 0
        if dropped:
            acc = dot_k_range(
                acc,
                x_ptrs,
                a_ptrs,
                row_ok,
                ranks_ok,
                k_begin,
                k_end,
                K,
                stride_xk,
                1,
                tl.load(seed_ptr),
                rows * K,
                salt,
                threshold,
                True,
                PACKED,
                BLOCK_K,
                PRECISION,
            )
        else:
            acc = dot_k_range(
                acc,
                x_ptrs,
                a_ptrs,
                row_ok,
                ranks_ok,
                k_begin,
                k_end,
                K,
                stride_xk,
                1,
                None,
                None,
                None,
                None,
                False,
                False,
                BLOCK_K,
                PRECISION,
            )
        tile = pid_m * tl.num_programs(1) + group
        part = part_ptr + tile.to(tl.int64) * (BLOCK_M * BLOCK_R) + offs_m[:, None] * BLOCK_R + offs_r[None, :]
        acc, last = reduce_splits(acc, part, split, n_splits, split_stride, counter_ptr + tile)
        if last:
            acc = acc * tl.load(scale_ptr + ranks, mask=ranks_ok, other=0.0)[None, :]
            if PER_ROW:
                acc = acc * inv_keep[:, None]
                tl.store(t_ptr + rows[:, None] * stride_tm + (ranks[None, :] - row_lo[:, None]), acc, mask=inside)
            else:
                acc = acc * inv_keep
                tl.store(t_ptr + rows[:, None] * stride_tm + ranks[None, :], acc, mask=inside)


def shrink_config(x_dtype_bytes: int, has_dropout: bool, packed: bool = True, device=None) -> dict:
    """Tile sizes. Few on purpose: codegen compiles every one of them.

    One row tile height for every M: 64 rows feed wgmma on sm_90 (16 would fall back to mma.sync). Decode
    batches (M <= 64) are one row tile, filled by the split over K instead.
    """
    # the dropout mask of a 64 x 128 tile keeps too many Philox states live (spills): halve K then; one Philox
    # call per element (K % 4 != 0) with a mask per row spilled with 4 warps: 8 then
    block_k = 64 if (x_dtype_bytes == 4 or has_dropout) else 128
    per_element_mask = has_dropout and not packed
    default = dict(BLOCK_M=64, BLOCK_K=block_k, num_warps=8 if per_element_mask else 4, num_stages=3)
    shape_class = f"{x_dtype_bytes * 8}bit:dropout={has_dropout}:packed={packed}"
    return config.tuned("shrink", shape_class, default, device)


def per_row_block_r(R: int) -> int:
    """Rank chunk of per-row kernels: 16 covers the usual r <= 16 with no waste; wider stacks use 64."""
    return 16 if R <= 16 else 64


def shrink_grid(M: int, K: int, groups: int, cfg: dict, device) -> tuple:
    """(row tiles, groups, splits): the split over K brings the launch to config.target_programs."""
    tiles_m = triton.cdiv(M, cfg["BLOCK_M"])
    splits = config.split_count(tiles_m * groups, triton.cdiv(K, cfg["BLOCK_K"]), device)
    return tiles_m, groups, splits


def launch_shrink(
    x, lora_a, scale, table, groups, seed, t, block_r, has_dropout, precision, *, row_ids=None, n_adapters=0
):
    """t (fp32, preallocated) <- the scaled shrink. Dense: `table` is the segment table and `groups` its segments
    ([M, R] t). Per row (row_ids given): `table` is the adapter table, `groups` the rank chunks of block_r, and t is
    compact [M, r_max]. Callers skip M == 0 and groups == 0."""
    M, K = x.shape
    R = lora_a.shape[0]
    per_row = row_ids is not None
    packed = has_dropout and K % 4 == 0
    cfg = shrink_config(x.element_size(), has_dropout, packed, x.device)
    grid = shrink_grid(M, K, groups, cfg, x.device)
    splits = grid[2]
    tile_elems = cfg["BLOCK_M"] * block_r
    part = x.new_empty((splits * grid[0] * groups * tile_elems,), dtype=torch.float32) if splits > 1 else t
    counters = config.split_counters(x.device, grid[0] * groups) if splits > 1 else table
    shrink_kernel[grid](
        x,
        lora_a,
        scale,
        table,
        row_ids if per_row else table,
        seed,
        t,
        part,
        counters,
        M,
        K,
        R,
        n_adapters,
        t.shape[1],
        splits,
        grid[0] * groups * tile_elems,
        x.stride(0),
        x.stride(1),
        t.stride(0),
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_K=cfg["BLOCK_K"],
        BLOCK_R=block_r,
        PER_ROW=per_row,
        HAS_DROPOUT=has_dropout,
        PACKED=packed,
        PRECISION=precision,
        USE_GDC=config.pdl_enabled(x.device),
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )


# (has_dropout, packed) pairs a launch can use: PACKED only matters with dropout
DROPOUT_VARIANTS = ((False, False), (True, True), (True, False))


def _spec(dt: str, per_row: bool, block_r: int, dropout: bool, packed: bool, gdc: bool) -> KernelSpec:
    cfg = shrink_config(2, dropout, packed)
    sig = {
        "x_ptr": f"*{dt}",
        "a_ptr": f"*{dt}",
        "scale_ptr": "*fp32",
        "table_ptr": "*i32",
        "row_ids_ptr": "*i64" if per_row else "*i32",
        "seed_ptr": "*i64",
        "t_ptr": "*fp32",
        "part_ptr": "*fp32",
        "counter_ptr": "*i32",
        "M": "i32",
        "K": "i32",
        "R": "i32",
        "n_adapters": "i32",
        "r_out": "i32",
        "n_splits": "i32",
        "split_stride": "i32",
        "stride_xm": "i32",
        "stride_xk": "constexpr",
        "stride_tm": "i32",
    }
    const = dict(
        stride_xk=1,
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_K=cfg["BLOCK_K"],
        BLOCK_R=block_r,
        PER_ROW=per_row,
        HAS_DROPOUT=dropout,
        PACKED=packed,
        PRECISION="ieee",
        USE_GDC=gdc,
    )
    sig.update({n: "constexpr" for n in const if n != "stride_xk"})
    extra = {"ptx_patterns": {**SPLIT_REDUCTION_PTX, **(PDL_PRODUCER_PTX if gdc else {})}}
    if gdc:  # programmatic dependent launch exists from sm_90 on
        extra["arches"] = [90]
    return KernelSpec(
        name=(
            f"shrink[{'rows' if per_row else 'dense'},BM={cfg['BLOCK_M']},BK={cfg['BLOCK_K']},"
            f"BR={block_r},dropout={dropout},packed={packed},{dt}{',gdc' if gdc else ''}]"
        ),
        fn=shrink_kernel,
        signature=sig,
        constexprs=const,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
        extra=extra,
    )


def codegen_specs() -> list[KernelSpec]:
    specs = []
    for dt in ("fp16", "bf16"):
        for per_row in (False, True):
            for block_r in (16, 64):
                for dropout, packed in DROPOUT_VARIANTS:
                    specs.append(_spec(dt, per_row, block_r, dropout, packed, False))
            # the PDL producer (sm_90 only): its signal is one instruction at the start, compiled once per layout
            specs.append(_spec(dt, per_row, 16, False, False, True))
    return specs
