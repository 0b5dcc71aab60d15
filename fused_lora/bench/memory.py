"""Peak extra memory of one call: how far memory use rises above what was in use just before it.

CUDA: torch's caching allocator keeps exact books (reset_peak_memory_stats / max_memory_allocated).
CPU: torch's CPU allocations do not go through tracemalloc, and the profiler's memory events attribute
allocations to ops rather than giving a timeline we can trust for a peak. So we measure the process's resident
set: free heap memory is first handed back to the OS (malloc_trim) so new allocations fault in fresh pages, the
kernel's high-water mark is reset (writing 5 to /proc/self/clear_refs), the call runs, and the result is
VmHWM - VmRSS(before). It counts every byte the process touched (honest, and it sees temporaries inside
C++/BLAS code too); it can undercount a temporary carved out of heap memory that stayed resident, and it is
process-wide, so nothing else may run in the process meanwhile. Page granularity (4 KiB) is the resolution.
Returns None where the mechanism is unavailable (non-Linux).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import re
from typing import Callable, Optional

import torch

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


def _status_bytes(key: str) -> int:
    with open(_STATUS) as f:
        match = re.search(rf"^{key}:\s+(\d+)\s+kB", f.read(), re.MULTILINE)
    if match is None:
        raise OSError(f"{key} missing from {_STATUS}")
    return int(match.group(1)) * 1024


def _malloc_trim() -> None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def cpu_rss_peak_extra(fn: Callable[[], object]) -> Optional[int]:
    try:
        _malloc_trim()
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
        before = _status_bytes("VmRSS")
    except OSError:
        return None
    fn()
    try:
        return max(0, _status_bytes("VmHWM") - before)
    except OSError:
        return None


def cuda_peak_extra(fn: Callable[[], object], device: torch.device) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return max(0, torch.cuda.max_memory_allocated(device) - before)


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Peak memory above the level before the call (see the module docstring for the method per device)."""
    if device.type == "cuda":
        return cuda_peak_extra(fn, device)
    return cpu_rss_peak_extra(fn)


def method_description(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated above memory_allocated before the call"
    return "process RSS high-water (VmHWM after /proc/self/clear_refs reset and malloc_trim) above RSS before"
