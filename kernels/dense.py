"""Launchers of the dense ops of fused_lora/ops/CONTRACT.md on Triton: lora_fwd, lora_bwd, dropout_keep.

Inputs arrive validated and 2-D (see the contract). Every launcher also takes optional preallocated outputs
(tests pass NaN-filled ones to prove each element is written). Paths (kernels/launch_plan.py lists the launches
for any shape without running them):
    forward, M <= 64 (decode):  decode_kernel, one launch split over K; the shrink rides in its K loop
                                (R <= 32), else a split shrink first
    forward, M > 64:            shrink_kernel (split over K) then fused_gemm_kernel (rank term in the accumulator)
    (a launch that reads the t of the shrink launched just before it overlaps that shrink on sm_90 when
    FUSED_LORA_PDL=1: kernels/config.py)
    backward:                   ds_kernel, db_kernel, da_kernel (each split, fixed-order reductions), then
                                fused_gemm_kernel for dX
No host synchronisation anywhere: the seed stays on the device, descriptors are cached device tensors.
"""

from __future__ import annotations

import torch
import triton

from fused_lora.kernels import config
from fused_lora.kernels.decode import DECODE_M_MAX, DENSE_T, launch_decode, rank_mode

# the Hopper (TMA, persistent) core where it is selected (sm_90, tuned or forced), else the tutorial core
from fused_lora.kernels.fused_gemm_tma import launch_fused_gemm_selected as launch_fused_gemm
from fused_lora.kernels.lora_backward import launch_da, launch_db, launch_ds
from fused_lora.kernels.philox import (
    DROPOUT_KEEP_BLOCK,
    _dropout_keep_kernel,
    dropout_params,
    segment_runs,
    segment_table,
)
from fused_lora.kernels.shrink import launch_shrink

PATHS = ("small_m", "large_m")


def segment_block(rank_ptr, dropout_p) -> int:
    """Rank tile of a segment: 16 covers the usual r <= 16 with no padding waste; wider runs use 64 (and split
    beyond it)."""
    widest = max([hi - lo for lo, hi, _, _ in segment_runs(rank_ptr, dropout_p)], default=0)
    return 16 if widest <= 16 else 64


def forward_path(M: int, path=None) -> str:
    if path is None:
        return "small_m" if M <= DECODE_M_MAX else "large_m"
    if path not in PATHS:
        raise ValueError(f"path must be None, 'small_m' or 'large_m', got {path!r}")
    return path


def _out(given, shape, dtype, device):
    if given is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(given.shape) != tuple(shape) or given.dtype != dtype or not given.is_contiguous():
        raise ValueError(
            f"preallocated output must be contiguous {tuple(shape)} {dtype}, got {tuple(given.shape)} {given.dtype}"
        )
    return given


def lora_fwd(x, weight, bias, lora_a, lora_b, scale, rank_ptr, dropout_p, seed, *, path=None, y_out=None, t_out=None):
    """(y [M, N], t [M, R] fp32). path: None (by M), "small_m" or "large_m" to force one."""
    M, K = x.shape
    N, R = weight.shape[0], lora_a.shape[0]
    y = _out(y_out, (M, N), x.dtype, x.device)
    t = _out(t_out, (M, R), torch.float32, x.device)
    path = forward_path(M, path)
    if M == 0:
        return y, t
    block_r = segment_block(rank_ptr, dropout_p)
    seg_table, n_segs = segment_table(rank_ptr, dropout_p, block_r, x.device)
    has_dropout = any(float(p) > 0.0 for p in dropout_p)
    precision = config.precision(x, lora_a)
    if path == "small_m" and N > 0:
        shrunk = rank_mode(False, R, n_segs) == DENSE_T
        if shrunk:
            launch_shrink(x, lora_a, scale, seg_table, n_segs, seed, t, block_r, has_dropout, precision)
        launch_decode(
            x,
            weight,
            bias,
            lora_a,
            lora_b,
            scale,
            seg_table,
            n_segs,
            seed,
            y,
            t,
            has_dropout,
            precision,
            after_shrink=shrunk,
        )
        return y, t
    if n_segs > 0:
        launch_shrink(x, lora_a, scale, seg_table, n_segs, seed, t, block_r, has_dropout, precision)
    if N > 0:
        launch_fused_gemm(
            x,
            weight,
            (weight.stride(1), weight.stride(0)),
            bias,
            t,
            lora_b,
            (lora_b.stride(0), lora_b.stride(1)),
            R,
            seg_table,
            n_segs,
            seed,
            y,
            block_r,
            lora_dropout=False,
            precision=precision,
            after_shrink=n_segs > 0,
        )
    return y, t


def lora_bwd(
    dy,
    x,
    weight,
    lora_a,
    lora_b,
    scale,
    t,
    rank_ptr,
    dropout_p,
    seed,
    need_dx,
    *,
    dx_out=None,
    da_out=None,
    db_out=None,
):
    """(dx [M, K] or None, dA [R, K], dB [N, R])."""
    M, K = x.shape
    N, R = weight.shape[0], lora_a.shape[0]
    dx = _out(dx_out, (M, K), x.dtype, x.device) if need_dx else None
    da = _out(da_out, (R, K), lora_a.dtype, x.device)
    db = _out(db_out, (N, R), lora_b.dtype, x.device)
    if M == 0:
        da.zero_()
        db.zero_()
        return dx, da, db
    block_r = segment_block(rank_ptr, dropout_p)
    seg_table, n_segs = segment_table(rank_ptr, dropout_p, block_r, x.device)
    has_dropout = any(float(p) > 0.0 for p in dropout_p)
    precision = config.precision(x, lora_a)
    ds = torch.empty((M, R), dtype=torch.float32, device=x.device)
    if R > 0:
        launch_ds(dy, lora_b, scale, ds, seg_table, precision)
        if N > 0:
            launch_db(dy, t, db, seg_table, precision)
        if K > 0:
            launch_da(ds, x, lora_a, seg_table, n_segs, seed, da, block_r, has_dropout, precision)
    if need_dx and K > 0:
        launch_fused_gemm(
            dy,
            weight,
            (weight.stride(0), weight.stride(1)),
            None,
            ds if R > 0 else None,
            lora_a,
            (lora_a.stride(1), lora_a.stride(0)),
            R,
            seg_table,
            n_segs,
            seed,
            dx,
            block_r,
            lora_dropout=has_dropout,
            precision=precision,
        )
    return dx, da, db


def dropout_keep(seed, M, K, p, salt, *, out=None):
    """The keep mask [M, K] (bool) on seed's device, bit-identical to fused_lora.reference.dropout_keep."""
    if float(p) <= 0.0:
        return torch.ones((M, K), dtype=torch.bool, device=seed.device)
    mask = _out(out, (M, K), torch.uint8, seed.device)
    numel = M * K
    if numel > 0:
        threshold, _ = dropout_params(p)
        _dropout_keep_kernel[(triton.cdiv(numel, DROPOUT_KEEP_BLOCK),)](
            seed, mask, numel, int(salt), threshold, BLOCK=DROPOUT_KEEP_BLOCK, num_warps=4
        )
    return mask.view(torch.bool)
