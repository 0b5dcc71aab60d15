"""Small-M forward in one launch (decode, M <= 64): y = x W^T + bias + t B^T with t recomputed per program.

At small M the GEMM is bound by reading W, so each program (a BLOCK_N slice of the columns) recomputes the
shrink t = drop(x) A^T * scale for its rows from x and A (both small, served from L2): the extra FLOPs are
free and the separate shrink launch disappears. Programs of the first column slice also store t, which the
backward needs.
"""
from __future__ import annotations

import triton
import triton.language as tl

from fused_lora.kernels.philox import SEG_FIELDS, SEG_HI, SEG_INV_KEEP, SEG_LO, SEG_SALT, SEG_THRESHOLD, \
    keep_mask_tile
from fused_lora.kernels.spec import KernelSpec

SMALL_M_MAX = 64


@triton.jit
def small_m_kernel(x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, scale_ptr, seg_ptr, seed_ptr, y_ptr, t_ptr,
                   M, N, K, R, n_segs, stride_xm, stride_xk, stride_ym, stride_tm,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                   HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, PACKED: tl.constexpr,
                   PRECISION: tl.constexpr):
    # Swap-AB: every product is computed transposed, y^T = W x^T + B t^T, so W's BLOCK_N rows are the MMA's
    # M dimension and the few tokens its N. wgmma (sm_90) needs 64 rows per warpgroup; a 16-token tile in
    # the M slot would fall back to mma.sync, while in the N slot it costs nothing (wgmma N goes down to 8).
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_in = (rows % M).to(tl.int64)
    cols_in = (cols % N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    x_ptrs = x_ptr + rows_in[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + cols_in[:, None] * K + offs_k[None, :]
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        xt = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
        wt = tl.load(w_ptrs, mask=k_ok[None, :], other=0.0)
        acc = tl.dot(wt, tl.trans(xt), acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K

    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
        row_elem = rows_in * K
    for s in range(n_segs):
        seg = seg_ptr + s * SEG_FIELDS
        lo = tl.load(seg + SEG_LO)
        r_ok = offs_r < tl.load(seg + SEG_HI) - lo
        if HAS_DROPOUT:
            salt = tl.load(seg + SEG_SALT)
            threshold = tl.load(seg + SEG_THRESHOLD)
        t_acc = tl.zeros((BLOCK_R, BLOCK_M), dtype=tl.float32)  # t^T of this segment
        x_ptrs = x_ptr + rows_in[:, None] * stride_xm + offs_k[None, :] * stride_xk
        a_ptrs = a_ptr + (lo + offs_r).to(tl.int64)[:, None] * K + offs_k[None, :]
        for k0 in range(0, K, BLOCK_K):
            k_ok = offs_k < K - k0
            xt = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
            at = tl.load(a_ptrs, mask=r_ok[:, None] & k_ok[None, :], other=0.0)
            if HAS_DROPOUT:
                if threshold > 0:
                    keep = keep_mask_tile(seed, row_elem, k0, salt, threshold, BLOCK_K, PACKED)
                    xt = tl.where(keep, xt, 0.0)
            # adapters are x's dtype or fp32, so casting x to the adapter dtype never loses bits
            t_acc = tl.dot(at, tl.trans(xt.to(at.dtype)), t_acc, input_precision=PRECISION)
            x_ptrs += BLOCK_K * stride_xk
            a_ptrs += BLOCK_K
        factor = tl.load(scale_ptr + lo + offs_r, mask=r_ok, other=0.0)
        if HAS_DROPOUT:
            factor = factor * tl.load(seg + SEG_INV_KEEP).to(tl.float32, bitcast=True)
        t_acc = t_acc * factor[:, None]
        if pid_n == 0:
            tl.store(t_ptr + rows.to(tl.int64)[None, :] * stride_tm + (lo + offs_r)[:, None], t_acc,
                     mask=r_ok[:, None] & (rows < M)[None, :])
        bt = tl.load(b_ptr + cols_in[:, None] * R + (lo + offs_r)[None, :], mask=r_ok[None, :], other=0.0)
        acc = tl.dot(bt, t_acc.to(bt.dtype), acc, input_precision=PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols_in).to(tl.float32)[:, None]
    y_ptrs = y_ptr + rows.to(tl.int64)[None, :] * stride_ym + cols[:, None]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(cols < N)[:, None] & (rows < M)[None, :])


def small_m_config(M: int, dtype_bytes: int, has_dropout: bool) -> dict:
    # BLOCK_N = 64: the MMA's M dimension after the swap, the smallest wgmma tile. At N = 4096 that is 64
    # programs pulling W, fewer than an H100 has SMs; a split over K would fill them (to measure on a GPU).
    # BLOCK_K shrinks where a dropout mask or 4-byte operands would otherwise spill.
    block_m = 16 if M <= 16 else 64
    if block_m == 16:
        block_k = 64 if (dtype_bytes == 4 or has_dropout) else 128
    else:  # 64 token rows: with 4 warps, the dropout mask beside two accumulators spilled on sm_80 and sm_90
        block_k = 32 if (dtype_bytes == 4 or has_dropout) else 64
    return dict(BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=block_k, num_warps=4 if block_m == 16 else 8,
                num_stages=4 if dtype_bytes == 2 else 3)


def launch_small_m(x, weight, bias, lora_a, lora_b, scale, seg_table, n_segs, seed, y, t, block_r,
                   has_dropout, precision):
    M, K = x.shape
    N = weight.shape[0]
    cfg = small_m_config(M, x.element_size(), has_dropout)
    grid = (triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(M, cfg["BLOCK_M"]))
    small_m_kernel[grid](x, weight, bias if bias is not None else y, lora_a, lora_b, scale, seg_table, seed, y, t,
                         M, N, K, lora_a.shape[0], n_segs, x.stride(0), x.stride(1), y.stride(0), t.stride(0),
                         BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], BLOCK_R=block_r,
                         HAS_BIAS=bias is not None, HAS_DROPOUT=has_dropout, PACKED=has_dropout and K % 4 == 0,
                         PRECISION=precision, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def codegen_specs() -> list[KernelSpec]:
    specs = []
    variants = ((False, False, False), (True, False, False), (False, True, True), (False, True, False))
    for dt in ("fp16", "bf16"):
        for M in (1, 64):
            for block_r in (16, 64):
                for has_bias, dropout, packed in variants:
                    cfg = small_m_config(M, 2, dropout)
                    sig = {"x_ptr": f"*{dt}", "w_ptr": f"*{dt}", "bias_ptr": f"*{dt}", "a_ptr": f"*{dt}",
                           "b_ptr": f"*{dt}", "scale_ptr": "*fp32", "seg_ptr": "*i32", "seed_ptr": "*i64",
                           "y_ptr": f"*{dt}", "t_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32", "R": "i32",
                           "n_segs": "i32", "stride_xm": "i32", "stride_xk": "constexpr", "stride_ym": "i32",
                           "stride_tm": "i32"}
                    const = dict(stride_xk=1, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
                                 BLOCK_R=block_r, HAS_BIAS=has_bias, HAS_DROPOUT=dropout, PACKED=packed,
                                 PRECISION="ieee")
                    sig.update({n: "constexpr" for n in const if n != "stride_xk"})
                    specs.append(KernelSpec(
                        name=(f"small_m[BM={cfg['BLOCK_M']},BN={cfg['BLOCK_N']},BK={cfg['BLOCK_K']},BR={block_r},"
                              f"bias={has_bias},dropout={dropout},packed={packed},{dt}]"),
                        fn=small_m_kernel, signature=sig, constexprs=const,
                        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
    return specs
