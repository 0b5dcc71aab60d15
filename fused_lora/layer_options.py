"""Checks on the options an adapter is created with: what FusedLoRALinear supports, and clear refusals for the rest.

PEFT's LoRA variants change the math (DoRA rescales columns by a magnitude vector, aLoRA masks tokens, ...), so
running them through the plain fused op would silently give wrong outputs: each is refused by name instead.
"""

from __future__ import annotations

import torch

# LoraConfig fields that select a variant in peft 0.21 (LoraLayer.lora_variants and friends)
REFUSED_VARIANTS = (
    "use_dora",
    "use_qalora",
    "use_bdlora",
    "arrow_config",
    "alora_invocation_tokens",
    "velora_config",
    "monteclora_config",
    "kasa_config",
    "mica",
)

# init_lora_weights values that need the base weight or data (PiSSA, OLoRA, ...); fused_lora.convert turns
# PiSSA/OLoRA adapters into plain LoRA math after the fact
SUPPORTED_INITS = (True, False, "gaussian")


def check_variant_options(options: dict) -> None:
    """Refuse LoRA variants by name; refuse options we do not know, as a misspelt one would be ignored."""
    for name in REFUSED_VARIANTS:
        if options.get(name):
            raise ValueError(
                f"FusedLoRALinear does not support the LoRA variant option {name}={options[name]!r}: "
                "only plain LoRA (with rsLoRA and lora_bias) runs through the fused op; use "
                "peft's LoRA layers for this variant"
            )
    if options.get("fan_in_fan_out"):
        raise ValueError(
            "FusedLoRALinear wraps nn.Linear, whose weight is [out_features, in_features]: "
            "fan_in_fan_out=True (Conv1D-style weights) is not supported"
        )
    unknown = sorted(set(options) - set(REFUSED_VARIANTS) - {"fan_in_fan_out"})
    if unknown:
        raise TypeError(f"unknown adapter option(s): {', '.join(unknown)}")


def check_adapter_args(adapter_name, r, lora_alpha, lora_dropout, init_lora_weights, lora_bias) -> None:
    if not isinstance(adapter_name, str) or not adapter_name or adapter_name == "__base__" or "." in adapter_name:
        raise ValueError(
            f"adapter name {adapter_name!r} must be a non-empty string without '.', "
            "and not '__base__' (reserved for rows without an adapter)"
        )
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
    if not isinstance(lora_alpha, (int, float)) or isinstance(lora_alpha, bool):
        raise TypeError(f"lora_alpha must be a number, got {lora_alpha!r}")
    if not 0.0 <= float(lora_dropout) < 1.0:
        raise ValueError(f"lora_dropout {lora_dropout} must be in [0, 1)")
    init = init_lora_weights.lower() if isinstance(init_lora_weights, str) else init_lora_weights
    if init not in SUPPORTED_INITS:
        raise ValueError(
            f"init_lora_weights={init_lora_weights!r} is not supported by FusedLoRALinear (supported: "
            "True, False, 'gaussian'); PiSSA/OLoRA adapters can be converted to plain LoRA with "
            "fused_lora.convert"
        )
    if lora_bias and init_lora_weights not in (True, False):
        raise ValueError(
            "The argument lora_bias=True is only supported with init_lora_weights=True or False, got "
            f"init_lora_weights={init_lora_weights} instead."
        )


def adapter_dtype(base_dtype: torch.dtype, autocast_adapter_dtype: bool) -> torch.dtype:
    """PEFT creates adapters in the base dtype, and get_peft_model (autocast_adapter_dtype=True, its default)
    then upcasts float16/bfloat16 adapters to float32."""
    if not base_dtype.is_floating_point:
        return torch.float32
    if autocast_adapter_dtype and base_dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return base_dtype
