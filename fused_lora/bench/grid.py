"""Which cases a benchmark run covers: quick (a few minutes on 2 CPU cores), targets (the numbers
benchmarks/PERFORMANCE.md reports), full (the whole Llama-7B/8B grid; meant for a GPU, hours on a small CPU)."""
from __future__ import annotations

from itertools import product
from typing import List

import torch

from fused_lora.bench.impls import Case

LLAMA_PROJECTIONS = ((4096, 4096), (4096, 14336), (14336, 4096))
TOKENS = (1, 16, 512, 2048)
RANKS = (8, 16, 64)
DTYPES = (torch.float32, torch.bfloat16)
ADAPTER_COUNTS = (1, 4, 16)
MERGE_SHAPES = ((4096, 4096), (8192, 8192))
GRIDS = ("quick", "targets", "full")


def quick() -> List[Case]:
    cases = [Case("forward", M, 4096, 4096, 16, torch.bfloat16) for M in TOKENS]
    cases += [Case("forward", M, 4096, 4096, 16, torch.float32) for M in (16, 512)]
    cases += [Case("forward_backward", 512, 4096, 4096, 16, torch.bfloat16),
              Case("merge", 0, 4096, 4096, 16, torch.bfloat16)]
    cases += [Case("mixed_forward", 512, 4096, 4096, 16, torch.bfloat16, n) for n in ADAPTER_COUNTS]
    return cases


def targets() -> List[Case]:
    cases = [Case("forward", M, 4096, 4096, 16, dt) for dt in DTYPES for M in (16, 512, 2048)]
    cases += [Case("forward_backward", M, 4096, 4096, 16, dt) for dt in DTYPES for M in (512, 2048)]
    cases += [Case("merge", 0, K, N, r, dt) for (K, N), dt, r in product(MERGE_SHAPES, DTYPES, (16, 64))]
    cases += [Case("mixed_forward", M, 4096, 4096, 16, torch.bfloat16, n) for M in (16, 512) for n in ADAPTER_COUNTS]
    return cases


def full() -> List[Case]:
    cases = []
    for op in ("forward", "forward_backward"):
        cases += [Case(op, M, K, N, r, dt)
                  for (K, N), M, r, dt in product(LLAMA_PROJECTIONS, TOKENS, RANKS, DTYPES)]
    cases += [Case("merge", 0, K, N, r, dt)
              for (K, N), r, dt in product(MERGE_SHAPES + LLAMA_PROJECTIONS[1:], (16, 64), DTYPES)]
    cases += [Case("mixed_forward", M, 4096, 4096, 16, dt, n)
              for M, n, dt in product((16, 512, 2048), ADAPTER_COUNTS, DTYPES)]
    return cases


def cases_for(grid: str) -> List[Case]:
    if grid not in GRIDS:
        raise ValueError(f"unknown grid {grid!r}; expected one of {', '.join(GRIDS)}")
    return {"quick": quick, "targets": targets, "full": full}[grid]()
