"""Tuned launch configs per GPU model, and the interface a kernel module offers to the tuner.

A lent GPU runs the tune step of `bash scripts/gpu_check.sh`; it times candidate configs per kernel and shape
class and writes `<OUT>/tuned/<gpu-slug>.json`, which is committed as `kernels/tuned/<gpu-slug>.json`
(slug of torch.cuda.get_device_name: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"). Launchers read it:

    cfg = tuned_config("fused_gemm", "y:bf16:M>256", default=static_table_entry, device=x.device)

returns `default` unless this GPU's file has an entry for (kernel, shape_class); then a copy of `default` with
the entry's values for default's keys (keys the kernel no longer takes are dropped, new keys keep their static
value, so a file written before a kernel change never breaks a launch). The file of a GPU is read once per
process (the first call for that GPU), never per call; a call costs two dict lookups and a dict copy.
CPU tensors (the interpreter) get `default`, unless FUSED_LORA_TUNED_GPU names a GPU.

Environment (read once; clear_cache() re-reads):
    FUSED_LORA_TUNED=0          ignore tuned files (static tables only; for A/B timing)
    FUSED_LORA_TUNED_DIR=PATH   read files from PATH instead of kernels/tuned/ (the kit's bench uses the fresh
                                tune results this way before anyone commits them)
    FUSED_LORA_TUNED_GPU=NAME   use NAME's file for every device, CPU included (tests, dry runs, a GPU whose name
                                differs from the tuned one)

File schema (SCHEMA = 1):
    {"schema": 1, "gpu": "NVIDIA H100 80GB HBM3", "meta": {"capability": [9, 0], "torch": ..., "triton": ...,
     "date": ..., "command": ...},
     "kernels": {KERNEL: {SHAPE_CLASS: {
         "config": {...},                  # what tuned_config returns over the default (ints, bools, strings)
         "default": {...},                 # the static entry it was measured against
         "shape": {"M": 4096, ...},        # the representative shape that was timed
         "median_us": 12.3, "default_median_us": 13.1, "speedup": 1.065,
         "candidates": [{"config": {...}, "median_us": ..., "status": "ok" | "wrong" | "error", "detail": ...}],
         "triton": "3.6.0", "date": "..."}}}}

Tuner interface: a kernel module may define `tune_space() -> list[TuneCase]`; the tune step finds it (pkgutil, as
codegen finds codegen_specs), times `default` and each candidate with CUDA events, rejects candidates whose output
is further from the float64 reference than the default's allows, and keeps a candidate only when it beats the
default by TUNE_MARGIN. `shape_class` must be exactly the string the launcher passes to tuned_config for the
case's shape; name it after the static table's branch, e.g. "y:bf16:M>256" or "bf16:M<=16".
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence

import torch

SCHEMA = 1
TUNE_MARGIN = 1.03  # a candidate replaces the static config only when >= 3% faster (paired medians)
_TUNED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuned")
_VALUE_TYPES = (bool, int, str)


@dataclass
class TuneRun:
    """Inputs of one tune case, allocated once; `launch(config)` runs the kernel once and returns its output."""

    launch: Callable[[dict], torch.Tensor]
    reference: Optional[torch.Tensor] = None  # float64 expected output; None: compare with the default's output
    atol: float = 0.0
    shape: Dict[str, int] = field(default_factory=dict)
    reset: Optional[Callable[[], object]] = None  # run untimed after each launch (an in-place kernel's input)


@dataclass(frozen=True)
class TuneCase:
    kernel: str  # the launcher's tuned_config(kernel, ...)
    shape_class: str  # the launcher's shape class for `shape` below
    default: Dict[str, object]  # the static table's config for this class
    candidates: Sequence[Dict[str, object]]  # configs to try, each with default's keys (default may be absent)
    make: Callable[[torch.device, bool], TuneRun]  # (device, tiny) -> inputs; tiny: a dry-run shape for CPU
    description: str = ""


def gpu_slug(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    if not slug:
        raise ValueError(f"GPU name {name!r} has no letters or digits to name a tuned-config file with")
    return slug


def tuned_path(gpu_name: str, directory: Optional[str] = None) -> str:
    return os.path.join(directory or _TUNED_DIR, gpu_slug(gpu_name) + ".json")


def _valid_config(config) -> bool:
    return isinstance(config, dict) and all(
        isinstance(k, str) and isinstance(v, _VALUE_TYPES) for k, v in config.items()
    )


def read_file(path: str) -> dict:
    """The whole tuned file (schema-checked); {} when absent."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or data.get("schema") != SCHEMA or not isinstance(data.get("kernels"), dict):
        raise ValueError(
            f"{path}: not a tuned-config file of schema {SCHEMA} "
            f"(schema {data.get('schema') if isinstance(data, dict) else type(data).__name__})"
        )
    return data


