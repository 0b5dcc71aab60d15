"""Shrink: t[:, seg] = (drop_seg(x) @ A_seg^T) * scale[seg] * 1/(1-p_seg), for every rank segment in one launch.

Grid (M tiles, segments). A segment (kernels/philox.py segment_table) is a run of ranks sharing one dropout
mask, at most BLOCK_R wide, so each program holds its whole [BLOCK_M, BLOCK_R] result in registers and x is
read once per segment (once in total when no adapter uses dropout and R <= BLOCK_R). fp32 accumulation;
the 1/(1-p) factor is applied to the fp32 result rather than to x, which is the same math with one rounding less.
"""
from __future__ import annotations

import triton
import triton.language as tl

from fused_lora.kernels.philox import SEG_FIELDS, SEG_HI, SEG_INV_KEEP, SEG_LO, SEG_SALT, SEG_THRESHOLD, \
    keep_mask_tile
from fused_lora.kernels.spec import KernelSpec


@triton.jit
def shrink_kernel(x_ptr, a_ptr, scale_ptr, seg_ptr, seed_ptr, t_ptr,
                  M, K, stride_xm, stride_xk, stride_tm,
                  BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                  HAS_DROPOUT: tl.constexpr, PACKED: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    seg = seg_ptr + tl.program_id(1) * SEG_FIELDS
    lo = tl.load(seg + SEG_LO)
    width = tl.load(seg + SEG_HI) - lo

    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    m_ok = offs_m < M
    r_ok = offs_r < width
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    # A_seg^T as a [BLOCK_K, BLOCK_R] tile: A is [R, K] contiguous
    a_ptrs = a_ptr + (lo + offs_r).to(tl.int64)[None, :] * K + offs_k[:, None]
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
        salt = tl.load(seg + SEG_SALT)
        threshold = tl.load(seg + SEG_THRESHOLD)
        row_elem = offs_m * K

    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        xt = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        at = tl.load(a_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            if threshold > 0:
                keep = keep_mask_tile(seed, row_elem, k0, salt, threshold, BLOCK_K, PACKED)
                xt = tl.where(keep, xt, 0.0)
        # adapters are x's dtype or fp32, so casting x to the adapter dtype never loses bits
        acc = tl.dot(xt.to(at.dtype), at, acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        a_ptrs += BLOCK_K

    factor = tl.load(scale_ptr + lo + offs_r, mask=r_ok, other=0.0)
    if HAS_DROPOUT:
        factor = factor * tl.load(seg + SEG_INV_KEEP).to(tl.float32, bitcast=True)
    acc = acc * factor[None, :]
    t_ptrs = t_ptr + offs_m[:, None] * stride_tm + (lo + offs_r)[None, :]
    tl.store(t_ptrs, acc, mask=m_ok[:, None] & r_ok[None, :])


def shrink_config(x_dtype_bytes: int, has_dropout: bool) -> dict:
    """Tile sizes. Few on purpose: codegen compiles every one of them.

    One row tile height for every M: 64 rows feed wgmma on sm_90 (16 would fall back to mma.sync). The
    shrink only sees M <= 64 when a caller forces the large-M path (decode takes kernels/small_m.py); there
    the grid is one row tile per segment whatever the height, and rows past M are masked, never fetched.
    """
    # the dropout mask of a 64 x 128 tile keeps too many Philox states live (spills): halve K then
    block_k = 64 if (x_dtype_bytes == 4 or has_dropout) else 128
    return dict(BLOCK_M=64, BLOCK_K=block_k, num_warps=4, num_stages=3)


def launch_shrink(x, lora_a, scale, seg_table, n_segs, seed, t, block_r, has_dropout, precision):
    """t (fp32 [M, R], preallocated) <- the scaled shrink of every segment. Callers skip M == 0."""
    M, K = x.shape
    cfg = shrink_config(x.element_size(), has_dropout)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), n_segs)
    shrink_kernel[grid](x, lora_a, scale, seg_table, seed, t, M, K, x.stride(0), x.stride(1), t.stride(0),
                        BLOCK_M=cfg["BLOCK_M"], BLOCK_K=cfg["BLOCK_K"], BLOCK_R=block_r,
                        HAS_DROPOUT=has_dropout, PACKED=has_dropout and K % 4 == 0, PRECISION=precision,
                        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


# (has_dropout, packed) pairs a launch can use: PACKED only matters with dropout
DROPOUT_VARIANTS = ((False, False), (True, True), (True, False))


def codegen_specs() -> list[KernelSpec]:
    specs = []
    for dt in ("fp16", "bf16"):
        for block_r in (16, 64):
            for dropout, packed in DROPOUT_VARIANTS:
                cfg = shrink_config(2, dropout)
                sig = {"x_ptr": f"*{dt}", "a_ptr": f"*{dt}", "scale_ptr": "*fp32", "seg_ptr": "*i32",
                       "seed_ptr": "*i64", "t_ptr": "*fp32", "M": "i32", "K": "i32", "stride_xm": "i32",
                       "stride_xk": "constexpr", "stride_tm": "i32"}
                const = dict(stride_xk=1, BLOCK_M=cfg["BLOCK_M"], BLOCK_K=cfg["BLOCK_K"], BLOCK_R=block_r,
                             HAS_DROPOUT=dropout, PACKED=packed, PRECISION="ieee")
                sig.update({n: "constexpr" for n in const if n != "stride_xk"})
                specs.append(KernelSpec(
                    name=(f"shrink[BM={cfg['BLOCK_M']},BK={cfg['BLOCK_K']},BR={block_r},dropout={dropout},"
                          f"packed={packed},{dt}]"),
                    fn=shrink_kernel, signature=sig, constexprs=const,
                    num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
    return specs
