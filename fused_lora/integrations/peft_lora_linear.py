"""FusedPeftLoraLinear: PEFT's LoRA Linear whose forward and merge run through fused_lora.

It is PEFT's own class with two methods replaced, so a model's modules can switch to it by assigning
`module.__class__` (no parameter is copied, state_dict keys stay the same), and back.

Forward: the base linear and every active, unmerged, plain adapter in one fused call (A stacked along the rank
axis, B concatenated, per-rank scale and dropout rates from the layer's plan, fused_lora.plan, which FusedLoRALinear
uses too and which is rebuilt whenever a scaling, dropout rate, parameter, dtype or the active set changes);
`adapter_names=` mixed batches in one per-row call over all the layer's plain adapters (lora_B biases per row).
Adapters that use a LoRA variant PEFT implements and we do not fuse (DoRA, aLoRA, every `lora_variant` entry) run
PEFT's code; so does any call we cannot reproduce exactly (quantized or hooked base layer, extra forward arguments,
unusual dtypes). Merge/unmerge use fused_lora.merge_/unmerge_ (in
place, one rounding) and keep PEFT's bookkeeping (merged_adapters, lora_bias).
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from peft.tuners.tuners_utils import check_adapters_to_merge

import fused_lora
from fused_lora import plan
from fused_lora.integrations._fusable import dropout_rate, fusable_base, lora_dtype_ok, mergeable_weight

BASE_MODEL_NAME = "__base__"  # PEFT's name for "no adapter" in adapter_names


def warn_unfused_variants(variants: dict[str, str]) -> None:
    """One warning naming adapters (name -> variant class) that keep PEFT's code. Layer-independent text, so
    Python's default filter shows it once however many layers carry the adapter."""
    kinds = ", ".join(f"{name} ({kind})" for name, kind in sorted(variants.items()))
    warnings.warn(
        f"fused_lora: adapter(s) {kinds} use a LoRA variant that is not fused; they run PEFT's own forward and merge",
        UserWarning,
        stacklevel=3,
    )


