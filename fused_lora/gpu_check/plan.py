"""The kit's steps, their order, phases and time budgets.

Phases: "setup" runs first and alone; the "check" steps run side by side (correctness only, each in its own
process: a CUDA error in one cannot take the others' results with it); the "measure" steps run one after the
other with the GPU to themselves. Budgets are per step, in seconds, per mode; a step plans its work within its
budget and the driver stops it at HARD_FACTOR x budget. The H100 costs below are ESTIMATES (no GPU has run the
kit yet): Triton specializations compile in 2-6 s each, CUDA + torch start in ~5 s per process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence

MODES = ("dry-run", "quick", "full")
HARD_FACTOR = 1.5  # a step still running at HARD_FACTOR x budget (+ HARD_GRACE_S) is stopped
HARD_GRACE_S = 15.0
# a dry run's budgets are generous caps for a crowded 2-core CI machine; it takes ~1-2.5 minutes there
TOTAL_S = {"dry-run": 300.0, "quick": 240.0, "full": 480.0}  # the whole run; later steps shrink to fit


@dataclass(frozen=True)
class Step:
    name: str
    phase: str
    budget: Dict[str, float]
    estimate: str
    summary: str


STEPS = (
    Step(
        "environment",
        "setup",
        {"dry-run": 60, "quick": 30, "full": 30},
        "~10 s: torch import, CUDA init, nvidia-smi, compute-sanitizer --version",
        "python/torch/triton/numpy versions (torch >= 2.11, triton >= 3.6), GPU, tools",
    ),
    Step(
        "tests",
        "check",
        {"dry-run": 100, "quick": 100, "full": 170},
        "~60-100 s quick (~50 specializations over parallel pytest shards), ~120-160 s full (every case)",
        "device-aware kernel/training tests and the contract suite with --device cuda, bf16 included",
    ),
    Step(
        "offsets",
        "check",
        {"dry-run": 60, "quick": 50, "full": 70},
        "~20-40 s: 4-9 GiB tensors, ~8 specializations, float64 references in chunks",
        "M*K and M*N past 2^31 elements: forward, backward, per-row, merge",
    ),
    Step(
        "sanitizer",
        "check",
        {"dry-run": 60, "quick": 100, "full": 160},
        "~60-120 s: two compute-sanitizer processes side by side, each ~20-40 s to start torch under it",
        "compute-sanitizer memcheck and racecheck: per-row backward (atomics), a safe merge that must refuse",
    ),
    Step(
        "graphs",
        "check",
        {"dry-run": 60, "quick": 50, "full": 50},
        "~15-25 s: 3 captures, ~6 specializations",
        "CUDA-graph capture and replay of FusedLoRALinear's eval forward: one adapter, several, adapter_ids",
    ),
    Step(
        "compile",
        "check",
        {"dry-run": 90, "quick": 90, "full": 130},
        "~30-60 s quick (inductor, forward), ~60-100 s full (+ a training step)",
        "torch.compile(fullgraph=True) of a patched tiny Llama, equal to eager",
    ),
    Step(
        "tune",
        "measure",
        {"dry-run": 60, "quick": 35, "full": 80},
        "~25-35 s quick (2 kernels x 4 configs, compiled in parallel first), ~60-80 s full",
        "candidate launch configs per kernel and shape class, timed; writes tuned/<gpu>.json",
    ),
    Step(
        "bench",
        "measure",
        {"dry-run": 80, "quick": 65, "full": 160},
        "~50-70 s quick (16 cases), ~120-160 s full (~90 cases); compiles warmed in parallel first",
        "merged/PEFT/addmm_/fused, fwd and fwd+bwd, mixed decode, merge bandwidth, host us per call",
    ),
)
BY_NAME = {s.name: s for s in STEPS}


def select(only: Sequence[str] = (), skip: Sequence[str] = ()) -> List[Step]:
    unknown = [n for n in list(only) + list(skip) if n not in BY_NAME]
    if unknown:
        raise ValueError(f"unknown step(s) {', '.join(unknown)}; steps: {', '.join(BY_NAME)}")
    chosen = [s for s in STEPS if (not only or s.name in only or s.phase == "setup") and s.name not in skip]
    if not chosen or chosen[0].name != "environment":
        chosen.insert(0, BY_NAME["environment"])  # every run says what it ran on
    return chosen


def budget_lines(steps: Sequence[Step], mode: str) -> List[str]:
    lines = [f"  {'step':<12} {'phase':<8} {'budget':>7}  cost on an H100 (ESTIMATE, not measured)"]
    for s in steps:
        lines.append(f"  {s.name:<12} {s.phase:<8} {s.budget[mode]:>6.0f}s  {s.estimate}")
    check = max([s.budget[mode] for s in steps if s.phase == "check"], default=0)
    total = sum(s.budget[mode] for s in steps if s.phase != "check") + check
    lines.append(f"  check steps run side by side: planned wall time {total:.0f}s (limit {TOTAL_S[mode]:.0f}s)")
    return lines
