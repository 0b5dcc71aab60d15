"""replace_linear: put FusedLoRALinear layers into a model in place of its nn.Linear modules, PEFT-style.

Names match as PEFT's target_modules: a string is a regex that must match the whole module name; a list matches
a module whose name equals an entry or ends with "." + entry.
"""

from __future__ import annotations

import re
from typing import Sequence, Union

from torch import nn


def _matches(target_modules: Union[str, Sequence[str]], name: str) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return name in target_modules or any(name.endswith(f".{t}") for t in target_modules)


def _targets(model: nn.Module, target_modules) -> list[tuple[str, nn.Module]]:
    from fused_lora.layer import FusedLoRALinear

    found, inside = [], []  # inside: prefixes whose submodules are not ours to touch
    for name, module in model.named_modules():
        if not name or any(name.startswith(p) for p in inside):
            continue
        if isinstance(module, (FusedLoRALinear, nn.MultiheadAttention)):
            # a fused layer's own base_layer / lora_A / lora_B are never targets; MHA does not call its out_proj
            inside.append(name + ".")
        if not _matches(target_modules, name):
            continue
        if not isinstance(module, (nn.Linear, FusedLoRALinear)):
            raise TypeError(
                f"target module {name!r} is a {type(module).__name__}; replace_linear only replaces "
                "nn.Linear modules (or adds adapters to FusedLoRALinear ones)"
            )
        found.append((name, module))
    return found


def replace_linear(
    model: nn.Module, target_modules: Union[str, Sequence[str]], *, freeze_base: bool = True, **adapter_kwargs
) -> int:
    """Swap the matching nn.Linear modules of `model` for FusedLoRALinear layers that wrap them (the weight is
    shared, not copied) and return how many layers got the adapter. A module that already is a FusedLoRALinear
    gets the adapter added (as PEFT's add_adapter). adapter_kwargs go to FusedLoRALinear.from_linear
    (adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, lora_bias, ...).
    freeze_base: the wrapped weight and bias stop requiring grad, as get_peft_model freezes the base model.
    Raises ValueError if nothing matches."""
    from fused_lora.layer import FusedLoRALinear

    if not isinstance(target_modules, str):
        target_modules = list(target_modules)
        if not target_modules or not all(isinstance(t, str) for t in target_modules):
            raise TypeError(
                f"target_modules must be a regex string or a non-empty list of names, got {target_modules!r}"
            )
    targets = _targets(model, target_modules)
    if not targets:
        raise ValueError(
            f"Target modules {target_modules!r} not found in the base model. Please check the target "
            "modules and try again."
        )
    kwargs = dict(adapter_kwargs)
    adapter_name = kwargs.pop("adapter_name", "default")
    for name, module in targets:
        if isinstance(module, FusedLoRALinear):
            kwargs_with_defaults = {"r": 8, "lora_alpha": 8, **kwargs}
            module.add_adapter(
                adapter_name,
                kwargs_with_defaults.pop("r"),
                kwargs_with_defaults.pop("lora_alpha"),
                **kwargs_with_defaults,
            )
            base = module.base_layer
        else:
            fused = FusedLoRALinear.from_linear(module, adapter_name=adapter_name, **kwargs)
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, fused)
            base = module
        if freeze_base:
            base.requires_grad_(False)
    return len(targets)
