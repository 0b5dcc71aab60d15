"""FusedSVDLinear: PEFT's AdaLoRA SVDLinear whose forward and merge run through fused_lora.

AdaLoRA's update is B diag(E) A * scaling / (ranknum + 1e-5): one LoRA adapter with a per-rank scale. The scale
goes to the op as a tensor; when lora_E trains, fused_lora.functional folds it into A so its gradient flows.
Ranks the RankAllocator masked are zeros in lora_E, so they cost nothing and contribute nothing.
"""
from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from peft.tuners.adalora.layer import SVDLinear as PeftSVDLinear
from peft.tuners.tuners_utils import check_adapters_to_merge

import fused_lora
from fused_lora.integrations._fusable import dropout_rate, fusable_base, lora_dtype_ok, mergeable_weight


class FusedSVDLinear(PeftSVDLinear):
    """AdaLoRA SVDLinear with a fused forward and in-place merge."""

    def _rank_scale(self, name: str) -> torch.Tensor:
        """Per-rank scale [r]: lora_E * scaling / (ranknum + 1e-5), as PEFT's forward and get_delta_weight."""
        return self.lora_E[name].reshape(-1) * self.scaling[name] / (self.ranknum[name] + 1e-5)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args or kwargs or self.disable_adapters or self.merged or not fusable_base(self.base_layer, x):
            return super().forward(x, *args, **kwargs)
        out = self._fused_active(x)
        return super().forward(x, *args, **kwargs) if out is None else out

    def _fused_active(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        # AdaLoRA allows r == 0: such an adapter adds nothing
        names = [n for n in self.active_adapters if n in self.lora_A and self.lora_A[n].shape[0] > 0]
        if not names:
            return None
        a_list = [self.lora_A[n] for n in names]
        b_list = [self.lora_B[n] for n in names]
        dtype = a_list[0].dtype
        if any(t.dtype != dtype for t in a_list + b_list):
            return None
        if not lora_dtype_ok(x, self.base_layer.weight, dtype, self.cast_input_dtype_enabled):
            return None
        rates = [dropout_rate(self.lora_dropout[n]) for n in names]
        if any(p is None for p in rates):
            return None
        scales = [self._rank_scale(n) for n in names]
        single = len(names) == 1
        lora_a = a_list[0] if single else torch.cat(a_list, 0)
        lora_b = b_list[0] if single else torch.cat(b_list, 1)
        scale = scales[0] if single else torch.cat(scales, 0)
        base = self.base_layer
        return fused_lora.lora_linear(x, base.weight, base.bias, lora_a, lora_b, scale, dropout_p=rates,
                                      training=self.training, rank_splits=[t.shape[0] for t in a_list])

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
                fused_lora.merge_(weight, lora_a, lora_b, self._rank_scale(name).detach(),
                                  fan_in_fan_out=self.fan_in_fan_out, safe=safe_merge)
            except ValueError as exc:
                raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken "
                                 f"({exc})") from exc
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
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
                fused_lora.unmerge_(weight, lora_a, lora_b, self._rank_scale(name).detach(),
                                    fan_in_fan_out=self.fan_in_fan_out)
