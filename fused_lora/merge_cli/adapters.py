"""Reading PEFT adapter folders into per-module deltas: A [r, in], B [out, r], a per-rank scale (alpha/r,
rsLoRA, rank/alpha patterns, AdaLoRA's lora_E * alpha / ranknum, times the user's weight), lora_B.bias, and
full-tensor replacements (modules_to_save, saved embedding base layers).

Semantics follow PEFT 0.21: LoRA scaling = alpha / r (alpha / sqrt(r) with use_rslora), where r and alpha
come from rank_pattern / alpha_pattern when a pattern matches the module path (`(.*\\.)?(pattern)$`, first
match wins). AdaLoRA: delta = B (A * E) * scaling / (ranknum + 1e-5), scaling = lora_alpha (or r when
lora_alpha <= 0), ranknum = init_r (PEFT keeps the initial rank even after rank_pattern trims the tensors).
lora_bias: the layer's bias gains scaling * lora_B.bias.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Optional

import torch

from fused_lora.convert import mutated_to_lora_tensors
from fused_lora.merge_cli.errors import MergeError, blame
from fused_lora.merge_cli.safetensors_io import read_header

ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
PREFIX = "base_model.model."
MUTATING_INITS = ("pissa", "olora", "corda")  # trained from W - s B0 A0: need the initial adapter


@dataclass
class AdapterSpec:
    folder: str
    weight: float = 1.0
    initial: Optional[str] = None


@dataclass
class ModuleDelta:
    """One adapter's contribution to one module (module path as in the adapter, without the PEFT prefix)."""

    path: str
    kind: str  # "linear" (lora_A/lora_B) or "embedding" (lora_embedding_A/B)
    lora_a: torch.Tensor  # [r, in] float32
    lora_b: torch.Tensor  # [out, r] float32
    scale: torch.Tensor  # [r] float64, everything folded in (patterns, rsLoRA, AdaLoRA, weight)
    bias: Optional[torch.Tensor]  # [out] float32: lora_B.bias
    bias_scale: float
    fan_in_fan_out: bool  # the config's flag; only consulted when the weight is square
    source: str  # file the tensors came from, for messages
    key: str  # the adapter key of lora_A, for messages


@dataclass
class Adapter:
    spec: AdapterSpec
    config: dict
    sha256: str
    config_sha256: str
    initial_sha256: Optional[str]
    deltas: dict[str, ModuleDelta] = field(default_factory=dict)
    replacements: dict[str, tuple[torch.Tensor, str]] = field(default_factory=dict)  # param name -> (t, key)

    def record(self) -> dict:
        """What the output's metadata says about this adapter."""
        c = self.config
        peft_type = c.get("peft_type")
        if peft_type == "ADALORA":
            r = c.get("init_r")
            alpha = c.get("lora_alpha")
            scaling = (alpha if alpha and alpha > 0 else r) / r if r else None
            note = "per rank: lora_E * lora_alpha / init_r"
        else:
            r, alpha = c.get("r"), c.get("lora_alpha")
            scaling = alpha / (math.sqrt(r) if c.get("use_rslora") else r) if r else None
            note = (
                "per module from rank_pattern/alpha_pattern"
                if (c.get("rank_pattern") or c.get("alpha_pattern"))
                else ""
            )
        return {
            "adapter": os.path.basename(os.path.normpath(self.spec.folder)),
            "sha256": self.sha256,
            "config_sha256": self.config_sha256,
            "peft_type": peft_type,
            "weight": self.spec.weight,
            "scaling": None if scaling is None else scaling * self.spec.weight,
            "r": r,
            "lora_alpha": alpha,
            "use_rslora": bool(c.get("use_rslora")),
            "scaling_note": note,
            "initial_adapter_sha256": self.initial_sha256,
            "modules": len(self.deltas),
        }


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with blame(path, None, "cannot read"):
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _read_config(folder: str) -> dict:
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isdir(folder):
        raise MergeError(folder, None, "adapter folder does not exist")
    if not os.path.isfile(path):
        raise MergeError(path, None, "missing: not a PEFT adapter folder")
    with blame(path, None, "unreadable adapter config"):
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    if not isinstance(config, dict):
        raise MergeError(path, None, "adapter config is not a JSON object")
    return config


