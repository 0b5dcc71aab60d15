"""Math entry points: lora_linear (one or several adapters on every row), lora_linear_rows (one adapter per
row), merge_ / unmerge_. They validate, flatten leading dims, build the per-rank scale vector and the dropout
seed, and call the ops in fused_lora.ops (which pick the backend). Autograd comes with the ops.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from fused_lora import ops
from fused_lora.validate import (check_adapters, check_dropout, check_linear, check_rank_splits, describe,
                                 require_tensor)

Scaling = Union[float, int, Sequence[float], torch.Tensor]
DropoutP = Union[float, Sequence[float]]


def _rank_ptr(rank_splits: Optional[Sequence[int]], total: int) -> list[int]:
    splits = [total] if rank_splits is None else [int(r) for r in rank_splits]
    check_rank_splits(splits, total)
    ptr = [0]
    for r in splits:
        ptr.append(ptr[-1] + r)
    return ptr


def _scale_vector(scaling: Scaling, rank_ptr: list[int], device: torch.device) -> torch.Tensor:
    """Per-rank float32 scale [R] from a scalar, one value per adapter, or a per-rank tensor."""
    total, n = rank_ptr[-1], len(rank_ptr) - 1
    if isinstance(scaling, torch.Tensor):
        if scaling.dim() == 0:
            return scaling.detach().to(device=device, dtype=torch.float32).expand(total).contiguous()
        if scaling.shape != (total,):
            raise ValueError(f"{describe('scaling', scaling)} must be a scalar or have one value per rank ({total},)")
        return scaling.detach().to(device=device, dtype=torch.float32).contiguous()
    if isinstance(scaling, (int, float)):
        return torch.full((total,), float(scaling), dtype=torch.float32, device=device)
    values = [float(s) for s in scaling]
    if len(values) != n:
        raise ValueError(f"scaling has {len(values)} values but there are {n} adapters (rank_splits)")
    sizes = [rank_ptr[i + 1] - rank_ptr[i] for i in range(n)]
    return torch.tensor(values, dtype=torch.float32, device=device).repeat_interleave(
        torch.tensor(sizes, device=device), output_size=total)


def _dropout_list(dropout_p: DropoutP, n: int) -> list[float]:
    ps = [float(dropout_p)] * n if isinstance(dropout_p, (int, float)) else [float(p) for p in dropout_p]
    if len(ps) != n:
        raise ValueError(f"dropout_p has {len(ps)} values but there are {n} adapters (rank_splits)")
    check_dropout(ps)
    return ps


def _fold_trainable_scale(lora_a: torch.Tensor, scaling: Scaling):
    """A scale that needs a gradient (AdaLoRA's lora_E) is folded into A, so the ops' scale stays a constant."""
    if isinstance(scaling, torch.Tensor) and scaling.requires_grad:
        column = scaling.reshape(-1, 1) if scaling.dim() > 0 else scaling
        return lora_a * column.to(lora_a.dtype), 1.0
    return lora_a, scaling


def _autocast(x, weight, bias, lora_a, lora_b):
    """Under torch.autocast both paths run in the autocast dtype, as nn.Linear (and so PEFT's LoRA) does."""
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return x, weight, bias, lora_a, lora_b
    dtype = torch.get_autocast_dtype(device_type)
    cast = [t if t is None else t.to(dtype) for t in (x, weight, bias, lora_a, lora_b)]
    return tuple(cast)


def draw_dropout_seed(device: torch.device) -> torch.Tensor:
    """The Philox seed of one call: from torch's generator, so deterministic under torch.manual_seed and fresh
    at every call; it stays on the device (no host sync) and is all autograd keeps of the dropout mask."""
    return torch.randint(-(2 ** 63), 2 ** 63 - 1, (1,), dtype=torch.int64, device=device)


def _seed(x: torch.Tensor, training: bool, ps: list[float]) -> torch.Tensor:
    if training and any(p > 0 for p in ps):
        return draw_dropout_seed(x.device)
    return torch.zeros(1, dtype=torch.int64, device=x.device)


def _prepare(x, weight, bias, lora_a, lora_b, scaling, rank_splits, dropout_p, training):
    check_linear(x, weight, bias)
    check_adapters(x, weight, lora_a, lora_b)
    lora_a, scaling = _fold_trainable_scale(lora_a, scaling)
    x, weight, bias, lora_a, lora_b = _autocast(x, weight, bias, lora_a, lora_b)
    rank_ptr = _rank_ptr(rank_splits, lora_a.shape[0])
    ps = _dropout_list(dropout_p, len(rank_ptr) - 1)
    if not training:
        ps = [0.0] * len(ps)
    scale = _scale_vector(scaling, rank_ptr, x.device)
    x2 = x.reshape(-1, x.shape[-1])
    return x2, weight, bias, lora_a.contiguous(), lora_b.contiguous(), scale, rank_ptr, ps


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_a: torch.Tensor,
                lora_b: torch.Tensor, scaling: Scaling, *, dropout_p: DropoutP = 0.0, training: bool = False,
                rank_splits: Optional[Sequence[int]] = None) -> torch.Tensor:
    """y = x W^T + b + sum_i s_i (drop_i(x) A_i^T) B_i^T for x of shape [..., K].

    lora_a [R, K] and lora_b [N, R] hold one adapter, or several stacked along the rank axis with their ranks in
    `rank_splits` (mixed activation). `scaling`: a float, one float per adapter, or a per-rank tensor [R].
    `dropout_p`: one rate, or one per adapter; applied to the LoRA path only, and only when `training`.
    """
    x2, weight, bias, lora_a, lora_b, scale, rank_ptr, ps = _prepare(
        x, weight, bias, lora_a, lora_b, scaling, rank_splits, dropout_p, training)
    y, _t = ops.lora_fwd(x2, weight.contiguous(), bias, lora_a, lora_b, scale, rank_ptr, ps,
                         _seed(x2, training, ps))
    return y.reshape(*x.shape[:-1], weight.shape[0])


def _row_ids_for(row_ids: torch.Tensor, x: torch.Tensor, rows: int) -> torch.Tensor:
    """One int64 id per row of the flattened x (`rows` of them), from ids per row or per sample."""
    require_tensor("adapter_ids", row_ids)
    if row_ids.dtype not in (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"{describe('adapter_ids', row_ids)} must be an integer tensor")
    if row_ids.device != x.device:
        raise ValueError(f"{describe('adapter_ids', row_ids)} is not on x's device ({x.device})")
    ids = row_ids.reshape(-1).to(torch.int64)
    if ids.numel() != rows:
        if x.dim() >= 2 and ids.numel() == x.shape[0]:
            ids = ids.repeat_interleave(rows // max(x.shape[0], 1), output_size=rows)
        else:
            raise ValueError(f"{describe('adapter_ids', row_ids)} needs one id per row ({rows}) or per sample "
                             f"(x.shape[0] = {x.shape[0] if x.dim() else 'n/a'}) of {describe('x', x)}")
    return ids


def lora_linear_rows(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_a: torch.Tensor,
                     lora_b: torch.Tensor, scaling: Scaling, rank_splits: Sequence[int], row_ids: torch.Tensor, *,
                     dropout_p: DropoutP = 0.0, training: bool = False) -> torch.Tensor:
    """Mixed batch: row m of x.reshape(-1, K) uses adapter row_ids[m] of the stacked adapters, or none (-1).

    `row_ids` has one id per row, or one per sample (x.shape[0]) which is then repeated over the sample's rows.
    Ids must be in [-1, n_adapters); they are not checked on the device (that would need a host sync).
    """
    x2, weight, bias, lora_a, lora_b, scale, rank_ptr, ps = _prepare(
        x, weight, bias, lora_a, lora_b, scaling, rank_splits, dropout_p, training)
    ids = _row_ids_for(row_ids, x, x2.shape[0])
    y, _t = ops.lora_rows_fwd(x2, weight.contiguous(), bias, lora_a, lora_b, scale, rank_ptr, ids, ps,
                              _seed(x2, training, ps))
    return y.reshape(*x.shape[:-1], weight.shape[0])


def _merge(weight, lora_a, lora_b, scaling, sign, fan_in_fan_out, safe, rank_splits):
    require_tensor("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"{describe('weight', weight)} must be 2-D")
    if not weight.is_contiguous():
        raise ValueError(f"{describe('weight', weight)} must be contiguous to be merged in place")
    # adapters may be float32 over a low-precision weight, as in forward; x is absent, so stand weight in for it
    check_adapters(weight, weight, lora_a, lora_b, fan_in_fan_out=fan_in_fan_out)
    rank_ptr = _rank_ptr(rank_splits, lora_a.shape[0])
    scale = _scale_vector(scaling.detach() if isinstance(scaling, torch.Tensor) else scaling, rank_ptr,
                          weight.device)
    with torch.no_grad():
        applied = ops.lora_merge_(weight, lora_a.detach().contiguous(), lora_b.detach().contiguous(), scale,
                                  float(sign), bool(fan_in_fan_out), bool(safe))
    if safe and not bool(applied):
        raise ValueError(f"merging into {describe('weight', weight)} would produce non-finite values; "
                         "the weight was left unchanged")
    return weight


def merge_(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: Scaling, *,
           fan_in_fan_out: bool = False, safe: bool = False,
           rank_splits: Optional[Sequence[int]] = None) -> torch.Tensor:
    """weight += sum_i s_i B_i A_i in place (fp32 accumulation, one rounding). weight is [N, K], or [K, N]
    with fan_in_fan_out. safe=True raises ValueError and leaves weight bit-identical if a value would be
    non-finite."""
    return _merge(weight, lora_a, lora_b, scaling, +1.0, fan_in_fan_out, safe, rank_splits)


def unmerge_(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: Scaling, *,
             fan_in_fan_out: bool = False, safe: bool = False,
             rank_splits: Optional[Sequence[int]] = None) -> torch.Tensor:
    """weight -= sum_i s_i B_i A_i in place: the inverse of merge_ up to one rounding per call."""
    return _merge(weight, lora_a, lora_b, scaling, -1.0, fan_in_fan_out, safe, rank_splits)
