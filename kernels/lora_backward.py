"""Backward of the rank term (W frozen): dS, dB and dA, each split to fill the GPU and reduced in a fixed order.

    ds_kernel  grid (M tiles, rank chunks, splits of N):  dS = (dY @ B) * scale                     [M, R] fp32
    db_kernel  grid (N tiles, rank chunks, splits of M):  dB = dY^T @ t                             [N, R]
    da_kernel  grid (K tiles, groups, splits of M):       dA = dS^T @ drop(x) (* 1/(1-p))           [R, K]
dX is the forward's GEMM again (kernels/fused_gemm.py, dY @ W with the masked dS @ A in its accumulator).

Every split reduction goes through kernels/blocks.py (last program to arrive sums the partials in split order),
so dA and dB are bit-reproducible and the partial buffers hold at most config.MAX_SPLITS partials of a tile:
their size follows the launch (about target_programs tiles), never M. Offsets that multiply sizes are int64.
dY is read twice (dS reduces over N, dB over M): one read for both would need partials of one of them per tile of
the other axis (O(M) or O(N) buffers, the defect this replaces).

PER_ROW (mixed batches): row m uses only its adapter's ranks; t and dS are compact ([M, r_max], column j = rank
lo_m + j) and placed at the stacked ranks while loading (blocks.rank_term's convention), so each adapter's
gradient sums only its own rows; x is masked per row by that row's adapter. Dense groups of da_kernel are the
segments of philox.segment_table (one dropout mask each); per-row groups are rank chunks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fused_lora.kernels import config
from fused_lora.kernels.blocks import dot_k_range, reduce_splits, row_adapters, row_dropout, split_range
from fused_lora.kernels.philox import SEG_FIELDS, SEG_HI, SEG_INV_KEEP, SEG_LO, SEG_SALT, SEG_THRESHOLD, keep_mask_tile
from fused_lora.kernels.spec import SPLIT_REDUCTION_PTX, KernelSpec


@triton.jit
def _rank_rows(row_ids_ptr, table_ptr, rows, row_ok, ranks, n_adapters, R, PER_ROW: tl.constexpr):
    """(inside [BM, BR], column of each (row, rank) in the row's lhs, any inside): which stacked ranks each row uses."""
    if PER_ROW:
        _, _, row_lo, row_hi = row_adapters(row_ids_ptr, rows, row_ok, n_adapters, table_ptr)
        inside = (ranks[None, :] >= row_lo[:, None]) & (ranks[None, :] < row_hi[:, None]) & row_ok[:, None]
        column = ranks[None, :] - row_lo[:, None]
        touched = tl.sum(tl.sum(inside.to(tl.int32), 1), 0) > 0
    else:
        inside = row_ok[:, None] & (ranks < R)[None, :]
        column = ranks[None, :] + 0 * row_ok.to(tl.int32)[:, None]
        touched = True
    return inside, column, touched


@triton.jit
def ds_kernel(
    dy_ptr,
    b_ptr,
    scale_ptr,
    table_ptr,
    row_ids_ptr,
    ds_ptr,
    part_ptr,
    counter_ptr,
    M,
    N,
    R,
    n_adapters,
    n_splits,
    split_stride,
    stride_dym,
    stride_dyn,
    stride_dsm,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    PER_ROW: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    chunk = tl.program_id(1)
    split = tl.program_id(2)
    offs_m = tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    rows = (pid_m * BLOCK_M + offs_m).to(tl.int64)
    row_ok = rows < M
    ranks = chunk * BLOCK_R + offs_r
    inside, column, touched = _rank_rows(row_ids_ptr, table_ptr, rows, row_ok, ranks, n_adapters, R, PER_ROW)
    if touched:
        n_begin, n_end = split_range(split, n_splits, tl.cdiv(N, BLOCK_N), BLOCK_N)
        offs_n = (n_begin + tl.arange(0, BLOCK_N)).to(tl.int64)
        dy_ptrs = dy_ptr + rows[:, None] * stride_dym + offs_n[None, :] * stride_dyn
        b_ptrs = b_ptr + offs_n[:, None] * R + ranks[None, :]
        acc = dot_k_range(
            tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32),
            dy_ptrs,
            b_ptrs,
            row_ok,
            ranks < R,
            n_begin,
            n_end,
            N,
            stride_dyn,
            R,
            None,
            None,
            None,
            None,
            False,
            False,
            BLOCK_N,
            PRECISION,
        )
        tile = pid_m * tl.num_programs(1) + chunk
        part = part_ptr + tile.to(tl.int64) * (BLOCK_M * BLOCK_R) + offs_m[:, None] * BLOCK_R + offs_r[None, :]
        acc, last = reduce_splits(acc, part, split, n_splits, split_stride, counter_ptr + tile)
        if last:
            acc = acc * tl.load(scale_ptr + ranks, mask=ranks < R, other=0.0)[None, :]
            tl.store(ds_ptr + rows[:, None] * stride_dsm + column, acc, mask=inside)


@triton.jit
def db_kernel(
    dy_ptr,
    t_ptr,
    table_ptr,
    row_ids_ptr,
    db_ptr,
    part_ptr,
    counter_ptr,
    M,
    N,
    R,
    n_adapters,
    n_splits,
    split_stride,
    stride_dym,
    stride_dyn,
    stride_tm,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    PER_ROW: tl.constexpr,
    PRECISION: tl.constexpr,
):
    compute_ty = db_ptr.dtype.element_ty  # products in the adapter dtype (x's dtype or fp32)
    pid_n = tl.program_id(0)
    chunk = tl.program_id(1)
    split = tl.program_id(2)
    offs_n = tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    cols = (pid_n * BLOCK_N + offs_n).to(tl.int64)
    col_ok = cols < N
    ranks = chunk * BLOCK_R + offs_r
    m_begin, m_end = split_range(split, n_splits, tl.cdiv(M, BLOCK_M), BLOCK_M)
    # dB^T-free form: dB = dY^T t keeps BLOCK_N (64) as the MMA's M dimension, so sm_90 runs wgmma at rank 16
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for m0 in range(m_begin, m_end, BLOCK_M):
        rows = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        row_ok = rows < M
        inside, column, touched = _rank_rows(row_ids_ptr, table_ptr, rows, row_ok, ranks, n_adapters, R, PER_ROW)
        if touched:
            dy = tl.load(
                dy_ptr + rows[:, None] * stride_dym + cols[None, :] * stride_dyn,
                mask=row_ok[:, None] & col_ok[None, :],
                other=0.0,
            ).to(compute_ty)
            lhs = tl.load(t_ptr + rows[:, None] * stride_tm + column, mask=inside, other=0.0).to(compute_ty)
            acc = tl.dot(tl.trans(dy), lhs, acc, input_precision=PRECISION)
    tile = pid_n * tl.num_programs(1) + chunk
    part = part_ptr + tile.to(tl.int64) * (BLOCK_N * BLOCK_R) + offs_n[:, None] * BLOCK_R + offs_r[None, :]
    acc, last = reduce_splits(acc, part, split, n_splits, split_stride, counter_ptr + tile)
    if last:
        tl.store(
            db_ptr + cols[:, None] * R + ranks[None, :], acc.to(compute_ty), mask=col_ok[:, None] & (ranks < R)[None, :]
        )


@triton.jit
def da_kernel(
    ds_ptr,
    x_ptr,
    table_ptr,
    row_ids_ptr,
    seed_ptr,
    da_ptr,
    part_ptr,
    counter_ptr,
    M,
    K,
    R,
    n_adapters,
    n_splits,
    split_stride,
    stride_dsm,
    stride_xm,
    stride_xk,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    PER_ROW: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    PACKED: tl.constexpr,
    PRECISION: tl.constexpr,
):
    compute_ty = da_ptr.dtype.element_ty  # products in the adapter dtype (x's dtype or fp32)
    pid_k = tl.program_id(0)
    group = tl.program_id(1)
    split = tl.program_id(2)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    cols = (pid_k * BLOCK_K + offs_k).to(tl.int64)
    k_ok = cols < K
    zero = tl.zeros((BLOCK_M,), tl.int32)
    if PER_ROW:
        ranks = group * BLOCK_R + offs_r
        r_end = R
    else:
        seg = table_ptr + group * SEG_FIELDS
        ranks = tl.load(seg + SEG_LO) + offs_r
        r_end = tl.load(seg + SEG_HI)
        salt = zero + tl.load(seg + SEG_SALT)
        threshold = zero + tl.load(seg + SEG_THRESHOLD)
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    m_begin, m_end = split_range(split, n_splits, tl.cdiv(M, BLOCK_M), BLOCK_M)
    # dA^T = drop(x)^T dS: BLOCK_K (>= 64) is the MMA's M dimension, so sm_90 runs wgmma even at rank 16
    acc = tl.zeros((BLOCK_K, BLOCK_R), dtype=tl.float32)
    for m0 in range(m_begin, m_end, BLOCK_M):
        rows = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        row_ok = rows < M
        inside, column, touched = _rank_rows(row_ids_ptr, table_ptr, rows, row_ok, ranks, n_adapters, r_end, PER_ROW)
        if touched:
            ds = tl.load(ds_ptr + rows[:, None] * stride_dsm + column, mask=inside, other=0.0)
            xt = tl.load(
                x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
                mask=row_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            if HAS_DROPOUT:
                if PER_ROW:
                    has, entry, _, _ = row_adapters(row_ids_ptr, rows, row_ok, n_adapters, table_ptr)
                    salt, threshold, inv_keep = row_dropout(has, entry)
                    ds = ds * inv_keep[:, None]
                if tl.max(threshold, 0) > 0:
                    keep = keep_mask_tile(seed, rows * K, pid_k * BLOCK_K, salt, threshold, BLOCK_K, PACKED)
                    xt = tl.where(keep, xt, 0.0)
            acc = tl.dot(tl.trans(xt.to(compute_ty)), ds.to(compute_ty), acc, input_precision=PRECISION)
    if HAS_DROPOUT:
        if not PER_ROW:
            acc = acc * tl.load(seg + SEG_INV_KEEP).to(tl.float32, bitcast=True)
    tile = pid_k * tl.num_programs(1) + group
    part = part_ptr + tile.to(tl.int64) * (BLOCK_K * BLOCK_R) + offs_k[:, None] * BLOCK_R + offs_r[None, :]
    acc, last = reduce_splits(acc, part, split, n_splits, split_stride, counter_ptr + tile)
    if last:
        tl.store(
            da_ptr + ranks.to(tl.int64)[None, :] * K + cols[:, None],
            acc.to(compute_ty),
            mask=k_ok[:, None] & (ranks < r_end)[None, :],
        )


def ds_config(dtype_bytes: int, device=None) -> dict:
    return config.tuned("ds", f"{dtype_bytes * 8}bit", dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3), device)


def db_config(dtype_bytes: int, device=None) -> dict:
    return config.tuned("db", f"{dtype_bytes * 8}bit", dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3), device)


