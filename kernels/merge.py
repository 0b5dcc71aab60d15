"""In-place LoRA merge: W <- round(W + sign * B diag(scale) A), tile by tile, fp32 inside, one rounding to W's dtype.

No temporary the size of W: each program recomputes its delta tile from B and A (r is small next to the tile).
The delta is an fp32 "ieee" product (FMA, no tensor cores, no TF32): with fp16 weights a TF32 delta would
already cost about half an fp16 ulp, and a merge is memory-bound on W for the usual ranks anyway.

safe=True runs the same kernel twice: a CHECK pass raises a device flag (atomic) if any merged value would be
non-finite, then a WRITE_IF_CLEAN pass reads the flag and writes only if it is clean. No host sync; the result
is a 0-d bool tensor on the device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

WRITE, CHECK, WRITE_IF_CLEAN = 0, 1, 2  # the kernel's MODE
# Kernels may only read globals that are constexpr objects.
_CHECK = tl.constexpr(CHECK)
_WRITE_IF_CLEAN = tl.constexpr(WRITE_IF_CLEAN)
_FLOAT32_MAX = tl.constexpr(3.4028234663852886e38)

BLOCK_ROWS, BLOCK_COLS, BLOCK_R, NUM_WARPS = 64, 128, 16, 4


@triton.jit
def _merge_kernel(
    w_ptr,
    l_ptr,
    r_ptr,
    scale_ptr,
    flag_ptr,
    ROWS,
    COLS,
    R,
    stride_l_row,
    stride_l_rank,
    stride_r_rank,
    stride_r_col,
    sign,
    MODE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """W (contiguous [ROWS, COLS]) += sign * L diag(scale) Rm, with L [ROWS, R] and Rm [R, COLS] given by strides."""
    if MODE == _WRITE_IF_CLEAN:
        if tl.load(flag_ptr) != 0:
            return
    rows = (tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
    cols = (tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)).to(tl.int64)
    row_ok = rows < ROWS
    col_ok = cols < COLS
    rk = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_ROWS, BLOCK_COLS), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        r_ok = (r0 + rk) < R
        lhs = tl.load(
            l_ptr + rows[:, None] * stride_l_row + (r0 + rk)[None, :] * stride_l_rank,
            mask=row_ok[:, None] & r_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        lhs = lhs * tl.load(scale_ptr + r0 + rk, mask=r_ok, other=0.0)[None, :]
        rhs = tl.load(
            r_ptr + (r0 + rk)[:, None] * stride_r_rank + cols[None, :] * stride_r_col,
            mask=r_ok[:, None] & col_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        acc = tl.dot(lhs, rhs, acc, input_precision="ieee")
    ok = row_ok[:, None] & col_ok[None, :]
    w_ptrs = w_ptr + rows[:, None] * COLS + cols[None, :]
    w = tl.load(w_ptrs, mask=ok, other=0.0)
    merged = (w.to(tl.float32) + sign * acc).to(w_ptr.dtype.element_ty)
    if MODE == _CHECK:
        # abs(NaN) <= max is false, so this catches NaN and +-inf after rounding to W's dtype.
        bad = ok & ~(tl.abs(merged.to(tl.float32)) <= _FLOAT32_MAX)
        if tl.sum(bad.to(tl.int32)) > 0:
            tl.atomic_max(flag_ptr, 1)
    else:
        tl.store(w_ptrs, merged, mask=ok)


def _launch(weight, R, lhs, lhs_strides, rhs, rhs_strides, scale, flag, sign, mode):
    rows, cols = weight.shape
    grid = (triton.cdiv(rows, BLOCK_ROWS), triton.cdiv(cols, BLOCK_COLS))
    _merge_kernel[grid](
        weight,
        lhs,
        rhs,
        scale,
        flag,
        rows,
        cols,
        R,
        lhs_strides[0],
        lhs_strides[1],
        rhs_strides[0],
        rhs_strides[1],
        float(sign),
        MODE=mode,
        BLOCK_ROWS=BLOCK_ROWS,
        BLOCK_COLS=BLOCK_COLS,
        BLOCK_R=BLOCK_R,
        num_warps=NUM_WARPS,
        num_stages=2,
    )


def lora_merge_(weight, lora_a, lora_b, scale, sign, fan_in_fan_out, safe):
    """Merge in place (see CONTRACT.md); returns a 0-d bool tensor on weight's device: True when W was written."""
    R, K = lora_a.shape
    if fan_in_fan_out:
        # W stored [K, N]: delta^T = A^T diag(s) B^T; L = A^T (k, r) at r*K + k, Rm = B^T (r, n) at n*R + r.
        lhs_strides, rhs_strides, lhs, rhs = (1, K), (1, R), lora_a, lora_b
    else:
        # W stored [N, K]: L = B (n, r) at n*R + r, Rm = A (r, k) at r*K + k.
        lhs_strides, rhs_strides, lhs, rhs = (R, 1), (K, 1), lora_b, lora_a
    if weight.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=weight.device)
    if R == 0:
        # Nothing to add: W + 0 rounds to W, unless W itself holds non-finite values and the caller asked to check.
        if safe:
            return torch.isfinite(weight).all()
        return torch.ones((), dtype=torch.bool, device=weight.device)
    flag = torch.zeros(1, dtype=torch.int32, device=weight.device)
    if not safe:
        _launch(weight, R, lhs, lhs_strides, rhs, rhs_strides, scale, flag, sign, WRITE)
        return torch.ones((), dtype=torch.bool, device=weight.device)
    _launch(weight, R, lhs, lhs_strides, rhs, rhs_strides, scale, flag, sign, CHECK)
    _launch(weight, R, lhs, lhs_strides, rhs, rhs_strides, scale, flag, sign, WRITE_IF_CLEAN)
    return flag[0] == 0


def codegen_specs():
    from fused_lora.kernels.spec import KernelSpec

    specs = []
    names = _merge_kernel.arg_names
    for dt in ("fp16", "bf16"):
        for mode, mode_name in ((WRITE, "write"), (CHECK, "check"), (WRITE_IF_CLEAN, "write_if_clean")):
            consts = dict(MODE=mode, BLOCK_ROWS=BLOCK_ROWS, BLOCK_COLS=BLOCK_COLS, BLOCK_R=BLOCK_R)
            types = dict(
                w_ptr=f"*{dt}",
                l_ptr=f"*{dt}",
                r_ptr=f"*{dt}",
                scale_ptr="*fp32",
                flag_ptr="*i32",
                ROWS="i32",
                COLS="i32",
                R="i32",
                stride_l_row="i32",
                stride_l_rank="i32",
                stride_r_rank="i32",
                stride_r_col="i32",
                sign="fp32",
            )
            sig = {n: ("constexpr" if n in consts else types[n]) for n in names}
            specs.append(
                KernelSpec(
                    name=f"merge_{mode_name}[BR={BLOCK_ROWS},BC={BLOCK_COLS},BRANK={BLOCK_R},{dt}]",
                    fn=_merge_kernel,
                    signature=sig,
                    constexprs=consts,
                    num_warps=NUM_WARPS,
                    num_stages=2,
                    uses_tensor_cores=False,
                    # the delta must be fp32 FMA (no TF32): a tensor-core merge would be a precision bug here
                    extra={"unaligned": ("stride_l_row", "stride_l_rank", "stride_r_rank", "stride_r_col", "R")},
                )
            )
    return specs
