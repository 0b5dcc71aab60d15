"""Timing for the bench and tune steps: interleaved rounds, CUDA events, an L2 flush before every timed call.

Each round times every callable in turn (A B C D, then B C D A, ...), `reps` calls each; a sample is the mean of
those calls. On CUDA every call is bracketed by its own pair of events and preceded, untimed, by writing a 256 MiB
buffer, so W comes from HBM as it does in a model whose layers each bring their own weights (a 4096 x 4096 bf16
W alone fits in an H100's 50 MiB L2 and would otherwise be timed from cache). The events also capture host
launch gaps, so a call that is bound by its Python overhead is timed as such. On the CPU: perf_counter.
Results come as fused_lora.bench.timing.Timings, so the bench's statistics and records apply unchanged.
"""

from __future__ import annotations

import time
from typing import Callable, Dict, Optional

import torch

from fused_lora.bench.timing import Timings

L2_FLUSH_BYTES = 256 * 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Flusher:
    def __init__(self, device: torch.device, enabled: bool = True):
        self.buffer = (
            torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)
            if enabled and device.type == "cuda"
            else None
        )

    def __call__(self) -> None:
        if self.buffer is not None:
            self.buffer.zero_()


def interleaved(
    fns: Dict[str, Callable[[], object]],
    device: torch.device,
    *,
    rounds: int = 5,
    reps: int = 3,
    warmup: int = 1,
    flush: bool = True,
    after_each: Optional[Dict[str, Callable[[], object]]] = None,
    max_seconds: Optional[float] = None,
    min_rounds: int = 2,
) -> Timings:
    """Per-call seconds of every callable, one sample per round (see the module docstring)."""
    names = list(fns)
    after = after_each or {}
    flusher = Flusher(device, flush)
    timings = Timings({name: [] for name in names})
    for name in names:
        for _ in range(warmup):
            fns[name]()
            after.get(name, lambda: None)()
    _sync(device)
    began = time.perf_counter()
    for index in range(rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            fn, restore = fns[name], after.get(name)
            if device.type == "cuda":
                pairs = []
                for _ in range(reps):
                    flusher()
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    fn()
                    end.record()
                    pairs.append((start, end))
                    if restore is not None:
                        restore()  # after the end event: untimed
                torch.cuda.synchronize(device)
                total = sum(s.elapsed_time(e) for s, e in pairs) / 1e3
            else:
                total = 0.0
                for _ in range(reps):
                    t0 = time.perf_counter()
                    fn()
                    total += time.perf_counter() - t0
                    if restore is not None:
                        restore()
            timings.samples[name].append(total / reps)
        if max_seconds is not None and index + 1 >= min_rounds and time.perf_counter() - began > max_seconds:
            break
    return timings


def host_seconds(fn: Callable[[], object], device: torch.device, calls: int = 100, warmup: int = 5) -> float:
    """Host time per call: the calls are issued back to back and the clock stops before waiting on the GPU. Use a
    shape whose GPU work is shorter than the host work, or the launch queue fills and the GPU time shows through."""
    for _ in range(warmup):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - t0
    _sync(device)
    return elapsed / calls
