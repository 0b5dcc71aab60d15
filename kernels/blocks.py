"""Device-side building blocks: every kernel of the package is assembled from these, one copy of each.

    grouped_tile   program id -> (row tile, column tile); GROUP_M row tiles sweep the columns together (L2 reuse)
    split_range    the contiguous, balanced share of a reduction axis that one split owns
    dot_k_range    the K loop: acc += A[:, k range] @ B[k range, :], with an optional dropout mask on A
    row_adapters   per row: whether it takes an adapter, its adapter-table entry, its ranks [lo, hi)
    row_dropout    per row: the dropout salt, threshold and 1/(1-p) of its adapter
    rank_term      acc += L @ Rm over the stacked rank axis, L dense or gathered per row (below)
    arrive_last    split reductions: True in the program that arrives last at a counter
    sum_splits     the fixed-order sum of every split's partial
    reduce_splits  both for one tile: store, arrive, and (last program) sum; a no-op without a split

Stacked rank axis. Adapters are stacked along the rank axis (lora_a [R, K], lora_b [N, R]). A dense rank term
uses every rank for every row. A per-row one uses, for row m, only its adapter's ranks [lo_m, hi_m); its left
operand is kept compact ([M, r_max], column j = rank lo_m + j) and `rank_term` places it at those ranks while it
loads, so the product with the stacked right operand is one ordinary matmul per rank chunk whatever the mix of
adapters in a tile (Punica's BGMV idea on tensor cores). Chunks that no row of the tile uses are skipped.

Split reductions. A launch that splits a reduction axis over programs (to fill the GPU) reduces without float
atomics and in a fixed order, so results are bit-reproducible (the split count is a run-time argument: with one
split no partial is stored and no counter touched):
    1. every split stores its fp32 partial at part + split * split_stride;
    2. `arrive_last(counter, n_splits)`: a CTA barrier, then one acq_rel atomic increment of the tile's counter;
       the program that draws the last ticket resets the counter to 0 (every kernel leaves counters zeroed);
    3. that program alone loads the partials with `sum_splits`, in split order 0, 1, ..., n-1, and finishes the
       tile (epilogue, rounding, store).
This is CUTLASS's serial split-K semaphore pattern: barrier before the release, acquire before the reads. A second
launch for the reduction would cost a launch gap (~2-4 us) that the decode kernels cannot afford.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fused_lora.kernels.philox import SEG_FIELDS, SEG_HI, SEG_INV_KEEP, SEG_LO, SEG_SALT, SEG_THRESHOLD, keep_mask_tile


@triton.jit
def grouped_tile(pid, tiles_m, tiles_n, GROUP_M: tl.constexpr):
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def split_range(split, n_splits, steps, BLOCK: tl.constexpr):
    """Element range [begin, end) of split `split` of n_splits over `steps` blocks of BLOCK: contiguous, sizes
    differing by at most one block (any n_splits <= steps works, not only divisors)."""
    begin = (split * steps) // n_splits
    end = ((split + 1) * steps) // n_splits
    return begin * BLOCK, end * BLOCK


@triton.jit
def dot_k_range(
    acc,
    a_ptrs,
    b_ptrs,
    a_ok,
    b_ok,
    k_begin,
    k_end,
    K,
    stride_ak,
    stride_bk,
    seed,
    row_elem,
    salt,
    threshold,
    DROPOUT: tl.constexpr,
    PACKED: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """acc += A[:, k_begin:k_end] @ B[k_begin:k_end, :], BLOCK_K at a time; K bounds the masks.

    a_ptrs: [BM, BLOCK_K] pointers to A at k = k_begin (k along axis 1); b_ptrs: [BLOCK_K, BN] to B at k_begin.
    a_ok [BM] / b_ok [BN]: rows of A / columns of B to load (others read 0); None: all (wrapped indices).
    DROPOUT: A is x and its tile is multiplied by the keep mask of (row, k) (row_elem [BM] = m * K, salt and
    threshold per row, see philox.keep_mask_tile); the 1/(1-p) factor is the caller's. A is cast to B's dtype (the
    adapters are x's dtype or fp32, so the cast never loses bits).
    """
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(k_begin, k_end, BLOCK_K):
        k_ok = offs_k < K - k0
        a_mask = k_ok[None, :]
        if a_ok is not None:
            a_mask = a_ok[:, None] & a_mask
        b_mask = k_ok[:, None]
        if b_ok is not None:
            b_mask = b_mask & b_ok[None, :]
        a = tl.load(a_ptrs, mask=a_mask, other=0.0)
        if DROPOUT:
            a = tl.where(keep_mask_tile(seed, row_elem, k0, salt, threshold, BLOCK_K, PACKED), a, 0.0)
        b = tl.load(b_ptrs, mask=b_mask, other=0.0)
        acc = tl.dot(a.to(b.dtype), b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc


@triton.jit
def row_adapters(row_ids_ptr, rows, row_ok, n_adapters, table_ptr):
    """(has, entry, lo, hi) per row: has an adapter (row_ids in [0, n_adapters); anything else means none), its
    adapter-table entry pointer, its ranks [lo, hi) on the stacked axis (0, 0 without an adapter)."""
    ids = tl.load(row_ids_ptr + rows, mask=row_ok, other=-1)
    has = row_ok & (ids >= 0) & (ids < n_adapters)
    entry = table_ptr + tl.where(has, ids, 0).to(tl.int32) * SEG_FIELDS
    lo = tl.where(has, tl.load(entry + SEG_LO), 0)
    hi = tl.where(has, tl.load(entry + SEG_HI), 0)
    return has, entry, lo, hi


@triton.jit
def row_dropout(has, entry):
    """(salt, threshold, inv_keep) per row from row_adapters' entries; rows without an adapter keep everything."""
    salt = tl.load(entry + SEG_SALT)
    threshold = tl.where(has, tl.load(entry + SEG_THRESHOLD), 0)
    inv_keep = tl.where(has, tl.load(entry + SEG_INV_KEEP).to(tl.float32, bitcast=True), 1.0)
    return salt, threshold, inv_keep


@triton.jit
def rank_term(
    acc,
    lhs_ptr,
    stride_lm,
    rmat_ptr,
    stride_rr,
    stride_rc,
    rows,
    row_ok,
    cols,
    col_ok,
    r_first,
    r_end,
    row_lo,
    row_hi,
    PER_ROW: tl.constexpr,
    TRANSPOSED: tl.constexpr,
    BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """acc += L[rows, r_first:r_end] @ Rm[r_first:r_end, cols] on the stacked rank axis, BLOCK_R ranks at a time.

    Rm[r, c] is at rmat_ptr + r * stride_rr + c * stride_rc (B^T for the forward, A for dX); col_ok None: every
    column is valid (wrapped indices). Dense: L[m, r] = lhs[m, r] (row stride stride_lm). PER_ROW: L[m, r] =
    lhs[m, r - row_lo[m]] for row_lo[m] <= r < row_hi[m], else 0, and only the chunks the tile's rows (row_ok) use
    are visited. TRANSPOSED: acc is [BN, BM] (swap-AB kernels) and takes (L @ Rm)^T. L is cast to Rm's dtype
    before the product (fp32 accumulation).
    """
    offs_r = tl.arange(0, BLOCK_R)
    if PER_ROW:
        used = row_ok & (row_hi > row_lo)
        first = (tl.min(tl.where(used, row_lo, r_end), 0) // BLOCK_R) * BLOCK_R
        end = tl.max(tl.where(used, row_hi, 0), 0)
    else:
        first = r_first
        end = r_end
    for r0 in range(first, end, BLOCK_R):
        ranks = r0 + offs_r
        if PER_ROW:
            inside = (ranks[None, :] >= row_lo[:, None]) & (ranks[None, :] < row_hi[:, None]) & row_ok[:, None]
            lhs_ptrs = lhs_ptr + rows[:, None] * stride_lm + (ranks[None, :] - row_lo[:, None])
            touched = tl.sum(tl.sum(inside.to(tl.int32), 1), 0) > 0
        else:
            inside = (ranks < r_end)[None, :]
            lhs_ptrs = lhs_ptr + rows[:, None] * stride_lm + ranks[None, :]
            touched = True
        if touched:
            r_mask = (ranks < r_end)[:, None]
            if col_ok is not None:
                r_mask = r_mask & col_ok[None, :]
            rmat = tl.load(
                rmat_ptr + ranks.to(tl.int64)[:, None] * stride_rr + cols[None, :] * stride_rc, mask=r_mask, other=0.0
            )
            lhs = tl.load(lhs_ptrs, mask=inside, other=0.0).to(rmat.dtype)
            if TRANSPOSED:
                acc = tl.dot(tl.trans(rmat), tl.trans(lhs), acc, input_precision=PRECISION)
            else:
                acc = tl.dot(lhs, rmat, acc, input_precision=PRECISION)
    return acc


@triton.jit
def arrive_last(counter_ptr, n_arrivals):
    """True in the program that arrives last (ticket n_arrivals - 1); it resets the counter for the next launch.

    Call after storing this program's partial: the barrier orders every thread's stores before the release of
    the atomic, and the acquire (seen by all threads through the broadcast of the ticket) orders the last
    program's loads of the other partials after their releases.
    """
    tl.debug_barrier()
    ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    last = ticket == n_arrivals - 1
    if last:
        tl.atomic_xchg(counter_ptr, 0, sem="relaxed", scope="gpu")
    return last


@triton.jit
def sum_splits(ptrs, split_stride, n_splits):
    """sum over s = 0, 1, ..., n_splits - 1 (in that order) of the fp32 partials at ptrs + s * split_stride.

    Partials are whole tiles (padding included), so the loads need no mask."""
    total = tl.load(ptrs)
    for _ in range(1, n_splits):
        ptrs += split_stride
        total += tl.load(ptrs)
    return total


@triton.jit
def reduce_splits(acc, part, split, n_splits, split_stride, counter_ptr):
    """(acc, last) for one tile's split reduction. part: this tile's partial pointers for split 0 (a whole tile,
    split s at part + s * split_stride). With n_splits == 1 nothing is stored: (acc, True)."""
    last = n_splits == 1
    if n_splits > 1:
        tl.store(part + split.to(tl.int64) * split_stride, acc)
        last = arrive_last(counter_ptr, n_splits)
        if last:
            acc = sum_splits(part, split_stride, n_splits)
    return acc, last
