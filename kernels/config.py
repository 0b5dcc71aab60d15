"""Host-side choices every launcher shares: matmul precision, how many programs fill the GPU, split counts, the
tuned-config store, and the counters of split reductions.

    precision(*tensors)                  "tf32" or "ieee" for tl.dot, by the contract's fp32 rule
    sm_count(device)                     streaming multiprocessors of a CUDA device; an H100's 132 otherwise
    target_programs(device)              programs a launch that streams memory needs: PROGRAMS_PER_SM per SM
    split_count(programs, steps, device) splits of a reduction axis that fill the GPU
    tuned(kernel, shape_class, default, device)   kernels/tuned.py's tuned_config, or `default`
    split_counters(device, n)            a zeroed int32 buffer of >= n counters (see kernels/blocks.arrive_last)
    pdl_enabled(device)                  whether a consumer launch overlaps the producer before it (PDL, below)
    pdl_launch(pdl)                      the launch options of a PDL consumer ({} when off)

Programmatic dependent launch (PDL, Hopper sm_90 and later). Two launches of one op are a producer and a
consumer: the shrink (t), then the decode kernel or the fused GEMM (they read t only in their epilogue). With PDL
the shrink's programs call gdc_launch_dependents as they start, the consumer is launched with launch_pdl=True and
its programs start while the shrink still runs: they stream W through their whole K loop, then call gdc_wait (which
returns once the shrink has completed and its writes are visible) before anything that touches memory the shrink
wrote or the consumer shares with it: t, the split partials (the caching allocator may hand the consumer the
shrink's freed partial buffer), the split counters. Before gdc_wait a consumer reads only x and W, which were
written before the shrink started (the shrink itself is launched normally, so it starts after everything before
it has completed). kernels/launch_plan.py models what this saves (the consumer's launch gap and the shrink's
latency, hidden behind the W stream).

Switch: FUSED_LORA_PDL=1 turns it on for CUDA devices of compute capability >= 9 (read at every launch); unset or
0 leaves it off. Off by default until a GPU has run it: no machine here has executed a griddepcontrol
instruction, and a misplaced wait is a race (wrong numbers, no error), the kind of inter-program dependency
DESIGN.md keeps behind a switch until measured (tests/test_triton_pdl.py has the GPU check: PDL on and off must
give bit-identical results, eagerly and replayed from a CUDA graph). Never on under the Triton interpreter (it
cannot run griddepcontrol) nor on sm_80 (no PDL there).
CUDA graphs: the decision is the same while a stream is capturing. A PDL launch is captured as a programmatic
edge (CUDA >= 12.3, the CUDA programming guide's "Use in CUDA Graphs"; Triton's own PDL tutorial times its kernel
from a captured graph), and launch_pdl is one of Triton's compile options: flipping it during capture would need a
second binary of the kernel, loaded while capturing, which CUDA refuses ("operation not permitted when stream is
capturing"). PDL therefore needs CUDA >= 12.3 (torch.version.cuda); older builds keep it off.
"""

from __future__ import annotations

import os

import torch
import triton

from fused_lora.kernels.tuned import tuned_config

H100_SMS = 132  # what plans and interpreter runs model when there is no CUDA device
PROGRAMS_PER_SM = 2  # a memory-streaming launch needs >= 2 resident programs per SM to reach HBM bandwidth
MAX_SPLITS = 32  # bounds every partial buffer: at most MAX_SPLITS partials of one output tile
WAVE_EFFICIENCY = 0.9  # programs / (SMs x programs on the busiest SM) a split count aims for


def precision(*tensors: torch.Tensor) -> str:
    """fp32 operands follow torch.backends.cuda.matmul.allow_tf32 (the contract); 16-bit dots ignore it."""
    if any(t is not None and t.dtype == torch.float32 for t in tensors) and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


_SMS: dict = {}


def sm_count(device) -> int:
    device = torch.device(device)
    if device.type != "cuda":
        return H100_SMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SMS:
        _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SMS[index]


