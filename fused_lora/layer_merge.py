"""Merge bookkeeping for FusedLoRALinear: which adapters are in the base weight, and how to take them out again.

Every merge() call appends one MergeRecord. It keeps what that call added (the stacked factors, detached copies,
and the scalings used), so unmerge() subtracts exactly that even if `scaling` or the adapter weights changed in
between (PEFT recomputes the delta from the current values). With keep_original=True the record also holds the
weight and bias as they were before the call (on CPU), and unmerge restores them bit for bit. Records are undone
last first, so a mix of kept and subtracted merges still comes back to the right state.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import torch

from fused_lora import functional, plan

# rows of the weight copied per probe when looking for the adapter that broke a safe merge (bounds the temporary)
_PROBE_ELEMENTS = 1 << 20


class MergeError(ValueError, RuntimeError):
    """A merge that cannot be done. A ValueError (bad adapter values) that PEFT callers may catch as RuntimeError
    (PEFT raises RuntimeError when a lora_bias adapter meets a base layer without bias)."""


@dataclass
class MergeRecord:
    names: list[str]
    scales: list[float]
    ranks: list[int]
    lora_a: torch.Tensor  # [R, K] stacked, detached
    lora_b: torch.Tensor  # [N, R]
    bias_delta: Optional[torch.Tensor]  # [N] float32: sum_i s_i * lora_B_i.bias, or None
    original_weight: Optional[torch.Tensor] = None  # CPU copy before this merge (keep_original=True)
    original_bias: Optional[torch.Tensor] = None


def adapters_to_merge(layer, adapter_names) -> list[str]:
    """PEFT's check_adapters_to_merge: default to the active adapters, drop (and warn about) merged ones."""
    if adapter_names is None:
        adapter_names = layer.active_adapters
    if isinstance(adapter_names, (str, bool)):
        raise TypeError(f"adapter_names should be a list of strings, got {adapter_names!r}.")
    adapter_names = list(adapter_names)
    if layer.merged:
        already = set(layer.merged_adapters)
        adapter_names = [n for n in adapter_names if n not in already]
        if adapter_names:
            warnings.warn(
                f"Already following adapters were merged {','.join(layer.merged_adapters)}. "
                f"You are now additionally merging {','.join(adapter_names)}.",
                stacklevel=2,
            )
        else:
            warnings.warn("All adapters are already merged, nothing to do.", stacklevel=2)
    # as PEFT: names this layer does not hold are skipped (another layer of the model may hold them)
    return [n for n in adapter_names if n in layer.lora_A]


def _factor_dtype(weight: torch.Tensor, dtypes) -> torch.dtype:
    """merge_ takes factors in the weight's dtype or float32; anything else merges from float32."""
    dtypes = set(dtypes)
    if len(dtypes) == 1 and next(iter(dtypes)) in (weight.dtype, torch.float32):
        return next(iter(dtypes))
    return torch.float32


def _stacked_factors(layer, names, weight):
    a_list = [layer.lora_A[n].weight.detach() for n in names]
    b_list = [layer.lora_B[n].weight.detach() for n in names]
    a, b = plan.stack(a_list, b_list, _factor_dtype(weight, [t.dtype for t in a_list + b_list]))
    return a.contiguous(), b.contiguous()


def _bias_delta(layer, names, scales, base_bias) -> Optional[torch.Tensor]:
    with_bias = [(n, s) for n, s in zip(names, scales) if layer.lora_bias.get(n, False)]
    if not with_bias:
        return None
    if base_bias is None:
        raise MergeError(
            "Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias "
            f"(adapters {', '.join(n for n, _ in with_bias)})."
        )
    delta = torch.zeros(base_bias.shape, dtype=torch.float32, device=base_bias.device)
    for name, s in with_bias:
        delta += layer.lora_B[name].bias.detach().to(device=delta.device, dtype=torch.float32) * s
    return delta


def _broken_adapters(weight, record: MergeRecord) -> list[str]:
    """Which adapter makes the merged weight non-finite: each one is merged alone, with safe=True, into copies of
    a few rows at a time, so the weight itself is never written and no full-size copy is made."""
    n_out, k_in = weight.shape
    rows = max(1, _PROBE_ELEMENTS // max(k_in, 1))
    broken = []
    lo = 0
    for name, scale, rank in zip(record.names, record.scales, record.ranks):
        a, b = record.lora_a[lo : lo + rank], record.lora_b[:, lo : lo + rank]
        lo += rank
        for start in range(0, n_out, rows):
            probe = weight[start : start + rows].clone()
            try:
                functional.merge_(probe, a, b[start : start + rows], scale, safe=True)
            except ValueError:
                broken.append(name)
                break
    return broken or list(record.names)


def merge(layer, adapter_names=None, safe_merge: bool = False, keep_original: bool = False) -> None:
    names = adapters_to_merge(layer, adapter_names)
    if not names:
        return
    base = layer.get_base_layer()
    weight, bias = base.weight, base.bias
    scales = [float(layer.scaling[n]) for n in names]
    bias_delta = _bias_delta(layer, names, scales, bias)
    a, b = _stacked_factors(layer, names, weight)
    record = MergeRecord(
        names=names,
        scales=scales,
        ranks=[layer.lora_A[n].weight.shape[0] for n in names],
        lora_a=a.clone(),
        lora_b=b.clone(),
        bias_delta=bias_delta,
    )

    new_bias = None
    if bias_delta is not None:
        new_bias = (bias.detach().to(torch.float32) + bias_delta).to(bias.dtype)
        if safe_merge and not torch.isfinite(new_bias).all():
            raise MergeError(
                f"NaNs detected in the merged weights. The adapter(s) "
                f"{', '.join(n for n in names if layer.lora_bias.get(n))} seem(s) to be broken "
                "(lora_B bias); the weights were left unchanged"
            )
    if keep_original:
        record.original_weight = weight.detach().to("cpu", copy=True)
        record.original_bias = None if bias is None else bias.detach().to("cpu", copy=True)

    try:
        functional.merge_(weight.detach(), a, b, scales, safe=safe_merge, rank_splits=record.ranks)
    except ValueError:
        if not safe_merge:
            raise
        broken = _broken_adapters(weight.detach(), record)
        raise MergeError(
            f"NaNs detected in the merged weights. The adapter {', '.join(broken)} seems to be broken"
            + (" (together)" if len(broken) > 1 else "")
            + "; the weight was left unchanged"
        ) from None
    if new_bias is not None:
        with torch.no_grad():
            bias.copy_(new_bias)
    layer.merged_adapters.extend(names)
    layer._merge_records.append(record)


def unmerge(layer) -> None:
    if not layer.merged:
        warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
        return
    base = layer.get_base_layer()
    weight, bias = base.weight, base.bias
    while layer._merge_records:
        record = layer._merge_records.pop()
        with torch.no_grad():
            if record.original_weight is not None:
                weight.copy_(record.original_weight)
                if record.original_bias is not None:
                    bias.copy_(record.original_bias)
                continue
            functional.unmerge_(weight.detach(), record.lora_a, record.lora_b, record.scales, rank_splits=record.ranks)
            if record.bias_delta is not None:
                bias.copy_((bias.to(torch.float32) - record.bias_delta).to(bias.dtype))
    layer.merged_adapters.clear()
