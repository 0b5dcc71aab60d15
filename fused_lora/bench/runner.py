"""Measure one case: interleaved timings of every implementation, turned into JSON-ready records."""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from fused_lora.bench import memory
from fused_lora.bench.impls import Case, Setup, build
from fused_lora.bench.timing import Timings, time_interleaved


@dataclass
class Budget:
    rounds: int = 7
    warmup: int = 1
    max_seconds_per_case: Optional[float] = None
    min_sample_s: float = 0.005


def backend_name(device: torch.device) -> str:
    from fused_lora.ops.backends import backend_for

    return backend_for(device).__name__.rsplit(".", 1)[-1]


def _round(value: Optional[float], digits: int = 4) -> Optional[float]:
    return None if value is None else round(value, digits)


def measure_case(case: Case, device: torch.device, budget: Budget = Budget()) -> List[Dict]:
    setup = build(case, device)
    timings = time_interleaved(
        setup.fns,
        device,
        rounds=budget.rounds,
        warmup=budget.warmup,
        min_sample_s=budget.min_sample_s,
        max_seconds=budget.max_seconds_per_case,
        after_each=setup.after_each,
    )
    records = records_for(case, device, setup, timings)
    del setup
    gc.collect()
    return records


def records_for(case: Case, device: torch.device, setup: Setup, timings: Timings) -> List[Dict]:
    """JSON records of one measured case; merges also get their peak extra memory, probed here."""
    peaks: Dict[str, Optional[int]] = {}
    if case.op == "merge":
        for name, fn in setup.fns.items():
            peaks[name] = memory.peak_extra_bytes(fn, device)
            setup.after_each[name]()
    fused_backend = backend_name(device)
    records = []
    for name in setup.fns:
        spread = timings.spread(name)
        vs_merged = timings.ratio(name, setup.baseline) if setup.baseline else None
        vs_peft = timings.ratio(name, "peft")
        record = {
            "op": case.op,
            "impl": name,
            "device": device.type,
            "dtype": case.dtype_name,
            "M": case.M,
            "K": case.K,
            "N": case.N,
            "r": case.r,
            "n_adapters": case.n_adapters,
            "median_s": spread.median,
            "p20_s": spread.p20,
            "p80_s": spread.p80,
            "ratio_vs_merged": _round(vs_merged.median) if vs_merged else None,
            "ratio_vs_merged_p20": _round(vs_merged.p20) if vs_merged else None,
            "ratio_vs_merged_p80": _round(vs_merged.p80) if vs_merged else None,
            "ratio_vs_peft": _round(vs_peft.median) if vs_peft else None,
            "ratio_vs_peft_p20": _round(vs_peft.p20) if vs_peft else None,
            "ratio_vs_peft_p80": _round(vs_peft.p80) if vs_peft else None,
            "rounds": len(timings.samples[name]),
            "backend": fused_backend if name == "fused" else "torch",
        }
        if case.op == "merge":
            record["peak_extra_bytes"] = peaks.get(name)
        records.append(record)
    return records