def _check_supported(config: dict, path: str, has_initial: bool) -> None:
    peft_type = config.get("peft_type")
    if peft_type not in ("LORA", "ADALORA"):
        raise MergeError(path, "peft_type", f"{peft_type!r} adapters are not supported (LORA and ADALORA are)")
    for key, why in (
        ("use_dora", "DoRA's magnitude vector is not a low-rank delta"),
        ("layer_replication", "layer replication changes the model's structure"),
        ("target_parameters", "LoRA on raw parameters (target_parameters) is not supported"),
        ("trainable_token_indices", "trainable token deltas are not supported"),
        ("use_bdlora", "block-diagonal LoRA is not supported"),
        ("use_qalora", "QALoRA is not supported"),
    ):
        if config.get(key):
            raise MergeError(path, key, f"{key} = {config[key]!r}: {why}")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith("loftq"):
        raise MergeError(path, "init_lora_weights", "LoftQ adapters belong to a quantized base; not supported")
    if isinstance(init, str) and init.lower().startswith(MUTATING_INITS) and not has_initial:
        raise MergeError(
            path,
            "init_lora_weights",
            f"{init!r} adapters were trained from a mutated base: pass "
            "the initial adapter with --initial-adapter right after this --adapter, or convert it "
            "with PEFT's path_initial_model_for_weight_conversion",
        )
    for key in ("r", "lora_alpha") if peft_type == "LORA" else ("init_r", "lora_alpha"):
        value = config.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise MergeError(path, key, f"must be a number, got {value!r}")


def _load_tensors(folder: str) -> tuple[str, dict[str, torch.Tensor]]:
    path = os.path.join(folder, ADAPTER_FILE)
    if not os.path.isfile(path):
        pickled = [n for n in ("adapter_model.bin", "adapter_model.pt") if os.path.exists(os.path.join(folder, n))]
        if pickled:
            raise MergeError(
                os.path.join(folder, pickled[0]),
                None,
                "pickle adapters are not loaded (unpickling runs code); convert it to "
                "adapter_model.safetensors first, e.g. PeftModel.from_pretrained(...)."
                "save_pretrained(dir, safe_serialization=True)",
            )
        raise MergeError(path, None, "missing")
    read_header(path)  # strict checks with clear messages before the library sees the file
    from safetensors.torch import load_file

    with blame(path, None, "unreadable safetensors"):
        tensors = load_file(path)
    for key, t in tensors.items():
        if not t.is_floating_point():
            raise MergeError(path, key, f"adapter tensor has dtype {t.dtype}, expected floating point")
        if not bool(torch.isfinite(t).all()):
            raise MergeError(path, key, f"non-finite values (inf/nan) in adapter tensor {tuple(t.shape)}")
    return path, tensors


def _pattern_value(patterns: Optional[dict], module: str, default):
    """PEFT's get_pattern_key: the first pattern p with re.match(r'(.*\\.)?(p)$', module)."""
    for pattern, value in (patterns or {}).items():
        try:
            if re.match(rf"(.*\.)?({pattern})$", module):
                return value
        except re.error:
            continue
    return default


_LORA_PART = re.compile(
    r"^(?P<path>.+)\.(?P<part>lora_A|lora_B|lora_E|lora_embedding_A|lora_embedding_B)"
    r"(?P<tail>\.weight|\.bias)?$"
)


def _group(path: str, tensors: dict[str, torch.Tensor], config: dict) -> tuple[dict, dict]:
    """adapter keys -> {module path: {part: (key, tensor)}} and {param name: (key, tensor)} replacements."""
    modules: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    replacements: dict[str, tuple[str, torch.Tensor]] = {}
    to_save = config.get("modules_to_save") or []
    for key, t in tensors.items():
        if not key.startswith(PREFIX):
            raise MergeError(path, key, f"unexpected adapter key (PEFT keys start with {PREFIX!r})")
        name = key[len(PREFIX) :]
        if "lora_magnitude_vector" in name:
            raise MergeError(path, key, "DoRA adapters are not supported")
        m = _LORA_PART.match(name)
        if m:
            part = m["part"] + (".bias" if m["tail"] == ".bias" else "")
            if part == "lora_B.bias" or m["tail"] in (None, ".weight"):
                modules.setdefault(m["path"], {})[part] = (key, t)
                continue
        if ".lora_" in name:
            raise MergeError(path, key, "unrecognised LoRA tensor name")
        param = name.replace(".base_layer.", ".")
        owners = param.split(".")[:-1]
        if ".base_layer." in name or any(o in to_save for o in owners):
            replacements[param] = (key, t)
            continue
        raise MergeError(path, key, "adapter tensor is neither a LoRA A/B/E tensor nor in modules_to_save")
    return modules, replacements


