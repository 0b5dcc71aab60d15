"""Adapter conversions users hit when deploying: OLoRA/PiSSA adapters (trained from a mutated base) to plain
LoRA adapters for the original base.

An adapter initialised with (A0, B0) changes the base to W - s B0 A0 before training; after training the
layer computes (W - s B0 A0) + s B A = W + s (B A - B0 A0). Against the original W that is one LoRA adapter of
rank 2r: A' = [A; A0], B' = [B, -B0], with the same scaling s; so r doubles and alpha doubles (alpha * sqrt(2)
under rsLoRA, where s = alpha / sqrt(r)).

Entry points:

    mutated_to_lora(trained, initial, config=None) -> (state_dict, config_dict)
        trained / initial: PEFT adapter state dicts (as in adapter_model.safetensors, or get_peft_model_state_dict
        right after get_peft_model and after training), or adapter folders. config: the adapter config as a dict
        (adapter_config.json), a peft LoraConfig, or None to read it from the trained folder.
        Returns the rank-2r state dict (same keys) and a config dict for the original base: r, lora_alpha,
        rank_pattern and alpha_pattern converted, init_lora_weights = True. Pure tensor concatenation: the
        converted adapter reproduces the trained one exactly (no arithmetic besides B0's sign).
    mutated_to_lora_dir(trained_dir, initial_dir, output_dir) -> output_dir
        The same on folders; writes adapter_model.safetensors and adapter_config.json.
    mutated_to_lora_tensors(lora_a, lora_b, initial_a, initial_b), converted_alpha(alpha, use_rslora)
        The per-layer math, for callers that walk tensors themselves (the offline merge CLI).
"""

from __future__ import annotations

import copy
import json
import math
import os
from typing import Any, Mapping, Optional, Union

import torch


