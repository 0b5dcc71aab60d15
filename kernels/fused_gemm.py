"""Fused GEMM: out = a @ b + bias + (rank term), the rank term summed into the same fp32 accumulator.

Forward:  a = x [M, K], b = W^T (strides of W), rank term = t [M, R] @ B^T      -> y, rounded once.
Backward: a = dY [M, N], b = W,                  rank term = sum_s drop_s'(dS_s @ A_s) -> dX.
Without dropout the rank term is one more tl.dot into the accumulator before the K loop (no [M, N]
temporary, output written once). With dropout (backward only) the mask applies to the rank-term product, so
each segment gets its own accumulator and a masked epilogue; the mask of element (m, n) is the forward mask
of x[m, n] because dX has x's shape.
"""
from __future__ import annotations

import triton
import triton.language as tl

from fused_lora.kernels.philox import SEG_FIELDS, SEG_HI, SEG_INV_KEEP, SEG_LO, SEG_SALT, SEG_THRESHOLD, \
    keep_mask_tile
from fused_lora.kernels.spec import KernelSpec


@triton.jit
def fused_gemm_kernel(a_ptr, b_ptr, bias_ptr, lt_ptr, lr_ptr, seg_ptr, seed_ptr, out_ptr,
                      M, N, K, R, n_segs,
                      stride_am, stride_ak, stride_bk, stride_bn, stride_ltm, stride_lrn, stride_lrr, stride_om,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
                      HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, LORA_DROPOUT: tl.constexpr, PACKED: tl.constexpr,
                      PRECISION: tl.constexpr):
    # grouped program order: GROUP_M row tiles sweep the columns together, so their W tiles stay in L2
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # wrap out-of-range rows/cols onto valid ones: loads need no M/N mask, the store masks them
    rows_in = (rows % M).to(tl.int64)
    cols_in = (cols % N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_LORA and not LORA_DROPOUT:
        for r0 in range(0, R, BLOCK_R):
            r_ok = offs_r < R - r0
            lt = tl.load(lt_ptr + rows_in[:, None] * stride_ltm + (r0 + offs_r)[None, :],
                         mask=r_ok[None, :], other=0.0)
            lr = tl.load(lr_ptr + cols_in[None, :] * stride_lrn + (r0 + offs_r)[:, None] * stride_lrr,
                         mask=r_ok[:, None], other=0.0)
            acc = tl.dot(lt.to(lr.dtype), lr, acc, input_precision=PRECISION)

    a_ptrs = a_ptr + rows_in[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + cols_in[None, :] * stride_bn
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        at = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
        bt = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        acc = tl.dot(at, bt, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    if HAS_LORA and LORA_DROPOUT:
        seed = tl.load(seed_ptr)
        row_elem = rows_in * N
        for s in range(n_segs):
            seg = seg_ptr + s * SEG_FIELDS
            lo = tl.load(seg + SEG_LO)
            r_ok = offs_r < tl.load(seg + SEG_HI) - lo
            lt = tl.load(lt_ptr + rows_in[:, None] * stride_ltm + (lo + offs_r)[None, :],
                         mask=r_ok[None, :], other=0.0)
            lr = tl.load(lr_ptr + cols_in[None, :] * stride_lrn + (lo + offs_r)[:, None] * stride_lrr,
                         mask=r_ok[:, None], other=0.0)
            part = tl.dot(lt.to(lr.dtype), lr, input_precision=PRECISION)
            threshold = tl.load(seg + SEG_THRESHOLD)
            if threshold > 0:
                keep = keep_mask_tile(seed, row_elem, pid_n * BLOCK_N, tl.load(seg + SEG_SALT), threshold,
                                      BLOCK_N, PACKED)
                inv_keep = tl.load(seg + SEG_INV_KEEP).to(tl.float32, bitcast=True)
                part = tl.where(keep, part * inv_keep, 0.0)
            acc += part

    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols_in).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(rows < M)[:, None] & (cols < N)[None, :])


# rank chunk of the rank term when it goes into the accumulator (no dropout): 16 keeps the extra operand
# tiles small enough that 128 x 128 tiles do not spill on sm_80; wider ranks simply loop
RANK_CHUNK = 16


def gemm_config(M: int, dtype_bytes: int, lora_dropout: bool, packed: bool = True) -> dict:
    """Static tile table by shape and dtype. Kept small: codegen compiles every entry."""
    if dtype_bytes == 4:  # fp32 (tf32 or ieee): smaller tiles keep the FMA fallback from spilling
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3)
    if lora_dropout and not packed:  # one Philox call per element (row length % 4 != 0): a smaller tile
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
    if lora_dropout:  # dX with a masked epilogue: a second accumulator and Philox states need the room
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
    if M > 256:
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
    # 8 warps, not 4: dX reads W along its rows (a transposed B operand) and with 4 warps the 64 x 128
    # accumulator plus the rank-term operands spilled on sm_80; at M <= 256 there are few programs per SM,
    # so the extra warps also hide more load latency
    return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)


