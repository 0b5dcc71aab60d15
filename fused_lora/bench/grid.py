"""Which cases a benchmark run covers: quick (under a minute on 2 CPU cores; Llama-sized on a GPU), targets (the
numbers benchmarks/PERFORMANCE.md reports), full (the whole Llama-7B/8B grid; meant for a GPU, hours on a small CPU).

Every grid gives each plotted line at least two points: forward and forward+backward over several token counts,
mixed batches over several adapter counts, merges over two ranks."""

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


def quick(device_type: str = "cpu") -> List[Case]:
    """CPU: fp32 1024 x 1024 (bf16 GEMMs on a CPU without bf16 instructions take seconds and measure the CPU's
    emulation, not LoRA's overhead). GPU: bf16 Llama projections 4096 x 4096, decode to long prefill."""
    if device_type == "cuda":
        K = N = 4096
        dtype, tokens, train_tokens, mixed_tokens = torch.bfloat16, (1, 16, 512, 2048, 8192), (512, 2048, 8192), 512
    else:
        K = N = 1024
        dtype, tokens, train_tokens, mixed_tokens = torch.float32, (1, 16, 128, 512), (16, 128, 512), 128
    cases = [Case("forward", M, K, N, 16, dtype) for M in tokens]
    cases += [Case("forward_backward", M, K, N, 16, dtype) for M in train_tokens]
    cases += [Case("mixed_forward", mixed_tokens, K, N, 16, dtype, n) for n in ADAPTER_COUNTS]
    cases += [Case("merge", 0, K, N, r, dtype) for r in (16, 64)]
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
        cases += [Case(op, M, K, N, r, dt) for (K, N), M, r, dt in product(LLAMA_PROJECTIONS, TOKENS, RANKS, DTYPES)]
    cases += [
        Case("merge", 0, K, N, r, dt)
        for (K, N), r, dt in product(MERGE_SHAPES + LLAMA_PROJECTIONS[1:], (16, 64), DTYPES)
    ]
    cases += [
        Case("mixed_forward", M, 4096, 4096, 16, dt, n) for M, n, dt in product((16, 512, 2048), ADAPTER_COUNTS, DTYPES)
    ]
    return cases


def cases_for(grid: str, device_type: str = "cpu") -> List[Case]:
    if grid not in GRIDS:
        raise ValueError(f"unknown grid {grid!r}; expected one of {', '.join(GRIDS)}")
    if grid == "quick":
        return quick(device_type)
    return {"targets": targets, "full": full}[grid]()