def mutated_to_lora_tensors(
    lora_a: torch.Tensor, lora_b: torch.Tensor, initial_a: torch.Tensor, initial_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A', B') of rank 2r whose B' A' equals B A - B0 A0 exactly (no arithmetic, only concatenation)."""
    if lora_a.shape != initial_a.shape or lora_b.shape != initial_b.shape:
        raise ValueError(
            f"trained adapter (lora_a {tuple(lora_a.shape)}, lora_b {tuple(lora_b.shape)}) and "
            f"initial adapter (lora_a {tuple(initial_a.shape)}, lora_b {tuple(initial_b.shape)}) "
            "must have the same shapes"
        )
    return torch.cat([lora_a, initial_a.to(lora_a.dtype)], 0), torch.cat([lora_b, -initial_b.to(lora_b.dtype)], 1)


def converted_alpha(lora_alpha: float, use_rslora: bool) -> float:
    """alpha for the rank-2r adapter that keeps the scaling of the rank-r one."""
    return lora_alpha * (math.sqrt(2.0) if use_rslora else 2.0)


StateDict = Mapping[str, torch.Tensor]
PathLike = Union[str, "os.PathLike[str]"]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_A_NAMES = ("lora_A", "lora_embedding_A")
_B_NAMES = ("lora_B", "lora_embedding_B")


def _factor_kind(key: str) -> Optional[str]:
    """'A' or 'B' for a low-rank factor's weight, None for anything else (lora_B's bias, modules_to_save...)."""
    parts = key.split(".")
    if parts[-1] == "bias":
        return None
    if any(p in _A_NAMES for p in parts):
        return "A"
    if any(p in _B_NAMES for p in parts):
        return "B"
    return None


def _is_folder(obj: Any) -> bool:
    return isinstance(obj, (str, os.PathLike))


def _load_state_dict(folder: PathLike) -> dict[str, torch.Tensor]:
    path = os.path.join(folder, WEIGHTS_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: missing (expected a PEFT adapter folder saved with safetensors)")
    from safetensors.torch import load_file

    return load_file(path)


def _load_config(folder: PathLike) -> dict:
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: missing (expected a PEFT adapter folder)")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _config_dict(config: Any) -> dict:
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a dict, a peft LoraConfig or None, got {type(config).__name__}")
    out = copy.deepcopy(dict(config))
    for key, value in out.items():  # PeftConfig.to_dict keeps sets (target_modules); JSON wants lists
        if isinstance(value, set):
            out[key] = sorted(value)
    return out


def converted_config(config: Any) -> dict:
    """The adapter config for the rank-2r adapter: r, lora_alpha, rank_pattern and alpha_pattern converted so
    every layer keeps its scaling, and init_lora_weights = True (loading it must not mutate the base)."""
    cfg = _config_dict(config)
    peft_type = str(cfg.get("peft_type", "LORA")).upper().split(".")[-1]
    if peft_type != "LORA":
        raise ValueError(f"config peft_type {cfg.get('peft_type')!r}: only LORA adapters can be converted")
    if cfg.get("use_dora"):
        raise ValueError("config use_dora = True: DoRA's magnitude vector is not a low-rank delta; not convertible")
    for key in ("r", "lora_alpha"):
        if not isinstance(cfg.get(key), (int, float)) or isinstance(cfg.get(key), bool):
            raise ValueError(f"config {key} must be a number, got {cfg.get(key)!r}")
    rslora = bool(cfg.get("use_rslora", False))
    cfg["r"] = 2 * int(cfg["r"])
    cfg["lora_alpha"] = converted_alpha(cfg["lora_alpha"], rslora)
    ranks = dict(cfg.get("rank_pattern") or {})
    alphas = dict(cfg.get("alpha_pattern") or {})
    cfg["rank_pattern"] = {k: 2 * int(v) for k, v in ranks.items()}
    cfg["alpha_pattern"] = {k: converted_alpha(v, rslora) for k, v in alphas.items()}
    cfg["init_lora_weights"] = True
    return cfg


def mutated_to_lora(
    trained: Union[StateDict, PathLike], initial: Union[StateDict, PathLike], config: Any = None
) -> tuple[dict[str, torch.Tensor], dict]:
    """(state_dict, config_dict) of the plain rank-2r LoRA adapter equivalent to an OLoRA/PiSSA-trained one.
    See the module docstring for the arguments."""
    if config is None:
        if not _is_folder(trained):
            raise ValueError("config is required when `trained` is a state dict (not an adapter folder)")
        config = _load_config(trained)
    trained_sd = _load_state_dict(trained) if _is_folder(trained) else trained
    initial_sd = _load_state_dict(initial) if _is_folder(initial) else initial
    out: dict[str, torch.Tensor] = {}
    pairs = 0
    for key, tensor in trained_sd.items():
        kind = _factor_kind(key)
        if kind is None:
            out[key] = tensor
            continue
        if kind == "A":
            b_key = _partner_key(key, trained_sd)
            for k in (key, b_key):
                if k not in initial_sd:
                    raise ValueError(
                        f"initial state dict has no {k!r} (trained and initial adapters must come "
                        "from the same model and adapter, saved the same way)"
                    )
            out[key], out[b_key] = mutated_to_lora_tensors(
                tensor, trained_sd[b_key], initial_sd[key], initial_sd[b_key]
            )
            pairs += 1
    if pairs == 0:
        raise ValueError("no lora_A/lora_B tensors found in the trained state dict")
    orphans = [k for k in trained_sd if _factor_kind(k) == "B" and k not in out]
    if orphans:
        raise ValueError(f"trained state dict has lora_B tensors without their lora_A: {orphans[:3]}")
    return out, converted_config(config)


def _partner_key(a_key: str, state_dict: StateDict) -> str:
    parts = a_key.split(".")
    for i, p in enumerate(parts):
        if p in _A_NAMES:
            b_key = ".".join(parts[:i] + [p.replace("_A", "_B")] + parts[i + 1 :])
            if b_key not in state_dict:
                raise ValueError(f"trained state dict has {a_key!r} but no {b_key!r}")
            return b_key
    raise AssertionError(a_key)


def mutated_to_lora_dir(trained_dir: PathLike, initial_dir: PathLike, output_dir: PathLike) -> PathLike:
    """Convert adapter folders: writes the plain LoRA adapter (safetensors + config) to output_dir."""
    from safetensors.torch import save_file

    state_dict, config = mutated_to_lora(trained_dir, initial_dir, _load_config(trained_dir))
    os.makedirs(output_dir, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in state_dict.items()},
        os.path.join(output_dir, WEIGHTS_FILE),
        metadata={"format": "pt"},
    )
    with open(os.path.join(output_dir, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    return output_dir