def da_config(dtype_bytes: int, has_dropout: bool, packed: bool, device=None) -> dict:
    # one Philox call per element (K % 4 != 0) next to a 64 x 64 accumulator spills with 4 warps on sm_90
    per_element_mask = has_dropout and not packed
    default = dict(
        BLOCK_M=64, BLOCK_K=64 if dtype_bytes == 2 else 32, num_warps=8 if per_element_mask else 4, num_stages=3
    )
    return config.tuned("da", f"{dtype_bytes * 8}bit:dropout={has_dropout}:packed={packed}", default, device)


def rank_chunk(R: int) -> int:
    """Stacked-rank chunk of dS and dB (and of per-row dA): 16 for the usual r <= 16, 64 beyond."""
    return 16 if R <= 16 else 64


def split_grid(tiles: int, groups: int, reduce_len: int, reduce_block: int, device) -> tuple:
    """(tiles, groups, splits): splits of the reduced axis bring the launch to config.target_programs."""
    steps = triton.cdiv(reduce_len, reduce_block)
    return tiles, groups, config.split_count(tiles * groups, steps, device)


def _workspace(device, splits: int, tiles: int, tile_elems: int, stand_in, table):
    """(partial buffer, split stride, counters); without a split the kernel touches neither, stand-ins go."""
    if splits <= 1:
        return stand_in, 0, table
    part = torch.empty((splits * tiles * tile_elems,), dtype=torch.float32, device=device)
    return part, tiles * tile_elems, config.split_counters(device, tiles)


