"""Per-row (mixed-batch) LoRA on the GPU: every row m uses adapter row_ids[m], or none when it is -1.

Punica/vLLM style, but with the base GEMM and the rank term in one accumulator:
1. `_group_rows_kernel` (one program) sorts the rows by adapter on the device (a stable counting sort) and
   writes tile maps: each tile is a run of at most BLOCK_M sorted rows of ONE group (group 0 = "no adapter").
   No host sync: the grids below depend only on M, the number of adapters, N/K and the block sizes, never on
   row_ids, so the whole sequence can be captured in a CUDA graph. Tiles past the last real one are empty and
   their programs exit at once. Row ids outside [-1, n) are treated as -1 (validating them would need a sync).
2. forward: one grouped shrink launch (t = drop_a(x) A_a^T * scale_a per row tile), then one grouped GEMM launch
   y = x W^T + bias + t B_a^T with the rank term inside the fp32 accumulator, y written once.
3. backward: dB and dS from one read of dY per tile (atomics into fp32 buffers), dA with the rows split over
   tiles and reduced by atomics, dX by the same grouped GEMM (W not transposed) with the per-row, dropout-masked
   rank term dS_a A_a in its accumulator.

Matmul operands of the rank term are cast to the adapters' dtype (x's dtype or float32); accumulation is fp32.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fused_lora.kernels.philox import dropout_params, keep_mask

TILE_FIELDS = 3  # per tile: adapter index (-1: none), first and end position in the sorted row order


# ----------------------------------------------------------------------------------------------------------------
# Device-side grouping
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _row_groups(row_ids_ptr, m, M, N_GROUPS, G_P2: tl.constexpr):
    """One-hot [BLOCK, G_P2] of each row's group (adapter + 1; 0 = none, also for out-of-range ids)."""
    ids = tl.load(row_ids_ptr + m, mask=m < M, other=-1)
    in_range = (ids >= -1) & (ids < N_GROUPS - 1)
    group = tl.where(in_range, ids + 1, 0).to(tl.int32)
    group = tl.where(m < M, group, -1)  # rows past M belong to no group at all
    return (group[:, None] == tl.arange(0, G_P2)[None, :]).to(tl.int32)


@triton.jit
def _write_tile_map(tiles_ptr, n_tiles, counts, group_start, BLOCK_ROWS: tl.constexpr, G_P2: tl.constexpr,
                    BLOCK_T: tl.constexpr):
    groups = tl.arange(0, G_P2)
    tiles = (counts + BLOCK_ROWS - 1) // BLOCK_ROWS
    tile_end = tl.cumsum(tiles, 0)
    tile_first = tile_end - tiles
    group_end = group_start + counts
    for t0 in range(0, n_tiles, BLOCK_T):
        tid = t0 + tl.arange(0, BLOCK_T)
        hit = ((tid[:, None] >= tile_first[None, :]) & (tid[:, None] < tile_end[None, :])).to(tl.int32)
        found = tl.sum(hit, 1) > 0
        group = tl.sum(hit * groups[None, :], 1)
        local = tid - tl.sum(hit * tile_first[None, :], 1)
        start = tl.sum(hit * group_start[None, :], 1) + local * BLOCK_ROWS
        end = tl.minimum(start + BLOCK_ROWS, tl.sum(hit * group_end[None, :], 1))
        ok = tid < n_tiles
        tl.store(tiles_ptr + tid * 3, tl.where(found, group - 1, -1), mask=ok)
        tl.store(tiles_ptr + tid * 3 + 1, tl.where(found, start, 0), mask=ok)
        tl.store(tiles_ptr + tid * 3 + 2, tl.where(found, end, 0), mask=ok)