def launch_fused_gemm(a, b, b_strides, bias, lt, lr, lr_strides, seg_table, n_segs, seed, out,
                      block_r, lora_dropout, precision):
    """out[M, N] = a[M, K] @ b + bias + rank term; b given as (tensor, (stride_k, stride_n)). M > 0."""
    M, K = a.shape
    N = out.shape[1]
    has_lora = lt is not None and lt.shape[1] > 0
    lora_dropout = bool(lora_dropout and has_lora)
    packed = lora_dropout and N % 4 == 0
    cfg = gemm_config(M, a.element_size(), lora_dropout, packed)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    R = lt.shape[1] if has_lora else 0
    lt_arg = lt if has_lora else out
    lr_arg = lr if has_lora else b
    fused_gemm_kernel[grid](
        a, b, bias if bias is not None else out, lt_arg, lr_arg, seg_table, seed, out,
        M, N, K, R, n_segs,
        a.stride(0), a.stride(1), b_strides[0], b_strides[1],
        lt_arg.stride(0) if has_lora else 0, lr_strides[0], lr_strides[1], out.stride(0),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        BLOCK_R=block_r if lora_dropout else RANK_CHUNK, GROUP_M=cfg["GROUP_M"], HAS_BIAS=bias is not None,
        HAS_LORA=has_lora, LORA_DROPOUT=lora_dropout, PACKED=packed, PRECISION=precision,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def _spec(dt, M, block_r, backward, dropout, packed, has_bias):
    cfg = gemm_config(M, 2, dropout, packed)
    sig = {"a_ptr": f"*{dt}", "b_ptr": f"*{dt}", "bias_ptr": f"*{dt}", "lt_ptr": "*fp32", "lr_ptr": f"*{dt}",
           "seg_ptr": "*i32", "seed_ptr": "*i64", "out_ptr": f"*{dt}",
           "M": "i32", "N": "i32", "K": "i32", "R": "i32", "n_segs": "i32",
           "stride_am": "i32", "stride_ak": "constexpr", "stride_bk": "i32", "stride_bn": "constexpr",
           "stride_ltm": "i32", "stride_lrn": "i32", "stride_lrr": "constexpr", "stride_om": "i32"}
    const = {"stride_ak": 1}
    if backward:  # b = W read along its rows; lr = A^T: A's columns are contiguous
        sig["stride_bk"], sig["stride_bn"] = "i32", "constexpr"
        sig["stride_lrn"], sig["stride_lrr"] = "constexpr", "i32"
        const.update(stride_bn=1, stride_lrn=1)
    else:
        sig["stride_bk"], sig["stride_bn"] = "constexpr", "i32"
        const.update(stride_bk=1, stride_lrr=1)
    flags = dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], BLOCK_R=block_r,
                 GROUP_M=cfg["GROUP_M"], HAS_BIAS=has_bias, HAS_LORA=True, LORA_DROPOUT=dropout, PACKED=packed,
                 PRECISION="ieee")
    sig.update({n: "constexpr" for n in flags})
    const.update(flags)
    name = (f"fused_gemm[{'dx' if backward else 'y'},BM={cfg['BLOCK_M']},BN={cfg['BLOCK_N']},BK={cfg['BLOCK_K']},"
            f"BR={block_r},bias={has_bias},dropout={dropout},packed={packed},{dt}]")
    return KernelSpec(name=name, fn=fused_gemm_kernel, signature=sig, constexprs=const,
                      num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def codegen_specs() -> list[KernelSpec]:
    specs = []
    for dt in ("fp16", "bf16"):
        for M in (4096, 128):
            for has_bias in (False, True):
                specs.append(_spec(dt, M, RANK_CHUNK, backward=False, dropout=False, packed=False, has_bias=has_bias))
            specs.append(_spec(dt, M, RANK_CHUNK, backward=True, dropout=False, packed=False, has_bias=False))
        for block_r in (16, 64):
            for packed in (True, False):
                specs.append(_spec(dt, 4096, block_r, backward=True, dropout=True, packed=packed, has_bias=False))
    return specs
