"""FusedPeftLoraLinear: PEFT's LoRA Linear whose forward and merge run through fused_lora.

It is PEFT's own class with two methods replaced, so a model's modules can switch to it by assigning
`module.__class__` (no parameter is copied, state_dict keys stay the same), and back.

Forward: the base linear and every active, unmerged, plain adapter in one lora_linear call (A stacked along the
rank axis, B concatenated, one scaling and dropout rate per adapter read at every call); `adapter_names=` mixed
batches in one lora_linear_rows call. Adapters that use a LoRA variant PEFT implements and we do not fuse (DoRA,
aLoRA, every `lora_variant` entry) run PEFT's code; so does any call we cannot reproduce exactly (quantized or
hooked base layer, extra forward arguments, unusual dtypes). Merge/unmerge use fused_lora.merge_/unmerge_ (in
place, one rounding) and keep PEFT's bookkeeping (merged_adapters, lora_bias).
"""
from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from peft.tuners.tuners_utils import check_adapters_to_merge

import fused_lora
from fused_lora.integrations._fusable import dropout_rate, fusable_base, lora_dtype_ok, mergeable_weight

BASE_MODEL_NAME = "__base__"  # PEFT's name for "no adapter" in adapter_names

# Every LoRA layer of a model sees the same adapter_names in a mixed-batch call (and again at every decode step):
# build the id tensor once instead of one host-to-device copy per layer per step.
_ROW_IDS_CACHE: dict = {}
_ROW_IDS_CACHE_SIZE = 64


def _row_ids(adapter_names: list[str], names: list[str], device: torch.device) -> torch.Tensor:
    index = {n: i for i, n in enumerate(names)}
    if torch.compiler.is_compiling():  # a constant of the graph there
        return torch.tensor([index.get(n, -1) for n in adapter_names], dtype=torch.int64, device=device)
    key = (tuple(adapter_names), tuple(names), device)
    ids = _ROW_IDS_CACHE.get(key)
    if ids is None:
        if len(_ROW_IDS_CACHE) >= _ROW_IDS_CACHE_SIZE:
            _ROW_IDS_CACHE.clear()
        ids = torch.tensor([index.get(n, -1) for n in adapter_names], dtype=torch.int64, device=device)
        _ROW_IDS_CACHE[key] = ids
    return ids


def warn_unfused_variants(variants: dict[str, str]) -> None:
    """One warning naming adapters (name -> variant class) that keep PEFT's code. Layer-independent text, so
    Python's default filter shows it once however many layers carry the adapter."""
    kinds = ", ".join(f"{name} ({kind})" for name, kind in sorted(variants.items()))
    warnings.warn(f"fused_lora: adapter(s) {kinds} use a LoRA variant that is not fused; they run PEFT's own "
                  "forward and merge", UserWarning, stacklevel=3)


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
        plain_call = not args and all(v is None for k, v in kwargs.items() if k != "adapter_names")
        base = self.base_layer
        if (not plain_call or self.disable_adapters or self.merged or not fusable_base(base, x)):
            return super().forward(x, *args, **kwargs)
        if adapter_names is not None:
            out = self._fused_mixed_batch(x, adapter_names)
        else:
            out = self._fused_active(x)
        return super().forward(x, *args, **kwargs) if out is None else out

    def _stack(self, names: list[str], x: torch.Tensor):
        """(A [R,K], B [N,R], scalings, ranks, dropout rates) of `names`, or None when PEFT must run them."""
        a_weights = [self.lora_A[n].weight for n in names]
        b_weights = [self.lora_B[n].weight for n in names]
        dtype = a_weights[0].dtype
        if any(w.dtype != dtype for w in a_weights + b_weights):
            return None
        if not lora_dtype_ok(x, self.base_layer.weight, dtype, self.cast_input_dtype_enabled):
            return None
        rates = [dropout_rate(self.lora_dropout[n]) for n in names]
        if any(p is None for p in rates):
            return None
        lora_a = a_weights[0] if len(names) == 1 else torch.cat(a_weights, 0)
        lora_b = b_weights[0] if len(names) == 1 else torch.cat(b_weights, 1)
        scalings = [float(self.scaling[n]) for n in names]
        ranks = [w.shape[0] for w in a_weights]
        return lora_a, lora_b, scalings, ranks, rates

    def _fused_active(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        active = [n for n in self.active_adapters if n in self.lora_A]
        plain = []
        for n in active:
            if n in self.lora_variant:
                break
            plain.append(n)
        variants = active[len(plain):]
        # PEFT adds adapters in order and a variant (DoRA) may read the running result as the base output: we
        # match it only when every plain adapter comes before every variant one
        if not plain or any(n not in self.lora_variant for n in variants):
            return None
        stacked = self._stack(plain, x)
        if stacked is None:
            return None
        lora_a, lora_b, scalings, ranks, rates = stacked
        base = self.base_layer
        bias = base.bias
        for n, s in zip(plain, scalings):
            if self.lora_bias.get(n, False) and self.lora_B[n].bias is not None:
                term = self.lora_B[n].bias * s
                bias = term if bias is None else bias + term
        if bias is not None:
            bias = bias.to(base.weight.dtype)
        result = fused_lora.lora_linear(x, base.weight, bias, lora_a, lora_b, scalings, dropout_p=rates,
                                        training=self.training, rank_splits=ranks)
        if variants:
            result_dtype = result.dtype
            for n in variants:
                xn = x.to(self.lora_A[n].weight.dtype) if self.cast_input_dtype_enabled else x
                result = self.lora_variant[n].forward(self, active_adapter=n, x=xn, result=result)
            result = result.to(result_dtype)
        return result

    def _fused_mixed_batch(self, x: torch.Tensor, adapter_names: list[str]) -> Optional[torch.Tensor]:
        if len(x) != len(adapter_names):
            raise ValueError("Length of `adapter_names` should be the same as the number of inputs, but got "
                             f"{len(adapter_names)} and {len(x)} respectively.")
        names = []
        for n in adapter_names:
            if n != BASE_MODEL_NAME and n in self.lora_A and n not in names:
                names.append(n)
        # variants need PEFT's per-sub-batch code (and its DoRA error); a per-adapter lora bias is per row
        if not names or any(n in self.lora_variant or self.lora_bias.get(n, False) for n in names):
            return None
        stacked = self._stack(names, x)
        if stacked is None:
            return None
        lora_a, lora_b, scalings, ranks, rates = stacked
        row_ids = _row_ids(adapter_names, names, x.device)
        base = self.base_layer
        # ids built from the layer's own names are in range: no check (it would cost a host sync per layer on CUDA)
        return fused_lora.lora_linear_rows(x, base.weight, base.bias, lora_a, lora_b, scalings, ranks, row_ids,
                                           dropout_p=rates, training=self.training, check_ids=False)

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
                fused_lora.merge_(weight, lora_a, lora_b, float(scaling), fan_in_fan_out=self.fan_in_fan_out,
                                  safe=safe_merge)
            except ValueError as exc:
                raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken "
                                 f"({exc})") from exc
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
            warnings.warn("Already unmerged. Nothing to do.")
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
                fused_lora.unmerge_(weight, lora_a, lora_b, float(self.scaling[name]),
                                    fan_in_fan_out=self.fan_in_fan_out)
            new_bias = self._merged_bias(base, name, -1.0, check_finite=False)
            if new_bias is not None:
                base.bias.data.copy_(new_bias)