def target_programs(device) -> int:
    return PROGRAMS_PER_SM * sm_count(device)


def split_count(programs: int, steps: int, device) -> int:
    """Splits of a reduction axis of `steps` block steps for a launch of `programs` programs per split: the
    fewest that reach target_programs(device) and spread evenly over the SMs (programs on the busiest SM at most
    1/WAVE_EFFICIENCY of the mean: 272 programs on 132 SMs leave 8 SMs a third program, 384 are even), each split
    at least one step, at most MAX_SPLITS. 1 when the launch is already big enough."""
    target = target_programs(device)
    if programs <= 0 or steps <= 1 or programs >= target:
        return 1
    most = min(steps, MAX_SPLITS)
    least = max(1, min(most, triton.cdiv(target, programs)))
    sms = sm_count(device)
    for splits in range(least, most + 1):
        total = programs * splits
        if total >= WAVE_EFFICIENCY * sms * triton.cdiv(total, sms):
            return splits
    return least


def tuned(kernel: str, shape_class: str, default: dict, device=None) -> dict:
    """The tuned store's config for (kernel, shape_class) on this GPU over `default` (kernels/tuned.py)."""
    return tuned_config(kernel, shape_class, default, device=device)


_COUNTERS: dict = {}


def split_counters(device, n: int) -> torch.Tensor:
    """A zeroed int32 buffer of at least n counters for split reductions, one per (device, stream).

    Every kernel leaves the counters it used at zero (the last program to arrive resets its counter), so one
    buffer serves every launch of a stream in turn, with no memset per call (CUDA-graph capturable once made).
    """
    device = torch.device(device)
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
        _COUNTERS[key] = buf
    return buf


PDL_ENV = "FUSED_LORA_PDL"
PDL_MIN_CAPABILITY = (9, 0)
PDL_MIN_CUDA = (12, 3)  # stream capture of a PDL launch (a programmatic graph edge)


def pdl_switch() -> bool:
    """FUSED_LORA_PDL: "1" on, "0" or unset off (the default until a GPU has measured it; see the module doc)."""
    value = os.environ.get(PDL_ENV, "0").strip()
    if value not in ("0", "1", ""):
        raise ValueError(
            f"{PDL_ENV}={value!r}: expected 0 (off, the default) or 1 (programmatic dependent launch "
            "on CUDA devices of compute capability >= 9.0)"
        )
    return value == "1"


def interpreting() -> bool:
    """True when Triton runs kernels in its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


_CAPABILITY: dict = {}


def device_capability(device):
    """(major, minor) of a CUDA device, None for any other device."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CAPABILITY:
        _CAPABILITY[index] = tuple(torch.cuda.get_device_capability(index))
    return _CAPABILITY[index]


def _cuda_version() -> tuple:
    try:
        return tuple(int(p) for p in (torch.version.cuda or "0.0").split(".")[:2])
    except ValueError:
        return (0, 0)


def _triton_has_gdc() -> bool:
    try:
        from triton.language.extra import cuda
    except ImportError:
        return False
    return hasattr(cuda, "gdc_wait") and hasattr(cuda, "gdc_launch_dependents")


def pdl_enabled(device) -> bool:
    """Whether launches on `device` use programmatic dependent launch (module doc): the switch is on, the device is
    a CUDA GPU of compute capability >= 9.0, the kernels are compiled (not interpreted), torch's CUDA can capture a
    PDL launch, and this Triton has the griddepcontrol functions. The same answer while a stream is capturing."""
    if not pdl_switch() or interpreting():
        return False
    capability = device_capability(device)
    if capability is None or capability < PDL_MIN_CAPABILITY:
        return False
    return _cuda_version() >= PDL_MIN_CUDA and _triton_has_gdc()


def pdl_launch(pdl: bool) -> dict:
    """Launch options of a consumer kernel: launch_pdl=True when it overlaps its producer."""
    return {"launch_pdl": True} if pdl else {}
