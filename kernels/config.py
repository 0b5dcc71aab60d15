"""Host-side choices every launcher shares: matmul precision, how many programs fill the GPU, split counts, the
tuned-config store, and the counters of split reductions.

    precision(*tensors)                  "tf32" or "ieee" for tl.dot, by the contract's fp32 rule
    sm_count(device)                     streaming multiprocessors of a CUDA device; an H100's 132 otherwise
    target_programs(device)              programs a launch that streams memory needs: PROGRAMS_PER_SM per SM
    split_count(programs, steps, device) splits of a reduction axis that fill the GPU
    tuned(kernel, shape_class, default, device)   kernels/tuned.py's tuned_config, or `default`
    split_counters(device, n)            a zeroed int32 buffer of >= n counters (see kernels/blocks.arrive_last)
"""
from __future__ import annotations

import torch
import triton

from fused_lora.kernels.tuned import tuned_config

H100_SMS = 132           # what plans and interpreter runs model when there is no CUDA device
PROGRAMS_PER_SM = 2      # a memory-streaming launch needs >= 2 resident programs per SM to reach HBM bandwidth
MAX_SPLITS = 32          # bounds every partial buffer: at most MAX_SPLITS partials of one output tile
WAVE_EFFICIENCY = 0.9    # programs / (SMs x programs on the busiest SM) a split count aims for


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
