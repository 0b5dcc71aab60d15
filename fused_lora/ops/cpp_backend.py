"""The C++ CPU backend (csrc/, built as fused_lora._C): the op contract of CONTRACT.md on CPU tensors.

Importing this module raises ImportError when the extension was not built (or was built against another
torch); fused_lora.ops.backends then falls back to the plain-torch reference. Inputs arrive validated.
When any input is float64 the ops compute in float64 (csrc/lora_float64.cpp) and, like fused_lora.reference,
return t in float64; the fast paths (float32/float16/bfloat16) are untouched by that.

ISA levels (csrc/isa.h), lowest first: "baseline" (portable x86-64 builds of the loops), "avx2" (x86-64-v3
builds), "avx512" (x86-64-v4 builds + the AVX-512 expand and dA/dB kernels), "avx512_bf16" (+ the AVX512-BF16
shrink). The kernels run the best level the CPU supports unless capped: FUSED_LORA_CPU_ISA=<level> (or "auto"),
read once when the extension loads; a level beyond the CPU, or an unknown name, runs the best supported level
instead and says so with a RuntimeWarning when this module is imported. `use_isa` caps the level for a block of
code (tests, benchmarks). AMX is no level of ours: torch's bf16 GEMMs reach it through oneDNN, which reads its own
cap, ONEDNN_MAX_CPU_ISA (e.g. AVX512_CORE_BF16), once, at its first use in the process.

Base GEMM strategies (csrc/gemm_choice.h): the big product of a call (x @ W^T forward, dy @ W for dx) is computed by
  "vendor"  torch's own GEMM, the one nn.Linear and PEFT get (MKL sgemm; oneDNN for 16-bit where torch routes 16-bit
            GEMMs there, its reference kernel elsewhere); 16-bit outputs are rounded by it, then bias + rank term are
            added and rounded again (CONTRACT.md),
  "mixed"   MKL's 16-bit -> fp32 GEMM, the rank term accumulated with it in fp32, one rounding (16-bit only),
  "direct"  the skinny kernels (csrc/skinny.h): W streamed once in its own dtype, x W^T + t B^T + bias summed in fp32
            and rounded once; for few rows, where vendor GEMMs spend their time packing W or run a reference kernel.
Which one a call takes follows a rule fixed once per process from the CPU (vendor, ISA level) and torch's routing
of 16-bit GEMMs, by dtype, layout and rows (`gemm_rule()` says what it decided here and why; `base_gemm_for` answers
per call shape). Forcing, read at every call: FUSED_LORA_CPU_GEMM=auto|vendor|mixed|direct (`use_base_gemm`),
FUSED_LORA_CPU_DIRECT_MAX_ROWS=<n> (replaces the rule's row limits for direct), and the older
FUSED_LORA_CPU_BF16_EXACT=1 (bf16 never vendor) / FUSED_LORA_CPU_FP16_FAST=1 (fp16 always vendor).
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from typing import Iterator, Optional

import torch

try:
    from fused_lora import _C  # noqa: F401  (loading it registers torch.ops.fused_lora_cpu)
except ImportError as exc:  # not built, or an ABI mismatch with the installed torch
    raise ImportError(
        f"fused_lora C++ CPU backend is not available ({exc}); rebuild it with "
        "`pip install --no-build-isolation -e .` or use FUSED_LORA_BACKEND=reference"
    ) from exc

_ops = torch.ops.fused_lora_cpu

if _C.isa_env_message():
    warnings.warn(f"fused_lora C++ CPU backend: {_C.isa_env_message()}", RuntimeWarning, stacklevel=2)

_isa_lock = threading.Lock()


def isa_paths() -> list[str]:
    """The ISA levels this machine can run, lowest first (e.g. ["baseline", "avx2"] on an AVX2-only CPU)."""
    return list(_C.isa_paths())


def active_isa() -> str:
    """The ISA level the C++ kernels run now."""
    return str(_C.active_isa())


@contextlib.contextmanager
def use_isa(name: str) -> Iterator[str]:
    """Runs the block with the C++ kernels capped at ISA level `name` (one of isa_paths(), or "auto"), then restores
    the level that was active before. For tests and benchmarks: the level is process-wide, so ops running meanwhile
    on other threads run it too. Raises ValueError for a name that is no level or that this CPU cannot run."""
    with _isa_lock:
        previous = active_isa()
        _C.set_active_isa(name)
    try:
        yield active_isa()
    finally:
        with _isa_lock:
            _C.set_active_isa(previous)


@contextlib.contextmanager
def trace_isa_kernels() -> Iterator[dict[str, dict[str, int]]]:
    """Counts, per kernel family and ISA level, the dispatches made inside the block; the dict it yields is filled
    when the block ends. For tests that a level really runs its own code."""
    counts: dict[str, dict[str, int]] = {}
    _C.isa_trace(True)
    try:
        yield counts
    finally:
        counts.update(_C.isa_trace_counts())
        _C.isa_trace(False)


BASE_GEMMS = ("vendor", "mixed", "direct")


def gemm_rule() -> str:
    """What the base-GEMM rule decided on this machine (per dtype: row limits of the direct kernels, the GEMM above
    them) and why."""
    return str(_C.gemm_rule())


def base_gemm_for(dtype: torch.dtype, rows: int, backward: bool = False) -> str:
    """The base GEMM ("vendor", "mixed" or "direct") a call with `dtype` inputs and `rows` rows of x takes now, for
    its forward (x @ W^T) or, with backward=True, its dx (dy @ W); the environment switches included."""
    return str(_C.base_gemm_for(dtype, int(rows), bool(backward)))


@contextlib.contextmanager
def use_base_gemm(name: Optional[str]) -> Iterator[None]:
    """Runs the block with FUSED_LORA_CPU_GEMM=`name` ("vendor", "mixed", "direct", or "auto"/None for the rule),
    then restores the variable. For tests and benchmarks: the environment is process-wide."""
    if name not in (None, "auto") + BASE_GEMMS:
        raise ValueError(f"base GEMM {name!r} is not one of auto, {', '.join(BASE_GEMMS)}")
    previous = os.environ.get("FUSED_LORA_CPU_GEMM")
    if name is None:
        os.environ.pop("FUSED_LORA_CPU_GEMM", None)
    else:
        os.environ["FUSED_LORA_CPU_GEMM"] = name
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("FUSED_LORA_CPU_GEMM", None)
        else:
            os.environ["FUSED_LORA_CPU_GEMM"] = previous


@contextlib.contextmanager
def trace_base_gemms() -> Iterator[dict[str, int]]:
    """Counts the base GEMMs the ops ran inside the block ({"vendor": n, "mixed": n, "direct": n}, one per forward
    and one per dx), filled when the block ends."""
    counts: dict[str, int] = {}
    _C.gemm_trace(True)
    try:
        yield counts
    finally:
        counts.update(_C.gemm_trace_counts())
        _C.gemm_trace(False)


def _detached(*tensors):
    """The C++ ops run ATen calls on at::parallel_for worker threads, where the dispatcher's "below autograd"
    state of the calling thread does not follow: tensors that require grad would make those calls record autograd
    (or refuse out= and in-place forms). The backend is always called below autograd, so detach on entry."""
    return [t.detach() if isinstance(t, torch.Tensor) else t for t in tensors]


# The compute ops: the extension's direct entries (csrc/direct_entry.cpp), the same C++ functions as
# torch.ops.fused_lora_cpu.<op> without the dispatcher's Python layer, which cost as much as the op itself at decode
# sizes. They detach inputs that require grad and run below autograd, as the dispatcher would; they take rank_ptr
# and dropout_p as any sequences of ints / floats and return tuples (lora_bwd's dx: None when not requested).
lora_fwd = _C.lora_fwd
lora_bwd = _C.lora_bwd
lora_rows_fwd = _C.lora_rows_fwd
lora_rows_bwd = _C.lora_rows_bwd


def lora_merge_(weight, lora_a, lora_b, scale, sign, fan_in_fan_out, safe):
    weight, lora_a, lora_b = _detached(weight, lora_a, lora_b)  # a detached weight shares its storage
    return _ops.lora_merge_(weight, lora_a, lora_b, scale, float(sign), bool(fan_in_fan_out), bool(safe))


def dropout_keep(seed, M, K, p, salt):
    return _ops.dropout_keep(seed, int(M), int(K), float(p), int(salt))