class FusedPeftLoraLinear(PeftLoraLinear):
    """PEFT LoRA Linear with a fused forward and in-place merge. See the module docstring."""

    @property
    def fused_unsupported_adapters(self) -> list[str]:
        """Adapters of this layer that run PEFT's own code because they use a LoRA variant."""
        return sorted(self.lora_variant)

    def _warn_unsupported_once(self) -> None:
        seen = self.__dict__.setdefault("_fused_warned_variants", set())
        new = {name: type(self.lora_variant[name]).__name__ for name in self.lora_variant if name not in seen}
        if new:
            seen.update(new)
            warn_unfused_variants(new)

    # ---- forward ----
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.lora_variant:
            self._warn_unsupported_once()
        adapter_names = kwargs.get("adapter_names")
        plain_call = not args and (not kwargs or all(v is None for k, v in kwargs.items() if k != "adapter_names"))
        if (
            not plain_call
            or self._disable_adapters
            or self.merged_adapters
            or not fusable_base(self._modules["base_layer"], x)
        ):
            return super().forward(x, *args, **kwargs)
        if adapter_names is not None:
            out = self._fused_mixed_batch(x, adapter_names)
        else:
            out = self._fused_active(x)
        return super().forward(x, *args, **kwargs) if out is None else out

    def _plan(self, attr: str, names: tuple, x: torch.Tensor):
        """(plan, adapters, weight, bias, autocast) for `names`; plan.usable is False when PEFT must run them."""
        base = self._modules["base_layer"]
        weight, bias = plan.param(base, "weight"), plan.param(base, "bias")
        adapters = plan.read_lora(self, names, dropout_rate)
        compute = plan.compute_dtype(x)
        cast_input = self.cast_input_dtype_enabled
        key = plan.call_key(adapters, weight, bias, x.device, compute, cast_input)
        current = plan.cached_plan(self, attr, key)
        if current is None:
            dtype, why = self._adapter_dtype(adapters, x, weight, cast_input)
            current = plan.store(self, attr, plan.build(key, adapters, weight, bias, x, dtype, compute[1], why))
        return current, adapters, weight, bias, compute[1]

    @staticmethod
    def _adapter_dtype(adapters, x, weight, cast_input):
        """The adapters' dtype when the op reproduces PEFT's call with them, else (None, why)."""
        dtype = adapters.a[0].dtype
        if any(t.dtype != dtype for t in adapters.a + adapters.b):
            return None, "adapters of several dtypes"
        if not lora_dtype_ok(x, weight, dtype, cast_input):
            return None, f"adapter dtype {dtype} over x {x.dtype}"
        if any(p is None for p in adapters.rates):
            return None, "a dropout module other than nn.Dropout"
        return dtype, None

    def _fused_active(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        present = self._modules["lora_A"]._modules
        active = self._active_adapter
        active = ([active] if active in present else []) if type(active) is str else [n for n in active if n in present]
        variants = self.lora_variant
        plain = []
        for n in active:
            if n in variants:
                break
            plain.append(n)
        later = active[len(plain) :]
        # PEFT adds adapters in order and a variant (DoRA) may read the running result as the base output: we
        # match it only when every plain adapter comes before every variant one
        if not plain or any(n not in variants for n in later):
            return None
        current, adapters, weight, bias, autocast = self._plan(plan.PLAN_ATTR, tuple(plain), x)
        if not current.usable:
            return None
        result = plan.dense_call(current, adapters, x, weight, bias, self.training, autocast)
        if later:
            result_dtype = result.dtype
            for n in later:
                xn = x.to(self.lora_A[n].weight.dtype) if self.cast_input_dtype_enabled else x
                result = self.lora_variant[n].forward(self, active_adapter=n, x=xn, result=result)
            result = result.to(result_dtype)
        return result

    def _fused_mixed_batch(self, x: torch.Tensor, adapter_names: list[str]) -> Optional[torch.Tensor]:
        if len(x) != len(adapter_names):
            raise ValueError(
                "Length of `adapter_names` should be the same as the number of inputs, but got "
                f"{len(adapter_names)} and {len(x)} respectively."
            )
        variants = self.lora_variant
        # variants need PEFT's per-sub-batch code (and its DoRA error)
        if variants and any(n in variants for n in adapter_names):
            return None
        names = tuple(n for n in self.lora_A._modules if n not in variants)
        if not names:
            return None
        current, adapters, weight, bias, autocast = self._plan(plan.ROWS_PLAN_ATTR, names, x)
        if not current.usable:
            return None
        row_ids, used, _unknown = plan.ids_for_names(current, adapter_names, x.device)  # unknown: no adapter
        # ids built from the layer's own names are in range: no check (it would cost a host sync per layer on CUDA)
        return plan.rows_call(current, adapters, x, weight, bias, row_ids, self.training, autocast, False, used)

    def _apply(self, fn, recurse=True):
        plan.invalidate(self)  # .to()/.cuda(): the plans would be rebuilt anyway; free their old-device tensors
        return super()._apply(fn, recurse)

    # ---- merge / unmerge ----
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        base = self.get_base_layer()
        for name in adapter_names:
            if name not in self.lora_A:
                continue
            lora_a, lora_b = self.lora_A[name].weight, self.lora_B[name].weight
            weight = mergeable_weight(base, lora_a.dtype)
            if name in self.lora_variant or weight is None or lora_b.dtype != lora_a.dtype:
                super().merge(safe_merge=safe_merge, adapter_names=[name])
                continue
            scaling = self.scaling[name]
            new_bias = self._merged_bias(base, name, +1.0, check_finite=safe_merge)
            try:
                fused_lora.merge_(
                    weight, lora_a, lora_b, float(scaling), fan_in_fan_out=self.fan_in_fan_out, safe=safe_merge
                )
            except ValueError as exc:
                raise ValueError(
                    f"NaNs detected in the merged weights. The adapter {name} seems to be broken ({exc})"
                ) from exc
            if new_bias is not None:
                base.bias.data.copy_(new_bias)
            self.merged_adapters.append(name)

    def _merged_bias(self, base, name: str, sign: float, check_finite: bool) -> Optional[torch.Tensor]:
        if not self.lora_bias.get(name, False):
            return None
        if getattr(base, "bias", None) is None:
            raise RuntimeError("Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias.")
        new_bias = base.bias.data + sign * self.lora_B[name].bias.detach() * self.scaling[name]
        if check_finite and not torch.isfinite(new_bias).all():
            raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
        return new_bias.to(base.bias.dtype)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        base = self.get_base_layer()
        while len(self.merged_adapters) > 0:
            name = self.merged_adapters.pop()
            if name not in self.lora_A:
                continue
            lora_a, lora_b = self.lora_A[name].weight, self.lora_B[name].weight
            weight = mergeable_weight(base, lora_a.dtype)
            if name in self.lora_variant:
                base.weight.data = self.lora_variant[name].unmerge(self, name, base.weight)
            elif weight is None or lora_b.dtype != lora_a.dtype:
                base.weight.data -= self.get_delta_weight(name).to(base.weight.dtype)
            else:
                fused_lora.unmerge_(
                    weight, lora_a, lora_b, float(self.scaling[name]), fan_in_fan_out=self.fan_in_fan_out
                )
            new_bias = self._merged_bias(base, name, -1.0, check_finite=False)
            if new_bias is not None:
                base.bias.data.copy_(new_bias)
