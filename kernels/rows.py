"""Launchers of the per-row (mixed-batch) ops on Triton: every row m uses adapter row_ids[m], or none.

No sorting and no grouping: the base GEMM tiles rows in their order whatever adapters they mix, so W is read once
per row tile as for a single adapter; only the rank term is per row (Punica/BGMV-style, on tensor cores):
    forward   shrink_kernel (PER_ROW): compact t [M, r_max], each row against its own adapter's A and mask;
              then decode_kernel (M <= 64, split over K) or fused_gemm_kernel, whose accumulator takes each row's
              t against its own adapter's columns of B (kernels/blocks.rank_term).
    backward  ds_kernel, db_kernel, da_kernel (PER_ROW: each adapter's gradient from its own rows only), then
              fused_gemm_kernel for dX with each row's own dropout mask.
No host sync: grids depend on M, N, K, the ranks and the configs, never on row_ids, so a warmed-up call can be
captured in a CUDA graph. Row ids outside [-1, n) act as -1 (validating them on a GPU would need a sync).
Matmul operands of the rank term are cast to the adapters' dtype (x's dtype or float32); accumulation is fp32.
"""

from __future__ import annotations

import torch
import triton

from fused_lora.kernels import config
from fused_lora.kernels.decode import DECODE_M_MAX, launch_decode
from fused_lora.kernels.fused_gemm import RANK_CHUNK

# the Hopper (TMA, persistent) core where it is selected (sm_90, tuned or forced), else the tutorial core
from fused_lora.kernels.fused_gemm_tma import launch_fused_gemm_selected as launch_fused_gemm
from fused_lora.kernels.lora_backward import launch_da, launch_db, launch_ds, rank_chunk
from fused_lora.kernels.philox import adapter_table
from fused_lora.kernels.shrink import launch_shrink, per_row_block_r


def rank_max(rank_ptr) -> int:
    """t's width: the widest adapter (at least 1, as the contract says)."""
    return max([1] + [int(rank_ptr[i + 1]) - int(rank_ptr[i]) for i in range(len(rank_ptr) - 1)])


_rank_max = rank_max  # the name tests/test_triton_rows.py imports


def lora_rows_fwd(x, weight, bias, lora_a, lora_b, scale, rank_ptr, row_ids, dropout_p, seed):
    """(y [M, N], t [M, r_max] fp32); see CONTRACT.md."""
    M, K = x.shape
    N = weight.shape[0]
    R = lora_a.shape[0]
    n = len(rank_ptr) - 1
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    t = torch.empty(M, rank_max(rank_ptr), dtype=torch.float32, device=x.device)
    if M == 0:
        return y, t
    dropout = any(float(p) > 0.0 for p in dropout_p)
    table = adapter_table(rank_ptr, dropout_p, x.device)
    precision = config.precision(x, lora_a)
    if R > 0:
        block_r = per_row_block_r(R)
        launch_shrink(
            x,
            lora_a,
            scale,
            table,
            triton.cdiv(R, block_r),
            seed,
            t,
            block_r,
            dropout,
            precision,
            row_ids=row_ids,
            n_adapters=n,
        )
    else:
        t.zero_()
    if N == 0:
        return y, t
    # after_shrink: the shrink writing t was the last launch on the stream (t.zero_() is not ours: no overlap)
    if M <= DECODE_M_MAX:
        launch_decode(
            x,
            weight,
            bias,
            lora_a,
            lora_b,
            scale,
            table,
            n,
            seed,
            y,
            t,
            False,
            precision,
            row_ids=row_ids,
            n_adapters=n,
            after_shrink=R > 0,
        )
    else:
        # W^T as [K, N]: element (k, n) at n*K + k; B^T as [R, N]: element (r, n) at n*R + r
        launch_fused_gemm(
            x,
            weight,
            (1, K),
            bias,
            t,
            lora_b,
            (R, 1),
            R,
            table,
            0,
            seed,
            y,
            RANK_CHUNK,
            False,
            precision,
            row_ids=row_ids,
            n_adapters=n,
            after_shrink=R > 0,
        )
    return y, t


def lora_rows_bwd(dy, x, weight, lora_a, lora_b, scale, t, rank_ptr, row_ids, dropout_p, seed, need_dx):
    """(dx [M, K] or None, dA [R, K], dB [N, R]); each adapter's gradient comes only from its rows."""
    M, K = x.shape
    N = weight.shape[0]
    R = lora_a.shape[0]
    n = len(rank_ptr) - 1
    dev = x.device
    dx = torch.empty(M, K, dtype=x.dtype, device=dev) if need_dx else None
    da = torch.empty(R, K, dtype=lora_a.dtype, device=dev)
    db = torch.empty(N, R, dtype=lora_b.dtype, device=dev)
    if M == 0:
        return dx, da.zero_(), db.zero_()
    dropout = any(float(p) > 0.0 for p in dropout_p)
    table = adapter_table(rank_ptr, dropout_p, dev)
    precision = config.precision(x, lora_a)
    ds = None
    if R > 0:
        # compact like t; a row's columns past its rank are never read (every reader masks by the row's ranks)
        ds = torch.empty(M, rank_max(rank_ptr), dtype=torch.float32, device=dev)
        launch_ds(dy, lora_b, scale, ds, table, precision, row_ids=row_ids, n_adapters=n)
        if N > 0:
            launch_db(dy, t, db, table, precision, row_ids=row_ids, n_adapters=n)
        if K > 0:
            block_r = rank_chunk(R)
            launch_da(
                ds,
                x,
                lora_a,
                table,
                triton.cdiv(R, block_r),
                seed,
                da,
                block_r,
                dropout,
                precision,
                row_ids=row_ids,
                n_adapters=n,
            )
    if need_dx and K > 0:
        # W as [N, K] (row-major as stored); A as [R, K]
        launch_fused_gemm(
            dy,
            weight,
            (K, 1),
            None,
            ds,
            lora_a,
            (1, K),
            R,
            table,
            0,
            seed,
            dx,
            RANK_CHUNK,
            dropout,
            precision,
            row_ids=row_ids,
            n_adapters=n,
        )
    return dx, da, db
