"""Backward of the rank term (W frozen): dS and dB from one read of dY, dA split over M and reduced.

    ds_db_kernel:        grid (M tiles, rank chunks). Each program streams its dY row band once over all N:
                         dS[band] = (dY B) * scale stays in registers; dB's contribution of the band,
                         dY[band]^T t[band], goes to an fp32 partial buffer [M tiles, N, R].
    da_partial_kernel:   grid (K tiles, segments, M splits): partial dA = dS_seg^T drop_seg(x) over one M split.
    sum_partials_kernel: out = sum over the leading axis of an fp32 partial buffer, cast once.
Fixed reduction order (no atomics), so gradients are bit-reproducible run to run.
"""
from __future__ import annotations

import triton
import triton.language as tl

from fused_lora.kernels.philox import SEG_FIELDS, SEG_HI, SEG_INV_KEEP, SEG_LO, SEG_SALT, SEG_THRESHOLD, \
    keep_mask_tile
from fused_lora.kernels.spec import KernelSpec


@triton.jit
def ds_db_kernel(dy_ptr, b_ptr, t_ptr, scale_ptr, ds_ptr, dbp_ptr, M, N, R,
                 stride_dym, stride_dyn, stride_tm, stride_dsm,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_n = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    r_ok = ranks < R
    rows_in = (rows % M).to(tl.int64)
    # rows past M load t = 0, so they add nothing to dB although their dY rows are wrapped duplicates
    t_band = tl.load(t_ptr + rows_in[:, None] * stride_tm + ranks[None, :],
                     mask=row_ok[:, None] & r_ok[None, :], other=0.0).to(b_ptr.dtype.element_ty)
    ds_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    dbp_band = dbp_ptr + pid_m.to(tl.int64) * N * R
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + offs_n
        n_ok = cols < N
        dy = tl.load(dy_ptr + rows_in[:, None] * stride_dym + cols[None, :] * stride_dyn, mask=n_ok[None, :],
                     other=0.0).to(b_ptr.dtype.element_ty)
        bt = tl.load(b_ptr + cols.to(tl.int64)[:, None] * R + ranks[None, :], mask=n_ok[:, None] & r_ok[None, :],
                     other=0.0)
        ds_acc = tl.dot(dy, bt, ds_acc, input_precision=PRECISION)
        db_part = tl.dot(tl.trans(dy), t_band, input_precision=PRECISION)
        tl.store(dbp_band + cols.to(tl.int64)[:, None] * R + ranks[None, :], db_part,
                 mask=n_ok[:, None] & r_ok[None, :])
    ds_acc = ds_acc * tl.load(scale_ptr + ranks, mask=r_ok, other=0.0)[None, :]
    tl.store(ds_ptr + rows.to(tl.int64)[:, None] * stride_dsm + ranks[None, :], ds_acc,
             mask=row_ok[:, None] & r_ok[None, :])


@triton.jit
def da_partial_kernel(ds_ptr, x_ptr, a_ptr, seg_ptr, seed_ptr, dap_ptr, M, K, R, rows_per_split,
                      stride_dsm, stride_xm, stride_xk,
                      BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                      HAS_DROPOUT: tl.constexpr, PACKED: tl.constexpr, PRECISION: tl.constexpr):
    # a_ptr is only read for its dtype: products run in the adapter dtype (x's dtype or fp32)
    compute_ty = a_ptr.dtype.element_ty
    cols = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    seg = seg_ptr + tl.program_id(1) * SEG_FIELDS
    split = tl.program_id(2)
    lo = tl.load(seg + SEG_LO)
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < tl.load(seg + SEG_HI) - lo
    k_ok = cols < K
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
        salt = tl.load(seg + SEG_SALT)
        threshold = tl.load(seg + SEG_THRESHOLD)
    first = split * rows_per_split
    last = tl.minimum(first + rows_per_split, M)
    # dA^T = drop(x)^T dS: BLOCK_K (>= 64) is the MMA's M dimension, so sm_90 runs wgmma even at rank 16
    acc = tl.zeros((BLOCK_K, BLOCK_R), dtype=tl.float32)
    for m0 in range(first, last, BLOCK_M):
        rows = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        row_ok = rows < last
        ds = tl.load(ds_ptr + rows[:, None] * stride_dsm + (lo + offs_r)[None, :],
                     mask=row_ok[:, None] & r_ok[None, :], other=0.0)
        xt = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
                     mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            if threshold > 0:
                keep = keep_mask_tile(seed, rows * K, tl.program_id(0) * BLOCK_K, salt, threshold, BLOCK_K, PACKED)
                xt = tl.where(keep, xt, 0.0)
        acc = tl.dot(tl.trans(xt.to(compute_ty)), ds.to(compute_ty), acc, input_precision=PRECISION)
    if HAS_DROPOUT:
        acc = acc * tl.load(seg + SEG_INV_KEEP).to(tl.float32, bitcast=True)
    out = dap_ptr + split.to(tl.int64) * R * K + (lo + offs_r).to(tl.int64)[None, :] * K + cols[:, None]
    tl.store(out, acc, mask=k_ok[:, None] & r_ok[None, :])


@triton.jit
def sum_partials_kernel(p_ptr, out_ptr, S, X, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < X
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(S):
        acc += tl.load(p_ptr + s * X + idx, mask=ok, other=0.0)
    tl.store(out_ptr + idx, acc.to(out_ptr.dtype.element_ty), mask=ok)


SUM_BLOCK = 1024
TARGET_PROGRAMS = 264  # about two waves on an H100 (132 SMs)


def ds_db_config(dtype_bytes: int) -> dict:
    return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)


def da_config(dtype_bytes: int, has_dropout: bool, packed: bool) -> dict:
    # one Philox call per element (K % 4 != 0) next to a 64 x 64 accumulator spills with 4 warps on sm_90
    per_element_mask = has_dropout and not packed
    return dict(BLOCK_M=64, BLOCK_K=64 if dtype_bytes == 2 else 32, num_warps=8 if per_element_mask else 4,
                num_stages=3)


DROPOUT_VARIANTS = ((False, False), (True, True), (True, False))  # (HAS_DROPOUT, PACKED)


def _sum_partials(partials, out):
    S = partials.shape[0]
    X = out.numel()
    sum_partials_kernel[(triton.cdiv(X, SUM_BLOCK),)](partials, out, S, X, BLOCK=SUM_BLOCK, num_warps=4)


def launch_ds_db(dy, lora_b, t, scale, ds, db, block_r, precision):
    """ds (fp32 [M, R]) and db ([N, R], adapter dtype) from dy; M > 0 and R > 0."""
    M, N = dy.shape
    R = lora_b.shape[1]
    cfg = ds_db_config(lora_b.element_size())
    tiles_m = triton.cdiv(M, cfg["BLOCK_M"])
    partials = dy.new_empty((tiles_m, N, R), dtype=ds.dtype)
    ds_db_kernel[(tiles_m, triton.cdiv(R, block_r))](
        dy, lora_b, t, scale, ds, partials, M, N, R, dy.stride(0), dy.stride(1), t.stride(0), ds.stride(0),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_R=block_r, PRECISION=precision,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    _sum_partials(partials, db)


def launch_da(ds, x, lora_a, seg_table, n_segs, seed, da, block_r, has_dropout, precision):
    """da ([R, K], adapter dtype) = sum over segments of dS_seg^T drop_seg(x); M > 0 and R > 0."""
    M, K = x.shape
    R = lora_a.shape[0]
    packed = has_dropout and K % 4 == 0
    cfg = da_config(lora_a.element_size(), has_dropout, packed)
    tiles_k = triton.cdiv(K, cfg["BLOCK_K"])
    tiles_m = triton.cdiv(M, cfg["BLOCK_M"])
    splits = max(1, min(tiles_m, TARGET_PROGRAMS // max(1, tiles_k * n_segs)))
    rows_per_split = triton.cdiv(tiles_m, splits) * cfg["BLOCK_M"]
    splits = triton.cdiv(M, rows_per_split)
    partials = x.new_empty((splits, R, K), dtype=ds.dtype)
    da_partial_kernel[(tiles_k, n_segs, splits)](
        ds, x, lora_a, seg_table, seed, partials, M, K, R, rows_per_split, ds.stride(0), x.stride(0), x.stride(1),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_K=cfg["BLOCK_K"], BLOCK_R=block_r, HAS_DROPOUT=has_dropout,
        PACKED=packed, PRECISION=precision, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    _sum_partials(partials, da)


def codegen_specs() -> list[KernelSpec]:
    specs = []
    for dt in ("fp16", "bf16"):
        for block_r in (16, 64):
            cfg = ds_db_config(2)
            sig = {"dy_ptr": f"*{dt}", "b_ptr": f"*{dt}", "t_ptr": "*fp32", "scale_ptr": "*fp32", "ds_ptr": "*fp32",
                   "dbp_ptr": "*fp32", "M": "i32", "N": "i32", "R": "i32", "stride_dym": "i32",
                   "stride_dyn": "constexpr", "stride_tm": "i32", "stride_dsm": "i32", "BLOCK_M": "constexpr",
                   "BLOCK_N": "constexpr", "BLOCK_R": "constexpr", "PRECISION": "constexpr"}
            const = dict(stride_dyn=1, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_R=block_r,
                         PRECISION="ieee")
            specs.append(KernelSpec(name=f"ds_db[BM={cfg['BLOCK_M']},BN={cfg['BLOCK_N']},BR={block_r},{dt}]",
                                    fn=ds_db_kernel, signature=sig, constexprs=const,
                                    num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
            for dropout, packed in DROPOUT_VARIANTS:
                cfg = da_config(2, dropout, packed)
                sig = {"ds_ptr": "*fp32", "x_ptr": f"*{dt}", "a_ptr": f"*{dt}", "seg_ptr": "*i32", "seed_ptr": "*i64",
                       "dap_ptr": "*fp32", "M": "i32", "K": "i32", "R": "i32", "rows_per_split": "i32",
                       "stride_dsm": "i32", "stride_xm": "i32", "stride_xk": "constexpr", "BLOCK_M": "constexpr",
                       "BLOCK_K": "constexpr", "BLOCK_R": "constexpr", "HAS_DROPOUT": "constexpr",
                       "PACKED": "constexpr", "PRECISION": "constexpr"}
                const = dict(stride_xk=1, BLOCK_M=cfg["BLOCK_M"], BLOCK_K=cfg["BLOCK_K"], BLOCK_R=block_r,
                             HAS_DROPOUT=dropout, PACKED=packed, PRECISION="ieee")
                specs.append(KernelSpec(
                    name=(f"da_partial[BM={cfg['BLOCK_M']},BK={cfg['BLOCK_K']},BR={block_r},dropout={dropout},"
                          f"packed={packed},{dt}]"),
                    fn=da_partial_kernel, signature=sig, constexprs=const,
                    num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
        for out_dt in (dt,):
            specs.append(KernelSpec(name=f"sum_partials[BLOCK={SUM_BLOCK},{out_dt}]", fn=sum_partials_kernel,
                                    signature={"p_ptr": "*fp32", "out_ptr": f"*{out_dt}", "S": "i32", "X": "i32",
                                               "BLOCK": "constexpr"},
                                    constexprs={"BLOCK": SUM_BLOCK}, num_warps=4, num_stages=1,
                                    uses_tensor_cores=False))
    return specs
