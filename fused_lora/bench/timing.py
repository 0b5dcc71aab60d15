"""Interleaved timing of several implementations of one op, and the statistics reported for them.

Implementations are timed in rounds: every round runs each implementation once (A B C D, then B C D A, ...),
so slow drifts of the machine (other jobs, frequency, caches) hit all of them alike. A ratio against the
baseline is taken per round (paired) and then summarised, so it never mixes two runs.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np
import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def quantile(values: List[float], q: float) -> float:
    """numpy's linear-interpolated quantile; NaN for no values."""
    return float(np.quantile(values, q)) if len(values) else math.nan


@dataclass
class Spread:
    median: float
    p20: float
    p80: float

    @classmethod
    def of(cls, values: List[float]) -> "Spread":
        if not len(values):
            return cls(math.nan, math.nan, math.nan)
        p20, median, p80 = np.quantile(values, [0.2, 0.5, 0.8])
        return cls(float(median), float(p20), float(p80))


@dataclass
class Timings:
    """Per-call seconds of every implementation, one sample per round, in round order."""

    samples: Dict[str, List[float]] = field(default_factory=dict)

    def spread(self, impl: str) -> Spread:
        return Spread.of(self.samples[impl])

    def ratio(self, impl: str, baseline: str) -> Optional[Spread]:
        if baseline not in self.samples or impl not in self.samples:
            return None
        paired = [a / b for a, b in zip(self.samples[impl], self.samples[baseline]) if b > 0]
        return Spread.of(paired) if paired else None


def _time_once(fn: Callable[[], object], inner: int, device: torch.device) -> float:
    """Seconds per call of `inner` back-to-back calls: CUDA events on a GPU (what the stream spent, host launch
    gaps included), perf_counter around a synchronised loop on the CPU."""
    synchronize(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e-3 / inner
    start_s = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - start_s) / inner


class InterleavedTimer:
    """Times several callables round by round: prepare() once (warmup, calibration), then round() repeatedly.

    Each sample runs its callable `inner` times back to back (chosen once per implementation so a sample lasts at
    least `min_sample_s`: GPU launches of a few microseconds are not timed one by one). `after_each[name]`, if
    given, runs untimed after every call of `name` (e.g. restoring a weight after an in-place merge); such a
    callable is timed one call per sample. Round i starts at implementation i mod n (A B C, B C A, ...).
    """

    def __init__(
        self,
        fns: Dict[str, Callable[[], object]],
        device: torch.device,
        *,
        warmup: int = 1,
        min_sample_s: float = 0.005,
        after_each: Optional[Dict[str, Callable[[], object]]] = None,
    ):
        self.fns, self.device, self.warmup, self.min_sample_s = fns, device, warmup, min_sample_s
        self.after_each = after_each or {}
        self.names = list(fns)
        self.inner: Dict[str, int] = {}
        self.timings = Timings({name: [] for name in self.names})

    def _restore(self, name: str) -> None:
        if name in self.after_each:
            self.after_each[name]()

    def prepare(self) -> "InterleavedTimer":
        for name in self.names:
            for _ in range(self.warmup):
                self.fns[name]()
                self._restore(name)
            probe = _time_once(self.fns[name], 1, self.device)
            self._restore(name)
            self.inner[name] = 1 if name in self.after_each else max(1, math.ceil(self.min_sample_s / max(probe, 1e-9)))
        return self

    def round(self) -> None:
        if not self.inner:
            self.prepare()
        shift = len(self.timings.samples[self.names[0]]) % len(self.names)
        for name in self.names[shift:] + self.names[:shift]:
            self.timings.samples[name].append(_time_once(self.fns[name], self.inner[name], self.device))
            self._restore(name)


def time_interleaved(
    fns: Dict[str, Callable[[], object]],
    device: torch.device,
    *,
    rounds: int = 7,
    warmup: int = 1,
    min_sample_s: float = 0.005,
    max_seconds: Optional[float] = None,
    min_rounds: int = 3,
    after_each: Optional[Dict[str, Callable[[], object]]] = None,
) -> Timings:
    """`rounds` interleaved rounds of every callable (see InterleavedTimer); per-call seconds per round.
    `max_seconds` stops early, but never before `min_rounds` rounds."""
    timer = InterleavedTimer(fns, device, warmup=warmup, min_sample_s=min_sample_s, after_each=after_each).prepare()
    began = time.perf_counter()
    for round_index in range(rounds):
        timer.round()
        if max_seconds is not None and round_index + 1 >= min_rounds and time.perf_counter() - began > max_seconds:
            break
    return timer.timings
