"""Make PEFT models use fused_lora: one call on an existing model, or one on a config before get_peft_model.

    from fused_lora.integrations.peft import patch_model, unpatch_model, register
    model = get_peft_model(base, lora_config); patch_model(model)      # in place, returns the layer count
    register(lora_config); model = get_peft_model(base, lora_config)   # fused layers built directly

Only PEFT's LoRA `Linear` (exactly that class) and AdaLoRA's `SVDLinear` are switched; Embedding, Conv,
quantized and other LoRA layers stay PEFT's. The switch assigns `module.__class__` to a subclass, so parameters,
state_dict keys, save_pretrained/from_pretrained and every PEFT model method keep working unchanged.
After PeftModel.from_pretrained, call patch_model on the loaded model.
"""

from __future__ import annotations

from peft.tuners.adalora.layer import SVDLinear as PeftSVDLinear
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from torch import nn

from fused_lora import plan
from fused_lora.integrations.peft_adalora import FusedSVDLinear
from fused_lora.integrations.peft_lora_linear import FusedPeftLoraLinear, warn_unfused_variants

__all__ = [
    "patch_model",
    "unpatch_model",
    "register",
    "FusedPeftLoraLinear",
    "FusedSVDLinear",
    "LORA_LINEAR_API",
    "ADALORA_API",
]

_FUSED_FOR = {PeftLoraLinear: FusedPeftLoraLinear, PeftSVDLinear: FusedSVDLinear}
_PEFT_FOR = {fused: peft for peft, fused in _FUSED_FOR.items()}

# Everything of PEFT's layer classes the fused subclasses read or call (tests check each still exists, so a
# PEFT upgrade that drops one fails loudly instead of silently falling back or breaking).
LORA_LINEAR_API = (
    "base_layer",
    "get_base_layer",
    "lora_A",
    "lora_B",
    "lora_dropout",
    "scaling",
    "r",
    "lora_alpha",
    "use_rslora",
    "lora_bias",
    "lora_variant",
    "active_adapters",
    "merged",
    "merged_adapters",
    "disable_adapters",
    "fan_in_fan_out",
    "cast_input_dtype_enabled",
    "forward",
    "merge",
    "unmerge",
    "get_delta_weight",
    "_active_adapter",
    "_disable_adapters",  # read directly by the fused forward (what the properties return)
)
ADALORA_API = (
    "base_layer",
    "get_base_layer",
    "lora_A",
    "lora_B",
    "lora_E",
    "ranknum",
    "lora_dropout",
    "scaling",
    "active_adapters",
    "merged",
    "merged_adapters",
    "disable_adapters",
    "fan_in_fan_out",
    "cast_input_dtype_enabled",
    "forward",
    "merge",
    "unmerge",
    "get_delta_weight",
)


def patch_model(model: nn.Module) -> int:
    """Switch every PEFT LoRA Linear / AdaLoRA SVDLinear in `model` to its fused subclass, in place.
    Returns how many layers were switched (layers already fused are not counted)."""
    count, variants = 0, {}
    for module in model.modules():
        fused_cls = _FUSED_FOR.get(type(module))
        if fused_cls is not None:
            module.__class__ = fused_cls
            count += 1
            if fused_cls is FusedPeftLoraLinear and module.lora_variant:
                names = {n: type(v).__name__ for n, v in module.lora_variant.items()}
                module.__dict__["_fused_warned_variants"] = set(names)
                variants.update(names)
    if variants:
        warn_unfused_variants(variants)
    return count


def unpatch_model(model: nn.Module) -> int:
    """Give every fused layer in `model` back PEFT's own class. Returns how many were switched back."""
    count = 0
    for module in model.modules():
        peft_cls = _PEFT_FOR.get(type(module))
        if peft_cls is not None:
            module.__class__ = peft_cls
            module.__dict__.pop("_fused_warned_variants", None)
            plan.invalidate(module)  # PEFT's code may change the adapters in ways a kept plan would not see
            count += 1
    return count


def _fused_linear_or_none(target: nn.Module, adapter_name: str, **kwargs):
    """PEFT custom-module factory: a fused layer for a plain nn.Linear base. For other nn.Linear subclasses
    (bitsandbytes, ...) it returns None so PEFT's next dispatchers build their own layer."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if type(base).forward is not nn.Linear.forward or type(base.weight) is not nn.Parameter:
        return None
    return FusedPeftLoraLinear(target, adapter_name, **kwargs)


def register(lora_config) -> None:
    """Make get_peft_model(model, lora_config) build fused LoRA Linear layers directly (PEFT's custom-module
    dispatch). AdaLoRA builds its layers without that dispatch: use patch_model for AdaLoRA models."""
    from peft import AdaLoraConfig, LoraConfig

    if isinstance(lora_config, AdaLoraConfig):
        raise TypeError(
            "register() does not apply to AdaLoraConfig (AdaLoRA ignores custom modules); call "
            "patch_model(model) after get_peft_model instead"
        )
    if not isinstance(lora_config, LoraConfig):
        raise TypeError(f"register() takes a peft.LoraConfig, got {type(lora_config).__name__}")
    lora_config._register_custom_module({nn.Linear: _fused_linear_or_none})
