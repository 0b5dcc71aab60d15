"""When a PEFT layer's call can go through the fused ops, and the small conversions it needs.

Every check here is a reason to hand the call back to PEFT's own code: a base layer we cannot read as one plain
weight (quantized, sharded, hooked), dtypes the op contract does not take, dropout modules other than nn.Dropout.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from fused_lora.functional import autocast_dtype

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_LINEAR_FORWARD = nn.Linear.forward


def _linear_dtype(t: torch.Tensor, autocast: Optional[torch.dtype]) -> torch.dtype:
    """The dtype F.linear computes `t` in: autocast casts float32/float16/bfloat16 (never float64)."""
    return autocast if autocast is not None and t.dtype in _FLOATS else t.dtype


def _plain_tensor(t) -> bool:
    # DTensor (FSDP2 shards outside forward), quantized and other tensor subclasses carry more than their data
    return type(t) in (torch.Tensor, nn.Parameter) and t.dtype in _FLOATS


def fusable_base(base: nn.Module, x: torch.Tensor) -> bool:
    """base(x) is exactly F.linear(x, base.weight, base.bias) and the op takes those tensors. Read at every call
    (hooks and parameters can change at any time), so it reads the module's dicts directly."""
    if type(base).forward is not _LINEAR_FORWARD or not isinstance(base, nn.Linear):
        return False
    # module hooks would be skipped by reading the weight directly (FSDP unshard, user hooks)
    if base._forward_hooks or base._forward_pre_hooks:
        return False
    params = base._parameters
    weight, bias = params.get("weight"), params.get("bias")
    if (
        weight is None
        or not _plain_tensor(weight)
        or weight.dim() != 2
        or (bias is not None and not _plain_tensor(bias))
    ):
        return False
    if not isinstance(x, torch.Tensor) or x.device != weight.device:
        return False
    # under autocast, fused_lora.functional casts exactly as F.linear does; where F.linear would then see two dtypes
    # (float64 x over float32 weights) PEFT's own call raises its own error
    autocast = autocast_dtype(x.device)
    if autocast is None:
        return x.dtype == weight.dtype and (bias is None or bias.dtype == weight.dtype)
    compute = _linear_dtype(weight, autocast)
    return _linear_dtype(x, autocast) == compute and (bias is None or _linear_dtype(bias, autocast) == compute)


def mergeable_weight(base: nn.Module, adapter_dtype: torch.dtype) -> Optional[torch.Tensor]:
    """The base weight tensor to merge into in place, or None when PEFT's merge must run instead."""
    weight = getattr(base, "weight", None)
    if weight is None or not _plain_tensor(weight) or weight.dim() != 2 or not weight.is_contiguous():
        return None
    if adapter_dtype not in (weight.dtype, torch.float32):
        return None
    return weight.data


def lora_dtype_ok(x: torch.Tensor, base_weight: torch.Tensor, adapter_dtype: torch.dtype, cast_input: bool) -> bool:
    """The op takes adapters in x's dtype or float32; PEFT casts x to the adapters' dtype only when allowed."""
    autocast = autocast_dtype(x.device)
    if autocast is not None:
        return adapter_dtype in _FLOATS  # cast to the autocast dtype, as PEFT's nn.Linear adapters are
    if adapter_dtype == x.dtype:
        return True
    return cast_input and adapter_dtype == torch.float32 and base_weight.dtype == x.dtype


def dropout_rate(module: nn.Module) -> Optional[float]:
    """The dropout probability of PEFT's lora_dropout entry; None for a module we cannot reproduce."""
    if isinstance(module, nn.Identity):
        return 0.0
    if type(module) is nn.Dropout:
        return float(module.p)
    return None