def _delta(path: str, module: str, parts: dict, config: dict, weight: float) -> ModuleDelta:
    adalora = config.get("peft_type") == "ADALORA"
    embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
    a_name, b_name = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
    for needed in (a_name, b_name) + (("lora_E",) if adalora and not embedding else ()):
        if needed not in parts:
            present = ", ".join(sorted(parts))
            raise MergeError(path, f"{PREFIX}{module}.{needed}", f"missing (module has {present})")
    a_key, a = parts[a_name]
    b_key, b = parts[b_name]
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
        raise MergeError(
            path,
            a_key,
            f"rank mismatch: {a_name} {tuple(a.shape)} and {b_name} {tuple(b.shape)} "
            f"({b_key}) must be [r, in] and [out, r]",
        )
    rank = a.shape[0]
    if adalora:
        if embedding:
            raise MergeError(path, a_key, "AdaLoRA embedding adapters are not supported")
        e_key, e = parts["lora_E"]
        if e.shape != (rank, 1):
            raise MergeError(path, e_key, f"lora_E has shape {tuple(e.shape)}, expected ({rank}, 1) for rank {rank}")
        init_r = config["init_r"]
        if rank > init_r:
            raise MergeError(path, a_key, f"rank mismatch: rank {rank} exceeds init_r = {init_r}")
        alpha = config["lora_alpha"]
        scaling = alpha if alpha > 0 else float(rank)
        scale = e.reshape(-1).double() * (scaling / (float(init_r) + 1e-5))
        bias_scale = scaling / (float(init_r) + 1e-5)
    else:
        r = _pattern_value(config.get("rank_pattern"), module, config["r"])
        alpha = _pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"])
        if r != rank:
            raise MergeError(
                path, a_key, f"rank mismatch: tensors have rank {rank} but the config gives r = {r} for this module"
            )
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        scale = torch.full((rank,), float(scaling), dtype=torch.float64)
        bias_scale = scaling
    bias = None
    if "lora_B.bias" in parts:
        bias_key, bias = parts["lora_B.bias"]
        if bias.shape != (b.shape[0],):
            raise MergeError(path, bias_key, f"lora_B.bias has shape {tuple(bias.shape)}, expected ({b.shape[0]},)")
        bias = bias.float()
    return ModuleDelta(
        module,
        "embedding" if embedding else "linear",
        a.float(),
        b.float(),
        scale * weight,
        bias,
        bias_scale * weight,
        bool(config.get("fan_in_fan_out")),
        path,
        a_key,
    )


def _apply_initial(adapter: Adapter, initial_folder: str, config: dict) -> None:
    """OLoRA/PiSSA: trained (A, B) against W - s B0 A0 is (A', B') = ([A; A0], [B, -B0]) against W, same s."""
    init_config = _read_config(initial_folder)
    cfg_path = os.path.join(initial_folder, CONFIG_FILE)
    if init_config.get("peft_type") != "LORA":
        raise MergeError(cfg_path, "peft_type", "the initial adapter must be a LORA adapter")
    path, tensors = _load_tensors(initial_folder)
    modules, _ = _group(path, tensors, init_config)
    if set(modules) != set(adapter.deltas):
        only = sorted(set(modules) ^ set(adapter.deltas))[0]
        raise MergeError(path, f"{PREFIX}{only}", "initial and trained adapters target different modules")
    for module, delta in adapter.deltas.items():
        parts = modules[module]
        a_name, b_name = ("lora_embedding_A", "lora_embedding_B") if delta.kind == "embedding" else ("lora_A", "lora_B")
        if a_name not in parts or b_name not in parts:
            raise MergeError(path, f"{PREFIX}{module}.{a_name}", "missing in the initial adapter")
        with blame(path, parts[a_name][0]):
            a2, b2 = mutated_to_lora_tensors(
                delta.lora_a, delta.lora_b, parts[a_name][1].float(), parts[b_name][1].float()
            )
        delta.lora_a, delta.lora_b = a2, b2
        delta.scale = torch.cat([delta.scale, delta.scale])
    adapter.initial_sha256 = sha256_of(path)


def load_adapter(spec: AdapterSpec) -> Adapter:
    config = _read_config(spec.folder)
    cfg_path = os.path.join(spec.folder, CONFIG_FILE)
    _check_supported(config, cfg_path, spec.initial is not None)
    if spec.initial is not None and config.get("peft_type") != "LORA":
        raise MergeError(cfg_path, "peft_type", "--initial-adapter pairs only with LORA adapters")
    if not math.isfinite(spec.weight):
        raise MergeError(spec.folder, None, f"adapter weight {spec.weight} is not finite")
    path, tensors = _load_tensors(spec.folder)
    modules, replacements = _group(path, tensors, config)
    adapter = Adapter(spec, config, sha256_of(path), sha256_of(cfg_path), None)
    for module, parts in modules.items():
        if any(p.startswith("lora_") and t.numel() == 0 for p, (_k, t) in parts.items()):
            continue  # AdaLoRA may prune a module to rank 0: nothing to merge
        adapter.deltas[module] = _delta(path, module, parts, config, spec.weight)
    adapter.replacements = {name: (t, key) for name, (key, t) in replacements.items()}
    if spec.initial is not None:
        _apply_initial(adapter, spec.initial, config)
    return adapter