def launch_ds(dy, lora_b, scale, ds, table, precision, *, row_ids=None, n_adapters=0):
    """ds (fp32; dense [M, R], per row compact [M, r_max]) = (dY @ B) * scale. M > 0, R > 0."""
    M, N = dy.shape
    R = lora_b.shape[1]
    per_row = row_ids is not None
    cfg = ds_config(lora_b.element_size(), dy.device)
    block_r = rank_chunk(R)
    grid = split_grid(triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(R, block_r), N, cfg["BLOCK_N"], dy.device)
    part, stride, counters = _workspace(dy.device, grid[2], grid[0] * grid[1], cfg["BLOCK_M"] * block_r, ds, table)
    ds_kernel[grid](
        dy,
        lora_b,
        scale,
        table,
        row_ids if per_row else table,
        ds,
        part,
        counters,
        M,
        N,
        R,
        n_adapters,
        grid[2],
        stride,
        dy.stride(0),
        dy.stride(1),
        ds.stride(0),
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"],
        BLOCK_R=block_r,
        PER_ROW=per_row,
        PRECISION=precision,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )


def launch_db(dy, t, db, table, precision, *, row_ids=None, n_adapters=0):
    """db ([N, R], adapter dtype) = dY^T t (t dense [M, R], or compact per row). M > 0, R > 0."""
    M, N = dy.shape
    R = db.shape[1]
    per_row = row_ids is not None
    cfg = db_config(db.element_size(), dy.device)
    block_r = rank_chunk(R)
    grid = split_grid(triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(R, block_r), M, cfg["BLOCK_M"], dy.device)
    part, stride, counters = _workspace(dy.device, grid[2], grid[0] * grid[1], cfg["BLOCK_N"] * block_r, t, table)
    db_kernel[grid](
        dy,
        t,
        table,
        row_ids if per_row else table,
        db,
        part,
        counters,
        M,
        N,
        R,
        n_adapters,
        grid[2],
        stride,
        dy.stride(0),
        dy.stride(1),
        t.stride(0),
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"],
        BLOCK_R=block_r,
        PER_ROW=per_row,
        PRECISION=precision,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )


