"""Which implementation runs an op: decided here, from the tensors' device and FUSED_LORA_BACKEND.

    FUSED_LORA_BACKEND unset/"auto": CUDA tensors -> fused_lora.ops.cuda_dispatch, which picks per shape between
                                     the Triton kernels and the cuBLAS composition (never the slower one by its
                                     measurement or model); CPU tensors -> the C++ backend (plain torch if it was
                                     not built, said once by a warning and by fused_lora.backend_info()).
    "triton":    the CUDA dispatch (Triton kernels, or the cuBLAS composition where it decides so), also for CPU
                 tensors (then TRITON_INTERPRET=1 is required, and the dispatch always takes the Triton kernels).
    "cublas":    the cuBLAS composition (fused_lora.ops.cublas_backend: torch GEMMs, rank term with beta = 1) on
                 any device: forced, and how tests run it on CPU tensors.
    "cpp":       the C++ backend (CPU tensors only).
    "reference": plain torch (fused_lora.reference), any device.

`resolve(device)` is what the ops call: the decision of `backend_for`, remembered per (FUSED_LORA_BACKEND value,
device type), so a call costs one environment read and one dict lookup; a changed FUSED_LORA_BACKEND (tests set
it per test) is a new key. `backend_for` decides afresh at every call (backend_info and tests use it).
"""

from __future__ import annotations

import importlib
import os
import warnings
from functools import lru_cache
from types import ModuleType

import torch

_CHOICES = ("auto", "triton", "cublas", "cpp", "reference")


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here; the message says why and what to do."""


def requested_backend() -> str:
    name = os.environ.get("FUSED_LORA_BACKEND", "auto").strip().lower() or "auto"
    if name not in _CHOICES:
        raise ValueError(f"FUSED_LORA_BACKEND={name!r} is not one of {', '.join(_CHOICES)}")
    return name


@lru_cache(maxsize=None)
def _import_cpp() -> tuple[ModuleType | None, str]:
    try:
        return importlib.import_module("fused_lora.ops.cpp_backend"), ""
    except Exception as exc:  # not built, or built against another torch
        return None, f"{type(exc).__name__}: {exc}"


@lru_cache(maxsize=None)
def _import_triton() -> tuple[ModuleType | None, str]:
    try:
        return importlib.import_module("fused_lora.ops.cuda_dispatch"), ""
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"


_warned_fallback = False


def _cpp_or_fallback() -> ModuleType:
    global _warned_fallback
    module, why = _import_cpp()
    if module is not None:
        return module
    if not _warned_fallback:
        warnings.warn(
            f"fused_lora: C++ CPU backend unavailable ({why}); CPU ops use plain torch (reference).",
            RuntimeWarning,
            stacklevel=3,
        )
        _warned_fallback = True
    return importlib.import_module("fused_lora.reference")


def _triton_for(device_type: str) -> ModuleType:
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise BackendUnavailable(
            "FUSED_LORA_BACKEND=triton on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
            "before Python starts (it must be set before triton is imported)"
        )
    module, why = _import_triton()
    if module is None:
        raise BackendUnavailable(
            f"Triton backend unavailable ({why}); install triton or use FUSED_LORA_BACKEND=reference"
        )
    return module


def backend_for(device: "torch.device") -> ModuleType:  # noqa: F821
    """The module implementing the op contract for tensors on `device`."""
    name = requested_backend()
    if name == "reference":
        return importlib.import_module("fused_lora.reference")
    if name == "cublas":
        return importlib.import_module("fused_lora.ops.cublas_backend")
    if name == "triton":
        return _triton_for(device.type)
    if name == "cpp":
        if device.type != "cpu":
            raise BackendUnavailable(f"FUSED_LORA_BACKEND=cpp runs CPU tensors only, got {device}")
        module, why = _import_cpp()
        if module is None:
            raise BackendUnavailable(
                f"FUSED_LORA_BACKEND=cpp but the C++ backend is unavailable ({why}); "
                "reinstall with a C++ compiler (pip install --no-build-isolation -e .)"
            )
        return module
    if device.type == "cpu":
        return _cpp_or_fallback()
    return _triton_for(device.type)


def backend_info() -> str:
    """One line per device kind saying which implementation runs there and why."""
    name = requested_backend()
    cpp, cpp_why = _import_cpp()
    cpu = {
        "reference": "reference (plain torch, forced)",
        "triton": "triton (interpreter)"
        if os.environ.get("TRITON_INTERPRET") == "1"
        else "triton requested but TRITON_INTERPRET is not 1 (ops will raise)",
    }.get(name)
    if cpu is None:
        cpu = "cpp (fused_lora._C)" if cpp is not None else f"reference (C++ backend unavailable: {cpp_why})"
    tri, tri_why = _import_triton()
    if name == "reference":
        cuda = "reference (plain torch, forced)"
    elif name == "cublas":
        cuda = "cublas composition (forced)"
    elif tri is None:
        cuda = f"unavailable: {tri_why}"
    elif name == "triton":
        cuda = "triton (forced)"
    else:
        cuda = "fused Triton or cuBLAS composition, chosen per shape (python -m fused_lora info --explain)"
    if not torch.cuda.is_available():
        cuda = f"no CUDA device here; on one: {cuda}"
    return f"cpu: {cpu}\ncuda: {cuda}"


_ENV = "FUSED_LORA_BACKEND"
_resolved: dict = {}


def _env_reader(name: str):
    """A function returning os.environ's current value of `name` (None when unset) at every call. On CPython it
    reads os.environ's own dict (what os.environ[...] = / del / monkeypatch.setenv write): os.environ.get raises and
    catches a KeyError inside when the variable is unset, and that costs more than the op call's other host work."""
    data, encode, decode = (getattr(os.environ, attr, None) for attr in ("_data", "encodekey", "decodevalue"))
    if not isinstance(data, dict) or encode is None or decode is None:
        return lambda: os.environ.get(name)
    key = encode(name)

    def read():
        value = data.get(key)
        return None if value is None else decode(value)

    return read


backend_env = _env_reader(_ENV)


def resolve(device: "torch.device") -> ModuleType:  # noqa: F821
    """backend_for(device), remembered per (FUSED_LORA_BACKEND, device type). Errors are not remembered (the next
    call raises again, with the same message). Triton on CPU tensors re-checks TRITON_INTERPRET at every call, as
    backend_for does."""
    key = (backend_env(), device.type)
    module = _resolved.get(key)
    if module is None:
        module = backend_for(device)
        _resolved[key] = module
    elif key[1] == "cpu" and module is _import_triton()[0]:
        _triton_for("cpu")
    return module


def clear_cache() -> None:
    """Forget resolve()'s decisions (after changing what backend_for depends on other than the environment)."""
    _resolved.clear()