def load_table(gpu_name: str, directory: Optional[str] = None) -> Dict[str, Dict[str, dict]]:
    """{kernel: {shape_class: config}} of one GPU; {} when it has no file. A broken file warns and counts as none."""
    path = tuned_path(gpu_name, directory)
    try:
        data = read_file(path)
    except (OSError, ValueError) as exc:  # a damaged file must not take the static configs down with it
        warnings.warn(f"fused_lora: ignoring tuned configs in {path}: {exc}", RuntimeWarning, stacklevel=3)
        return {}
    table: Dict[str, Dict[str, dict]] = {}
    for kernel, classes in data.get("kernels", {}).items():
        if not isinstance(classes, dict):
            continue
        for shape_class, entry in classes.items():
            config = entry.get("config") if isinstance(entry, dict) else None
            if _valid_config(config):
                table.setdefault(kernel, {})[shape_class] = dict(config)
            else:
                warnings.warn(
                    f"fused_lora: ignoring tuned config {kernel}/{shape_class} in {path}: expected a dict "
                    f"of int/bool/str values, got {config!r}",
                    RuntimeWarning,
                    stacklevel=3,
                )
    return table


# ---- the per-process cache: settings, device names, tables ------------------------------------------------------
_settings: Optional[tuple] = None  # (enabled, directory, forced gpu name)
_names: Dict[int, str] = {}  # CUDA device index -> name
_tables: Dict[str, Dict[str, Dict[str, dict]]] = {}


def clear_cache() -> None:
    """Forget settings, device names and loaded files (after writing a file, or changing the environment)."""
    global _settings
    _settings = None
    _names.clear()
    _tables.clear()


def _read_settings() -> tuple:
    global _settings
    if _settings is None:
        enabled = os.environ.get("FUSED_LORA_TUNED", "1").strip() not in ("0", "false", "no", "off")
        _settings = (
            enabled,
            os.environ.get("FUSED_LORA_TUNED_DIR") or None,
            os.environ.get("FUSED_LORA_TUNED_GPU") or None,
        )
    return _settings


def _gpu_name(device) -> Optional[str]:
    forced = _read_settings()[2]
    if forced is not None:
        return forced
    if device is not None:
        device = torch.device(device)
        if device.type != "cuda":
            return None
        index = device.index
    else:
        if not torch.cuda.is_available():
            return None
        index = None
    if index is None:
        index = torch.cuda.current_device()
    name = _names.get(index)
    if name is None:
        name = _names[index] = torch.cuda.get_device_name(index)
    return name


def _table(gpu_name: str) -> Dict[str, Dict[str, dict]]:
    table = _tables.get(gpu_name)
    if table is None:
        table = _tables[gpu_name] = load_table(gpu_name, _read_settings()[1])
    return table


def tuned_config(kernel: str, shape_class: str, default: Dict[str, object], device=None) -> Dict[str, object]:
    """`default` with this GPU's tuned values for (kernel, shape_class) over it, as a new dict (see module doc)."""
    if not _read_settings()[0]:
        return dict(default)
    name = _gpu_name(device)
    if name is None:
        return dict(default)
    entry = _table(name).get(kernel, {}).get(shape_class)
    merged = dict(default)
    if entry:
        for key in default:
            if key in entry:
                merged[key] = entry[key]
    return merged


# ---- writer (the tune step) ---------------------------------------------------------------------------------------
def write_tuned(
    gpu_name: str,
    results: Dict[str, Dict[str, dict]],
    *,
    out_dir: str,
    base_dir: Optional[str] = None,
    meta: Optional[dict] = None,
) -> str:
    """Write `<out_dir>/<slug>.json`: the GPU's file in base_dir (default kernels/tuned/) with `results` over it.

    results: {kernel: {shape_class: entry}}, each entry holding at least "config" (see the schema above). Entries
    for other kernels or classes are kept from the base file, so a partial tune run loses nothing. The file is
    written to a temporary name and renamed into place. Returns the path written.
    """
    base = read_file(tuned_path(gpu_name, base_dir or _TUNED_DIR))
    kernels = {k: dict(v) for k, v in base.get("kernels", {}).items()}
    for kernel, classes in results.items():
        for shape_class, entry in classes.items():
            if not _valid_config(entry.get("config")):
                raise ValueError(
                    f"tuned entry {kernel}/{shape_class} needs a 'config' dict of int/bool/str values, "
                    f"got {entry.get('config')!r}"
                )
            kernels.setdefault(kernel, {})[shape_class] = entry
    merged_meta = dict(base.get("meta", {}))
    merged_meta.update(meta or {})
    merged_meta["written"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    data = {
        "schema": SCHEMA,
        "gpu": gpu_name,
        "meta": merged_meta,
        "kernels": {k: dict(sorted(v.items())) for k, v in sorted(kernels.items())},
    }
    os.makedirs(out_dir, exist_ok=True)
    path = tuned_path(gpu_name, out_dir)
    fd, tmp = tempfile.mkstemp(prefix=".tuned-", suffix=".json", dir=out_dir)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    clear_cache()
    return path