def launch_da(ds, x, lora_a, table, groups, seed, da, block_r, has_dropout, precision, *, row_ids=None, n_adapters=0):
    """da ([R, K], adapter dtype) = dS^T drop(x). Dense: groups = segments of `table` (each at most block_r wide);
    per row: groups = rank chunks of block_r, `table` the adapter table. M > 0, R > 0."""
    M, K = x.shape
    R = lora_a.shape[0]
    per_row = row_ids is not None
    packed = has_dropout and K % 4 == 0
    cfg = da_config(lora_a.element_size(), has_dropout, packed, x.device)
    grid = split_grid(triton.cdiv(K, cfg["BLOCK_K"]), groups, M, cfg["BLOCK_M"], x.device)
    part, stride, counters = _workspace(x.device, grid[2], grid[0] * grid[1], cfg["BLOCK_K"] * block_r, ds, table)
    da_kernel[grid](
        ds,
        x,
        table,
        row_ids if per_row else table,
        seed,
        da,
        part,
        counters,
        M,
        K,
        R,
        n_adapters,
        grid[2],
        stride,
        ds.stride(0),
        x.stride(0),
        x.stride(1),
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_K=cfg["BLOCK_K"],
        BLOCK_R=block_r,
        PER_ROW=per_row,
        HAS_DROPOUT=has_dropout,
        PACKED=packed,
        PRECISION=precision,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )


DROPOUT_VARIANTS = ((False, False), (True, True), (True, False))  # (HAS_DROPOUT, PACKED)


def _sig(names: dict, consts: dict) -> dict:
    sig = dict(names)
    sig.update({n: "constexpr" for n in consts})
    return sig


