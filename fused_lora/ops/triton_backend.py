"""The op contract on Triton: launchers live with their kernels in fused_lora.kernels; this module adapts what the
contract accepts to what the kernels read.

- float64: the kernels load and compute float32/float16/bfloat16 only. Any float64 operand sends the call to the
  plain-torch reference (fused_lora.reference), which computes in float64 on any device, dropout bits included;
  gradcheck-sized work, not a fast path.
- bias: the kernels index bias[n] as a contiguous vector; a strided bias is copied first (N elements; no copy when
  it is already contiguous).
"""

from __future__ import annotations

from typing import Optional

import torch

from fused_lora import reference
from fused_lora.kernels import dense, merge, rows
from fused_lora.kernels.dense import dropout_keep  # noqa: F401  (no float operands)


def _float64(*tensors: Optional[torch.Tensor]) -> bool:
    return any(t is not None and t.dtype == torch.float64 for t in tensors)


def _contiguous(bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return bias if bias is None or bias.is_contiguous() else bias.contiguous()


def lora_fwd(x, weight, bias, lora_a, lora_b, scale, rank_ptr, dropout_p, seed):
    if _float64(x, weight, bias, lora_a, lora_b):
        return reference.lora_fwd(x, weight, bias, lora_a, lora_b, scale, rank_ptr, dropout_p, seed)
    return dense.lora_fwd(x, weight, _contiguous(bias), lora_a, lora_b, scale, rank_ptr, dropout_p, seed)


def lora_bwd(dy, x, weight, lora_a, lora_b, scale, t, rank_ptr, dropout_p, seed, need_dx):
    if _float64(dy, x, weight, lora_a, lora_b, t):
        return reference.lora_bwd(dy, x, weight, lora_a, lora_b, scale, t, rank_ptr, dropout_p, seed, need_dx)
    return dense.lora_bwd(dy, x, weight, lora_a, lora_b, scale, t, rank_ptr, dropout_p, seed, need_dx)


def lora_rows_fwd(x, weight, bias, lora_a, lora_b, scale, rank_ptr, row_ids, dropout_p, seed):
    if _float64(x, weight, bias, lora_a, lora_b):
        return reference.lora_rows_fwd(x, weight, bias, lora_a, lora_b, scale, rank_ptr, row_ids, dropout_p, seed)
    return rows.lora_rows_fwd(x, weight, _contiguous(bias), lora_a, lora_b, scale, rank_ptr, row_ids, dropout_p, seed)


def lora_rows_bwd(dy, x, weight, lora_a, lora_b, scale, t, rank_ptr, row_ids, dropout_p, seed, need_dx):
    if _float64(dy, x, weight, lora_a, lora_b, t):
        return reference.lora_rows_bwd(
            dy, x, weight, lora_a, lora_b, scale, t, rank_ptr, row_ids, dropout_p, seed, need_dx
        )
    return rows.lora_rows_bwd(dy, x, weight, lora_a, lora_b, scale, t, rank_ptr, row_ids, dropout_p, seed, need_dx)


def lora_merge_(weight, lora_a, lora_b, scale, sign, fan_in_fan_out, safe):
    if _float64(weight, lora_a, lora_b):
        return reference.lora_merge_(weight, lora_a, lora_b, scale, sign, fan_in_fan_out, safe)
    return merge.lora_merge_(weight, lora_a, lora_b, scale, sign, fan_in_fan_out, safe)