@triton.jit
def _group_rows_kernel(row_ids_ptr, order_ptr, tiles_a_ptr, tiles_b_ptr, M, N_GROUPS, N_TILES_A, N_TILES_B,
                       G_P2: tl.constexpr, BLOCK: tl.constexpr, BLOCK_ROWS_A: tl.constexpr,
                       BLOCK_ROWS_B: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    counts = tl.zeros([G_P2], dtype=tl.int32)
    for m0 in range(0, M, BLOCK):
        counts += tl.sum(_row_groups(row_ids_ptr, m0 + offs, M, N_GROUPS, G_P2), 0)
    group_start = tl.cumsum(counts, 0) - counts
    # Stable counting sort: a row's position is its group's start plus the rows of its group before it.
    next_free = group_start
    for m0 in range(0, M, BLOCK):
        m = m0 + offs
        onehot = _row_groups(row_ids_ptr, m, M, N_GROUPS, G_P2)
        before = tl.cumsum(onehot, 0) - onehot
        pos = tl.sum(onehot * (before + next_free[None, :]), 1)
        tl.store(order_ptr + pos, m, mask=m < M)
        next_free += tl.sum(onehot, 0)
    _write_tile_map(tiles_a_ptr, N_TILES_A, counts, group_start, BLOCK_ROWS_A, G_P2, BLOCK)
    _write_tile_map(tiles_b_ptr, N_TILES_B, counts, group_start, BLOCK_ROWS_B, G_P2, BLOCK)


def _group_block(g_p2: int) -> int:
    # The one-hot tile is [BLOCK, G_P2]: keep it near 4K elements whatever the number of adapters.
    return max(16, min(512, 4096 // g_p2))


def n_tiles(M: int, n_adapters: int, block_rows: int) -> int:
    """Upper bound on the tiles of the sorted rows: sum_g ceil(c_g / B) <= floor(M / B) + number of groups."""
    return M // block_rows + n_adapters + 1


def group_rows(row_ids: torch.Tensor, n_adapters: int, block_rows_a: int, block_rows_b: int):
    """(order int32 [M], tiles_a int32 [Ta, 3], tiles_b int32 [Tb, 3]) computed on row_ids' device, no sync."""
    M = row_ids.shape[0]
    dev = row_ids.device
    ta, tb = n_tiles(M, n_adapters, block_rows_a), n_tiles(M, n_adapters, block_rows_b)
    order = torch.empty(M, dtype=torch.int32, device=dev)
    tiles_a = torch.empty(ta, TILE_FIELDS, dtype=torch.int32, device=dev)
    tiles_b = torch.empty(tb, TILE_FIELDS, dtype=torch.int32, device=dev)
    g_p2 = triton.next_power_of_2(n_adapters + 1)
    _group_rows_kernel[(1,)](row_ids, order, tiles_a, tiles_b, M, n_adapters + 1, ta, tb, G_P2=g_p2,
                             BLOCK=_group_block(g_p2), BLOCK_ROWS_A=block_rows_a, BLOCK_ROWS_B=block_rows_b,
                             num_warps=4)
    return order, tiles_a, tiles_b


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _keep_tile(seed, rows, col_start, K, salt, threshold, BLOCK_N: tl.constexpr, GROUPS_OF_4: tl.constexpr):
    """Dropout keep mask of elements (rows, col_start + [0, BLOCK_N)) of an [M, K] matrix, as in the contract.

    GROUPS_OF_4 (K % 4 == 0 and col_start % 4 == 0): four neighbouring elements are the four words of one
    Philox call, so one call per four elements instead of one per element (a quarter of the registers too).
    """
    if GROUPS_OF_4:
        q = ((rows * K + col_start) >> 2)[:, None] + tl.arange(0, BLOCK_N // 4)[None, :]
        c0 = (q & 0xFFFFFFFF).to(tl.uint32)
        c1 = (q >> 32).to(tl.uint32)
        w0, w1, w2, w3 = tl.philox(seed, c0, c1, c0 * 0 + salt.to(tl.uint32), c0 * 0)
        # join(join(w0, w2), join(w1, w3))[.., i, j] is word 2i + j: flattening gives w0 w1 w2 w3 per group.
        words = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), (rows.shape[0], BLOCK_N))
        return (words >> 8) >= threshold.to(tl.uint32)
    else:
        elem = rows[:, None] * K + (col_start + tl.arange(0, BLOCK_N))[None, :].to(tl.int64)
        return keep_mask(seed, elem, salt, threshold)


@triton.jit
def _tile_rows(tiles_ptr, order_ptr, BLOCK_M: tl.constexpr):
    adapter = tl.load(tiles_ptr + tl.program_id(0) * 3)
    start = tl.load(tiles_ptr + tl.program_id(0) * 3 + 1)
    end = tl.load(tiles_ptr + tl.program_id(0) * 3 + 2)
    pos = start + tl.arange(0, BLOCK_M)
    row_ok = pos < end
    rows = tl.load(order_ptr + pos, mask=row_ok, other=0).to(tl.int64)
    return adapter, start, end, rows, row_ok


@triton.jit
def _adapter_ranks(rank_ptr_ptr, adapter):
    """(first rank, rank count) of an adapter; count 0 for the "none" group."""
    a = tl.maximum(adapter, 0)
    lo = tl.load(rank_ptr_ptr + a)
    hi = tl.load(rank_ptr_ptr + a + 1)
    return lo, tl.where(adapter >= 0, hi - lo, 0)


@triton.jit
def _rows_shrink_kernel(t_ptr, x_ptr, a_ptr, scale_ptr, order_ptr, tiles_ptr, rank_ptr_ptr, threshold_ptr,
                        inv_keep_ptr, seed_ptr, K, R_MAX, stride_xm, stride_xk, stride_tm,
                        DROPOUT: tl.constexpr, GROUPS_OF_4: tl.constexpr, PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """t[rows, r] = (drop_a(x[rows]) @ A_a^T)[:, r] * scale, zero for r >= rank of a and for "none" rows."""
    adapter, start, end, rows, row_ok = _tile_rows(tiles_ptr, order_ptr, BLOCK_M)
    if start >= end:
        return
    r_lo, r_a = _adapter_ranks(rank_ptr_ptr, adapter)
    rr = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rr < r_a
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    k_stop = tl.where(tl.program_id(1) * BLOCK_R < r_a, K, 0)  # rank blocks past this adapter's rank: zeros
    if DROPOUT:
        salt = tl.maximum(adapter, 0)
        threshold = tl.load(threshold_ptr + salt)
        seed = tl.load(seed_ptr)
    x_ptrs = x_ptr + rows[:, None] * stride_xm + ks[None, :].to(tl.int64) * stride_xk
    a_ptrs = a_ptr + (r_lo + rr)[None, :].to(tl.int64) * K + ks[:, None]
    for k0 in range(0, k_stop, BLOCK_K):
        k_ok = (k0 + ks) < K
        x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if DROPOUT:
            if threshold > 0:
                x = tl.where(_keep_tile(seed, rows, k0, K, salt, threshold, BLOCK_K, GROUPS_OF_4), x, 0.0)
        a = tl.load(a_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        acc = tl.dot(x.to(a.dtype), a, acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        a_ptrs += BLOCK_K
    scale = tl.load(scale_ptr + r_lo + rr, mask=r_ok, other=0.0)
    acc = acc * scale[None, :]
    if DROPOUT:
        acc = acc * tl.load(inv_keep_ptr + salt)
    tl.store(t_ptr + rows[:, None] * stride_tm + rr[None, :], acc, mask=row_ok[:, None] & (rr < R_MAX)[None, :])


@triton.jit
def _base_term(acc, inp_ptr, w_ptr, rows, row_ok, cols64, col_ok, RED, stride_im, stride_ik, stride_wr, stride_wc,
               PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    ks = tl.arange(0, BLOCK_K)
    i_ptrs = inp_ptr + rows[:, None] * stride_im + ks[None, :].to(tl.int64) * stride_ik
    w_ptrs = w_ptr + ks[:, None].to(tl.int64) * stride_wr + cols64[None, :] * stride_wc
    for k0 in range(0, RED, BLOCK_K):
        k_ok = (k0 + ks) < RED
        a = tl.load(i_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
        i_ptrs += BLOCK_K * stride_ik
        w_ptrs += BLOCK_K * stride_wr
    return acc


@triton.jit
def _rank_term(acc, lhs_ptr, rmat_ptr, rows, row_ok, cols64, col_ok, r_lo, r_a, stride_lm, stride_rr, stride_rc,
               PRECISION: tl.constexpr, BLOCK_R: tl.constexpr):
    rr = tl.arange(0, BLOCK_R)
    l_ptrs = lhs_ptr + rows[:, None] * stride_lm + rr[None, :]
    r_ptrs = rmat_ptr + (r_lo + rr)[:, None].to(tl.int64) * stride_rr + cols64[None, :] * stride_rc
    for r0 in range(0, r_a, BLOCK_R):
        r_ok = (r0 + rr) < r_a
        rmat = tl.load(r_ptrs, mask=r_ok[:, None] & col_ok[None, :], other=0.0)
        lhs = tl.load(l_ptrs, mask=row_ok[:, None] & r_ok[None, :], other=0.0)
        acc = tl.dot(lhs.to(rmat.dtype), rmat, acc, input_precision=PRECISION)
        l_ptrs += BLOCK_R
        r_ptrs += BLOCK_R * stride_rr
    return acc


@triton.jit
def _rows_gemm_kernel(out_ptr, inp_ptr, w_ptr, bias_ptr, lhs_ptr, rmat_ptr, order_ptr, tiles_ptr, rank_ptr_ptr,
                      threshold_ptr, inv_keep_ptr, seed_ptr, N_OUT, RED,
                      stride_im, stride_ik, stride_wr, stride_wc, stride_om, stride_lm, stride_rr, stride_rc,
                      HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, GROUPS_OF_4: tl.constexpr,
                      PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      BLOCK_R: tl.constexpr):
    """out[rows] = inp[rows] @ Wl + bias + drop_a'(lhs[rows, :r_a] @ Rl_a), one fp32 accumulator, one rounding.

    Wl is the [RED, N_OUT] view of the weight given by (stride_wr, stride_wc); Rl_a the [r_a, N_OUT] view of the
    adapter's rank matrix. Forward: inp=x, Wl=W^T, lhs=t, Rl=B^T, no dropout. dX: inp=dy, Wl=W, lhs=dS, Rl=A,
    with the dropout mask of the output element (dX has x's shape, so it is x's mask).
    """
    adapter, start, end, rows, row_ok = _tile_rows(tiles_ptr, order_ptr, BLOCK_M)
    if start >= end:
        return
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N_OUT
    cols64 = cols.to(tl.int64)
    r_lo, r_a = _adapter_ranks(rank_ptr_ptr, adapter)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if DROPOUT:
        # The mask applies to the rank product alone: compute it first, mask it in place, then let the base GEMM
        # accumulate on top, so one accumulator is live instead of two.
        acc = _rank_term(acc, lhs_ptr, rmat_ptr, rows, row_ok, cols64, col_ok, r_lo, r_a, stride_lm, stride_rr,
                         stride_rc, PRECISION, BLOCK_R)
        salt = tl.maximum(adapter, 0)
        threshold = tl.load(threshold_ptr + salt)
        if threshold > 0:
            keep = _keep_tile(tl.load(seed_ptr), rows, tl.program_id(1) * BLOCK_N, N_OUT, salt, threshold, BLOCK_N,
                              GROUPS_OF_4)
            acc = tl.where(keep, acc * tl.load(inv_keep_ptr + salt), 0.0)
    acc = _base_term(acc, inp_ptr, w_ptr, rows, row_ok, cols64, col_ok, RED, stride_im, stride_ik, stride_wr,
                     stride_wc, PRECISION, BLOCK_K)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if not DROPOUT:
        acc = _rank_term(acc, lhs_ptr, rmat_ptr, rows, row_ok, cols64, col_ok, r_lo, r_a, stride_lm, stride_rr,
                         stride_rc, PRECISION, BLOCK_R)
    out = out_ptr + rows[:, None] * stride_om + cols64[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _rows_bwd_db_ds_kernel(db_ptr, ds_ptr, dy_ptr, t_ptr, b_ptr, scale_ptr, order_ptr, tiles_ptr, rank_ptr_ptr,
                           N, R, stride_dym, stride_dyn, stride_tm, stride_dsm,
                           PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_R: tl.constexpr):
    """From one read of a dY tile: dB[cols, ranks] += dY^T t and dS[rows, :] += (dY B_a) * scale (fp32 atomics)."""
    adapter, start, end, rows, row_ok = _tile_rows(tiles_ptr, order_ptr, BLOCK_M)
    if (start >= end) | (adapter < 0):
        return
    r_lo, r_a = _adapter_ranks(rank_ptr_ptr, adapter)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    cols64 = cols.to(tl.int64)
    rr = tl.arange(0, BLOCK_R)
    dy = tl.load(dy_ptr + rows[:, None] * stride_dym + cols64[None, :] * stride_dyn,
                 mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(b_ptr.dtype.element_ty)
    for r0 in range(0, r_a, BLOCK_R):
        r_ok = (r0 + rr) < r_a
        ranks = r_lo + r0 + rr
        t = tl.load(t_ptr + rows[:, None] * stride_tm + (r0 + rr)[None, :], mask=row_ok[:, None] & r_ok[None, :],
                    other=0.0)
        db = tl.dot(tl.trans(dy), t.to(dy.dtype), input_precision=PRECISION)
        tl.atomic_add(db_ptr + cols64[:, None] * R + ranks[None, :], db, mask=col_ok[:, None] & r_ok[None, :],
                      sem="relaxed")
        b = tl.load(b_ptr + cols64[:, None] * R + ranks[None, :], mask=col_ok[:, None] & r_ok[None, :], other=0.0)
        ds = tl.dot(dy, b, input_precision=PRECISION)
        ds = ds * tl.load(scale_ptr + ranks, mask=r_ok, other=0.0)[None, :]
        tl.atomic_add(ds_ptr + rows[:, None] * stride_dsm + (r0 + rr)[None, :], ds,
                      mask=row_ok[:, None] & r_ok[None, :], sem="relaxed")


@triton.jit
def _rows_bwd_da_kernel(da_ptr, ds_ptr, x_ptr, order_ptr, tiles_ptr, rank_ptr_ptr, threshold_ptr, inv_keep_ptr,
                        seed_ptr, K, stride_xm, stride_xk, stride_dsm,
                        DOT_IN_X_DTYPE: tl.constexpr, DROPOUT: tl.constexpr, GROUPS_OF_4: tl.constexpr,
                        PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """dA[ranks of a, cols] += dS[rows]^T drop_a(x[rows]): rows split over tiles, reduced by fp32 atomics."""
    adapter, start, end, rows, row_ok = _tile_rows(tiles_ptr, order_ptr, BLOCK_M)
    if (start >= end) | (adapter < 0):
        return
    r_lo, r_a = _adapter_ranks(rank_ptr_ptr, adapter)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = ks < K
    ks64 = ks.to(tl.int64)
    rr = tl.arange(0, BLOCK_R)
    x = tl.load(x_ptr + rows[:, None] * stride_xm + ks64[None, :] * stride_xk,
                mask=row_ok[:, None] & k_ok[None, :], other=0.0)
    inv_keep = 1.0
    if DROPOUT:
        threshold = tl.load(threshold_ptr + adapter)
        if threshold > 0:
            keep = _keep_tile(tl.load(seed_ptr), rows, tl.program_id(1) * BLOCK_K, K, adapter, threshold, BLOCK_K,
                              GROUPS_OF_4)
            x = tl.where(keep, x, 0.0)
        inv_keep = tl.load(inv_keep_ptr + adapter)
    if not DOT_IN_X_DTYPE:
        x = x.to(tl.float32)
    for r0 in range(0, r_a, BLOCK_R):
        r_ok = (r0 + rr) < r_a
        ds = tl.load(ds_ptr + rows[:, None] * stride_dsm + (r0 + rr)[None, :], mask=row_ok[:, None] & r_ok[None, :],
                     other=0.0)
        # dA^T = x^T dS keeps BLOCK_K (>= 64) as the MMA's M dimension, so sm_90 can use wgmma.
        da_t = tl.dot(tl.trans(x), ds.to(x.dtype), input_precision=PRECISION) * inv_keep
        tl.atomic_add(da_ptr + (r_lo + r0 + rr)[None, :].to(tl.int64) * K + ks64[:, None], da_t,
                      mask=k_ok[:, None] & r_ok[None, :], sem="relaxed")


# ----------------------------------------------------------------------------------------------------------------
# Configs and launchers
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RowsConfig:
    block_m: int
    block_n: int
    block_k: int
    block_r: int
    num_warps: int
    num_stages: int


# Rows per adapter decide the row tile: decode batches spread few rows over many adapters. BLOCK_M = 16 cannot feed
# wgmma (64 rows per warpgroup), so those configs run mma.sync (HMMA) on sm_90 too.
_GEMM_CONFIGS = {
    "small": RowsConfig(16, 64, 64, 16, 4, 4),
    "medium": RowsConfig(64, 128, 64, 16, 4, 3),
    "large": RowsConfig(128, 128, 64, 16, 8, 3),
}
_GEMM_CONFIGS_FP32 = {  # 4-byte operands: halve BLOCK_K so the pipeline fits shared memory on sm_80
    "small": RowsConfig(16, 64, 32, 16, 4, 3),
    "medium": RowsConfig(64, 128, 32, 16, 4, 3),
    "large": RowsConfig(128, 128, 32, 16, 8, 3),
}
# Shrink / dB,dS / dA: [BLOCK_M, BLOCK_R] products streamed over K, one N block, one K block. block_r here is the
# rank block of dB,dS and dA; the shrink's is picked from r_max (one rank block reads x, and draws its mask, once).
_RANK_CONFIGS = {
    "small": RowsConfig(16, 64, 128, 16, 4, 3),
    "large": RowsConfig(64, 64, 64, 16, 4, 3),
}
_SHRINK_RANK_BLOCKS = (16, 64)


def _size_class(M: int, n_adapters: int) -> str:
    rows_per_adapter = M / max(1, n_adapters)
    return "small" if rows_per_adapter <= 32 else ("medium" if rows_per_adapter <= 256 else "large")


def gemm_config(M: int, n_adapters: int, dtype: torch.dtype) -> RowsConfig:
    table = _GEMM_CONFIGS_FP32 if dtype == torch.float32 else _GEMM_CONFIGS
    return table[_size_class(M, n_adapters)]


def rank_config(M: int, n_adapters: int) -> RowsConfig:
    return _RANK_CONFIGS["small" if _size_class(M, n_adapters) == "small" else "large"]


def shrink_rank_block(r_max: int) -> int:
    return _SHRINK_RANK_BLOCKS[0] if r_max <= _SHRINK_RANK_BLOCKS[0] else _SHRINK_RANK_BLOCKS[1]


_ADAPTER_TABLES: dict = {}


def adapter_table(rank_ptr, dropout_p, device):
    """(rank_ptr int32 [n+1], threshold int32 [n], inv_keep fp32 [n]) on the device, cached per configuration.

    The cache means one host-to-device copy per configuration, so a warmed-up call is capturable in a CUDA graph.
    """
    key = (str(device), tuple(int(r) for r in rank_ptr), tuple(float(p) for p in dropout_p))
    hit = _ADAPTER_TABLES.get(key)
    if hit is None:
        params = [dropout_params(p) for p in dropout_p] or [(0, 1.0)]
        hit = (torch.tensor([int(r) for r in rank_ptr], dtype=torch.int32, device=device),
               torch.tensor([th for th, _ in params], dtype=torch.int32, device=device),
               torch.tensor([ik for _, ik in params], dtype=torch.float32, device=device))
        if len(_ADAPTER_TABLES) > 256:
            _ADAPTER_TABLES.clear()
        _ADAPTER_TABLES[key] = hit
    return hit


def _precision(*tensors: torch.Tensor) -> str:
    if any(t.dtype == torch.float32 for t in tensors) and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _rank_max(rank_ptr) -> int:
    return max([1] + [int(rank_ptr[i + 1]) - int(rank_ptr[i]) for i in range(len(rank_ptr) - 1)])


def _launch_gemm(out, inp, weight_view_strides, weight, bias, lhs, rmat, rmat_strides, order, tiles, table, seed,
                 dropout: bool, cfg: RowsConfig, precision: str):
    red = inp.shape[1]
    n_out = out.shape[1]
    grid = (tiles.shape[0], triton.cdiv(n_out, cfg.block_n))
    _rows_gemm_kernel[grid](
        out, inp, weight, bias if bias is not None else out, lhs, rmat, order, tiles, table[0], table[1], table[2],
        seed, n_out, red, inp.stride(0), inp.stride(1), weight_view_strides[0], weight_view_strides[1],
        out.stride(0), lhs.stride(0), rmat_strides[0], rmat_strides[1],
        HAS_BIAS=bias is not None, DROPOUT=dropout, GROUPS_OF_4=n_out % 4 == 0, PRECISION=precision,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_R=cfg.block_r,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def lora_rows_fwd(x, weight, bias, lora_a, lora_b, scale, rank_ptr, row_ids, dropout_p, seed):
    """(y [M, N], t [M, r_max] fp32); see CONTRACT.md."""
    M, K = x.shape
    N = weight.shape[0]
    R = lora_a.shape[0]
    n = len(rank_ptr) - 1
    r_max = _rank_max(rank_ptr)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    t = torch.empty(M, r_max, dtype=torch.float32, device=x.device)
    if M == 0:
        return y, t
    dropout = any(float(p) > 0.0 for p in dropout_p)
    table = adapter_table(rank_ptr, dropout_p, x.device)
    scfg, gcfg = rank_config(M, n), gemm_config(M, n, x.dtype)
    block_r = shrink_rank_block(r_max)
    order, tiles_s, tiles_g = group_rows(row_ids, n, scfg.block_m, gcfg.block_m)
    precision = _precision(x, lora_a)
    _rows_shrink_kernel[(tiles_s.shape[0], triton.cdiv(r_max, block_r))](
        t, x, lora_a, scale, order, tiles_s, table[0], table[1], table[2], seed, K, r_max,
        x.stride(0), x.stride(1), t.stride(0), DROPOUT=dropout, GROUPS_OF_4=K % 4 == 0, PRECISION=precision,
        BLOCK_M=scfg.block_m, BLOCK_K=scfg.block_k, BLOCK_R=block_r, num_warps=scfg.num_warps,
        num_stages=scfg.num_stages)
    # W^T as [K, N]: element (k, n) at n*K + k; B_a^T as [r, N]: element (r, n) at n*R + r.
    _launch_gemm(y, x, (1, K), weight, bias, t, lora_b, (1, R), order, tiles_g, table, seed, False, gcfg,
                 precision)
    return y, t


def lora_rows_bwd(dy, x, weight, lora_a, lora_b, scale, t, rank_ptr, row_ids, dropout_p, seed, need_dx):
    """(dx [M, K] or None, dA [R, K], dB [N, R]); each adapter's gradient comes only from its rows."""
    M, K = x.shape
    N = weight.shape[0]
    R = lora_a.shape[0]
    n = len(rank_ptr) - 1
    r_max = _rank_max(rank_ptr)
    dev = x.device
    da32 = torch.zeros(R, K, dtype=torch.float32, device=dev)
    db32 = torch.zeros(N, R, dtype=torch.float32, device=dev)
    dx = torch.empty(M, K, dtype=x.dtype, device=dev) if need_dx else None
    if M > 0:
        dropout = any(float(p) > 0.0 for p in dropout_p)
        table = adapter_table(rank_ptr, dropout_p, dev)
        rcfg, gcfg = rank_config(M, n), gemm_config(M, n, x.dtype)
        order, tiles_r, tiles_g = group_rows(row_ids, n, rcfg.block_m, gcfg.block_m)
        precision = _precision(x, lora_a)
        ds32 = torch.zeros(M, r_max, dtype=torch.float32, device=dev)
        _rows_bwd_db_ds_kernel[(tiles_r.shape[0], triton.cdiv(N, rcfg.block_n))](
            db32, ds32, dy, t, lora_b, scale, order, tiles_r, table[0], N, R, dy.stride(0), dy.stride(1),
            t.stride(0), ds32.stride(0), PRECISION=precision, BLOCK_M=rcfg.block_m, BLOCK_N=rcfg.block_n,
            BLOCK_R=rcfg.block_r, num_warps=rcfg.num_warps, num_stages=rcfg.num_stages)
        _rows_bwd_da_kernel[(tiles_r.shape[0], triton.cdiv(K, rcfg.block_k))](
            da32, ds32, x, order, tiles_r, table[0], table[1], table[2], seed, K, x.stride(0), x.stride(1),
            ds32.stride(0), DOT_IN_X_DTYPE=lora_a.dtype == x.dtype, DROPOUT=dropout, GROUPS_OF_4=K % 4 == 0,
            PRECISION=precision, BLOCK_M=rcfg.block_m, BLOCK_K=rcfg.block_k, BLOCK_R=rcfg.block_r,
            num_warps=rcfg.num_warps, num_stages=rcfg.num_stages)
        if need_dx:
            # W as [N, K] (row-major as stored); A_a as [r, K].
            _launch_gemm(dx, dy, (K, 1), weight, None, ds32, lora_a, (K, 1), order, tiles_g, table, seed, dropout,
                         gcfg, precision)
    return dx, da32.to(lora_a.dtype), db32.to(lora_b.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Ahead-of-time compilation specs
# ----------------------------------------------------------------------------------------------------------------

def _spec(name, fn, types: dict, consts: dict, cfg: RowsConfig, hmma_on_sm90: bool, tensor_cores: bool = True):
    """A KernelSpec as Triton specializes the launch: unit strides are constexpr 1 (ints equal to 1 always are)."""
    from fused_lora.kernels.spec import KernelSpec

    signature = {arg: ("constexpr" if arg in consts else types[arg]) for arg in fn.arg_names}
    extra = {"sm90_mma": "HMMA"} if hmma_on_sm90 else {}
    return KernelSpec(name=name, fn=fn, signature=signature, constexprs=consts, num_warps=cfg.num_warps,
                      num_stages=cfg.num_stages, uses_tensor_cores=tensor_cores, extra=extra)


def codegen_specs():
    specs = []
    for dt in ("fp16", "bf16"):
        p = f"*{dt}"
        for size, cfg in _GEMM_CONFIGS.items():
            for role in ("fwd", "dx"):  # forward: bias, no dropout, W^T and B^T views; dX: dropout, W and A
                unit = dict(stride_ik=1, stride_wr=1, stride_rr=1) if role == "fwd" else \
                    dict(stride_ik=1, stride_wc=1, stride_rc=1)
                consts = dict(HAS_BIAS=role == "fwd", DROPOUT=role == "dx", GROUPS_OF_4=True, PRECISION="ieee",
                              BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_R=cfg.block_r,
                              **unit)
                types = dict(out_ptr=p, inp_ptr=p, w_ptr=p, bias_ptr=p, lhs_ptr="*fp32", rmat_ptr=p,
                             order_ptr="*i32", tiles_ptr="*i32", rank_ptr_ptr="*i32", threshold_ptr="*i32",
                             inv_keep_ptr="*fp32", seed_ptr="*i64", N_OUT="i32", RED="i32", stride_im="i32",
                             stride_wr="i32", stride_wc="i32", stride_om="i32", stride_lm="i32", stride_rr="i32",
                             stride_rc="i32")
                specs.append(_spec(f"rows_gemm_{role}[{size},BM={cfg.block_m},BN={cfg.block_n},BK={cfg.block_k},{dt}]",
                                   _rows_gemm_kernel, types, consts, cfg, cfg.block_m < 64))
        for size, cfg in _RANK_CONFIGS.items():
            for block_r in _SHRINK_RANK_BLOCKS:
                consts = dict(DROPOUT=True, GROUPS_OF_4=True, PRECISION="ieee", BLOCK_M=cfg.block_m,
                              BLOCK_K=cfg.block_k, BLOCK_R=block_r, stride_xk=1)
                types = dict(t_ptr="*fp32", x_ptr=p, a_ptr=p, scale_ptr="*fp32", order_ptr="*i32",
                             tiles_ptr="*i32", rank_ptr_ptr="*i32", threshold_ptr="*i32", inv_keep_ptr="*fp32",
                             seed_ptr="*i64", K="i32", R_MAX="i32", stride_xm="i32", stride_tm="i32")
                specs.append(_spec(f"rows_shrink[{size},BM={cfg.block_m},BK={cfg.block_k},BR={block_r},{dt}]",
                                   _rows_shrink_kernel, types, consts, cfg, cfg.block_m < 64))
            consts = dict(PRECISION="ieee", BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_R=cfg.block_r,
                          stride_dyn=1)
            types = dict(db_ptr="*fp32", ds_ptr="*fp32", dy_ptr=p, t_ptr="*fp32", b_ptr=p, scale_ptr="*fp32",
                         order_ptr="*i32", tiles_ptr="*i32", rank_ptr_ptr="*i32", N="i32", R="i32",
                         stride_dym="i32", stride_tm="i32", stride_dsm="i32")
            # dB = dY^T t has BLOCK_N (64) MMA rows: wgmma on sm_90 even for 16-row tiles.
            specs.append(_spec(f"rows_bwd_db_ds[{size},BM={cfg.block_m},BN={cfg.block_n},BR={cfg.block_r},{dt}]",
                               _rows_bwd_db_ds_kernel, types, consts, cfg, False))
            consts = dict(DOT_IN_X_DTYPE=True, DROPOUT=True, GROUPS_OF_4=True, PRECISION="ieee",
                          BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, BLOCK_R=cfg.block_r, stride_xk=1)
            types = dict(da_ptr="*fp32", ds_ptr="*fp32", x_ptr=p, order_ptr="*i32", tiles_ptr="*i32",
                         rank_ptr_ptr="*i32", threshold_ptr="*i32", inv_keep_ptr="*fp32", seed_ptr="*i64", K="i32",
                         stride_xm="i32", stride_dsm="i32")
            specs.append(_spec(f"rows_bwd_da[{size},BM={cfg.block_m},BK={cfg.block_k},BR={cfg.block_r},{dt}]",
                               _rows_bwd_da_kernel, types, consts, cfg, False))
    for n_groups in (8, 64):
        g_p2 = triton.next_power_of_2(n_groups)
        consts = dict(G_P2=g_p2, BLOCK=_group_block(g_p2), BLOCK_ROWS_A=16, BLOCK_ROWS_B=64)
        types = dict(row_ids_ptr="*i64", order_ptr="*i32", tiles_a_ptr="*i32", tiles_b_ptr="*i32", M="i32",
                     N_GROUPS="i32", N_TILES_A="i32", N_TILES_B="i32")
        specs.append(_spec(f"rows_group[G_P2={g_p2}]", _group_rows_kernel, types, consts,
                           RowsConfig(0, 0, 0, 0, 4, 1), False, tensor_cores=False))
    return specs