def codegen_specs() -> list[KernelSpec]:
    specs = []
    for dt in ("fp16", "bf16"):
        for per_row in (False, True):
            ids = "*i64" if per_row else "*i32"
            kind = "rows" if per_row else "dense"
            for block_r in (16, 64):
                cfg = ds_config(2)
                const = dict(
                    stride_dyn=1,
                    BLOCK_M=cfg["BLOCK_M"],
                    BLOCK_N=cfg["BLOCK_N"],
                    BLOCK_R=block_r,
                    PER_ROW=per_row,
                    PRECISION="ieee",
                )
                types = {
                    "dy_ptr": f"*{dt}",
                    "b_ptr": f"*{dt}",
                    "scale_ptr": "*fp32",
                    "table_ptr": "*i32",
                    "row_ids_ptr": ids,
                    "ds_ptr": "*fp32",
                    "part_ptr": "*fp32",
                    "counter_ptr": "*i32",
                    "M": "i32",
                    "N": "i32",
                    "R": "i32",
                    "n_adapters": "i32",
                    "n_splits": "i32",
                    "split_stride": "i32",
                    "stride_dym": "i32",
                    "stride_dsm": "i32",
                }
                specs.append(
                    KernelSpec(
                        name=f"ds[{kind},BM={cfg['BLOCK_M']},BN={cfg['BLOCK_N']},BR={block_r},{dt}]",
                        fn=ds_kernel,
                        signature=_sig(types, const),
                        constexprs=const,
                        num_warps=cfg["num_warps"],
                        num_stages=cfg["num_stages"],
                        extra={"ptx_patterns": SPLIT_REDUCTION_PTX},
                    )
                )
                cfg = db_config(2)
                const = dict(
                    stride_dyn=1,
                    BLOCK_M=cfg["BLOCK_M"],
                    BLOCK_N=cfg["BLOCK_N"],
                    BLOCK_R=block_r,
                    PER_ROW=per_row,
                    PRECISION="ieee",
                )
                types = {
                    "dy_ptr": f"*{dt}",
                    "t_ptr": "*fp32",
                    "table_ptr": "*i32",
                    "row_ids_ptr": ids,
                    "db_ptr": f"*{dt}",
                    "part_ptr": "*fp32",
                    "counter_ptr": "*i32",
                    "M": "i32",
                    "N": "i32",
                    "R": "i32",
                    "n_adapters": "i32",
                    "n_splits": "i32",
                    "split_stride": "i32",
                    "stride_dym": "i32",
                    "stride_tm": "i32",
                }
                specs.append(
                    KernelSpec(
                        name=f"db[{kind},BM={cfg['BLOCK_M']},BN={cfg['BLOCK_N']},BR={block_r},{dt}]",
                        fn=db_kernel,
                        signature=_sig(types, const),
                        constexprs=const,
                        num_warps=cfg["num_warps"],
                        num_stages=cfg["num_stages"],
                        extra={"ptx_patterns": SPLIT_REDUCTION_PTX},
                    )
                )
                for dropout, packed in DROPOUT_VARIANTS:
                    cfg = da_config(2, dropout, packed)
                    const = dict(
                        stride_xk=1,
                        BLOCK_M=cfg["BLOCK_M"],
                        BLOCK_K=cfg["BLOCK_K"],
                        BLOCK_R=block_r,
                        PER_ROW=per_row,
                        HAS_DROPOUT=dropout,
                        PACKED=packed,
                        PRECISION="ieee",
                    )
                    types = {
                        "ds_ptr": "*fp32",
                        "x_ptr": f"*{dt}",
                        "table_ptr": "*i32",
                        "row_ids_ptr": ids,
                        "seed_ptr": "*i64",
                        "da_ptr": f"*{dt}",
                        "part_ptr": "*fp32",
                        "counter_ptr": "*i32",
                        "M": "i32",
                        "K": "i32",
                        "R": "i32",
                        "n_adapters": "i32",
                        "n_splits": "i32",
                        "split_stride": "i32",
                        "stride_dsm": "i32",
                        "stride_xm": "i32",
                    }
                    specs.append(
                        KernelSpec(
                            name=(
                                f"da[{kind},BM={cfg['BLOCK_M']},BK={cfg['BLOCK_K']},BR={block_r},"
                                f"dropout={dropout},packed={packed},{dt}]"
                            ),
                            fn=da_kernel,
                            signature=_sig(types, const),
                            constexprs=const,
                            num_warps=cfg["num_warps"],
                            num_stages=cfg["num_stages"],
                            extra={"ptx_patterns": SPLIT_REDUCTION_PTX},
                        )
                    )
    return specs
