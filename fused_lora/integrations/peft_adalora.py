"""FusedSVDLinear: PEFT's AdaLoRA SVDLinear whose forward and merge run through fused_lora.

AdaLoRA's update is B diag(E) A * scaling / (ranknum + 1e-5): one LoRA adapter with a per-rank scale. The layer's
plan (fused_lora.plan) stacks the adapters; the scale vector is made from lora_E at every call that trains it
(fused_lora.lora_linear then folds it into A so its gradient flows) and cached, keyed on lora_E's and ranknum's
versions, otherwise.
Ranks the RankAllocator masked are zeros in lora_E, so they cost nothing and contribute nothing.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from peft.tuners.adalora.layer import SVDLinear as PeftSVDLinear
from peft.tuners.tuners_utils import check_adapters_to_merge

import fused_lora
from fused_lora import plan
from fused_lora.integrations._fusable import dropout_rate, fusable_base, mergeable_weight
from fused_lora.integrations.peft_lora_linear import FusedPeftLoraLinear


def read_adalora(layer, names: tuple) -> plan.Adapters:
    """The live tensors of AdaLoRA adapters (ParameterDicts lora_A [r, K], lora_B [N, r], lora_E [r, 1]) and their
    plan key. The per-rank scale is made per call from lora_E (rank_scale), so only its dtype is part of the key."""
    params_a, params_b, params_e = layer.lora_A._parameters, layer.lora_B._parameters, layer.lora_E._parameters
    mods_d, scaling = layer.lora_dropout._modules, layer.scaling
    a_list, b_list, scales, rates, key = [], [], [], [], [names]
    for n in names:
        a, b, e = params_a[n], params_b[n], params_e[n]
        s = scaling[n] if type(scaling[n]) is float else float(scaling[n])
        p = dropout_rate(mods_d[n])
        a_list.append(a)
        b_list.append(b)
        scales.append(s)
        rates.append(p)
        key.append((a.dtype, a.device, a.shape, b.dtype, b.device, b.shape, e.dtype, e.shape, s, p))
    return plan.Adapters(names, a_list, b_list, [None] * len(names), scales, rates, tuple(key))


def rank_scale(layer, name: str) -> torch.Tensor:
    """Per-rank scale [r]: lora_E * scaling / (ranknum + 1e-5), as PEFT's forward and get_delta_weight."""
    return layer.lora_E[name].reshape(-1) * layer.scaling[name] / (layer.ranknum[name] + 1e-5)


class FusedSVDLinear(PeftSVDLinear):
    """AdaLoRA SVDLinear with a fused forward and in-place merge."""

    def _rank_scale(self, name: str) -> torch.Tensor:
        return rank_scale(self, name)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args or kwargs or self.disable_adapters or self.merged or not fusable_base(self.base_layer, x):
            return super().forward(x, *args, **kwargs)
        out = self._fused_active(x)
        return super().forward(x, *args, **kwargs) if out is None else out

    def _fused_active(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        present = self.lora_A._parameters
        # AdaLoRA allows r == 0: such an adapter adds nothing
        names = tuple(n for n in self.active_adapters if n in present and present[n].shape[0] > 0)
        if not names:
            return None
        base = self.base_layer
        weight, bias = plan.param(base, "weight"), plan.param(base, "bias")
        adapters = read_adalora(self, names)
        compute = plan.compute_dtype(x)
        cast_input = self.cast_input_dtype_enabled
        key = plan.call_key(adapters, weight, bias, x.device, compute, cast_input)
        current = plan.cached_plan(self, plan.PLAN_ATTR, key)
        if current is None:
            dtype, why = FusedPeftLoraLinear._adapter_dtype(adapters, x, weight, cast_input)
            current = plan.store(
                self,
                plan.PLAN_ATTR,
                plan.build(key, adapters, weight, bias, x, dtype, compute[1], why, per_rank_scale=False),
            )
        if not current.usable:
            return None
        sources = [self.lora_E._parameters[n] for n in names] + [self.ranknum._parameters[n] for n in names]

        def scale():
            per_adapter = [rank_scale(self, n) for n in names]
            return (per_adapter[0] if len(names) == 1 else torch.cat(per_adapter)).to(torch.float32).contiguous()

        trains = torch.is_grad_enabled() and any(t.requires_grad for t in sources)
        per_rank = scale() if trains or current.key is None else current.derived("scale", sources, scale)
        return plan.dense_call(current, adapters, x, weight, bias, self.training, compute[1], scale=per_rank)

    def _apply(self, fn, recurse=True):
        plan.invalidate(self)
        return super()._apply(fn, recurse)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        base = self.get_base_layer()
        for name in adapter_names:
            if name not in self.lora_A:
                continue
            lora_a, lora_b = self.lora_A[name], self.lora_B[name]
            weight = mergeable_weight(base, lora_a.dtype)
            if weight is None or lora_b.dtype != lora_a.dtype or lora_a.shape[0] == 0:
                super().merge(safe_merge=safe_merge, adapter_names=[name])
                continue
            try:
                fused_lora.merge_(
                    weight,
                    lora_a,
                    lora_b,
                    self._rank_scale(name).detach(),
                    fan_in_fan_out=self.fan_in_fan_out,
                    safe=safe_merge,
                )
            except ValueError as exc:
                raise ValueError(
                    f"NaNs detected in the merged weights. The adapter {name} seems to be broken ({exc})"
                ) from exc
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        base = self.get_base_layer()
        while len(self.merged_adapters) > 0:
            name = self.merged_adapters.pop()
            if name not in self.lora_A:
                continue
            lora_a, lora_b = self.lora_A[name], self.lora_B[name]
            weight = mergeable_weight(base, lora_a.dtype)
            if weight is None or lora_b.dtype != lora_a.dtype or lora_a.shape[0] == 0:
                base.weight.data -= self.get_delta_weight(name)
            else:
                fused_lora.unmerge_(
                    weight, lora_a, lora_b, self._rank_scale(name).detach(), fan_in_fan_out=self.fan_in_fan_out
                )
