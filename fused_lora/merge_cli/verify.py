"""Probe check of a merged weight: x W_merged^T against x W^T + sum_i s_i (x A_i^T) B_i^T, all in float64.

The bound follows from the merge's error model: each merged element is the float32-accumulated delta
(error <= (r+2) u32 |s||B||A| per element) added to W and rounded once to W's dtype (error <= u |W + delta|).
Summed against |x| that gives |y - ref| <= (u + (r+2) u32) * mag with mag = |x| |W|^T + |x| |A|^T |s| |B|^T;
we allow twice that, plus the dtype's subnormal spacing for rows that are (nearly) zero.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

PROBE_ROWS = 4
CHUNK_ELEMENTS = 1 << 20  # float64 temporaries of at most 8 MiB while probing
U32 = 2.0**-24


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def subnormal_step(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps


def probes(name: str, cols: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode("utf-8")))
    return torch.randn(PROBE_ROWS, cols, dtype=torch.float64, generator=gen)


def matmul_rows(x: torch.Tensor, w: torch.Tensor, absolute: bool = False) -> torch.Tensor:
    """x [P, cols] float64 times w [rows, cols]^T, converting w to float64 a row block at a time."""
    step = max(1, CHUNK_ELEMENTS // max(w.shape[1], 1))
    out = torch.empty(x.shape[0], w.shape[0], dtype=torch.float64)
    for i in range(0, w.shape[0], step):
        block = w[i : i + step].to(torch.float64)
        out[:, i : i + step] = x @ (block.abs() if absolute else block).T
    return out


@dataclass
class Expected:
    x: torch.Tensor
    ref: torch.Tensor
    mag: torch.Tensor
    rank: int


def expect(
    name: str, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: torch.Tensor
) -> Expected:
    """Taken from the unmerged weight, before merge_ touches it."""
    x = probes(name, weight.shape[1])
    a, b, s = lora_a.double(), lora_b.double(), scale.double()
    ref = matmul_rows(x, weight) + ((x @ a.T) * s) @ b.T
    mag = matmul_rows(x.abs(), weight, absolute=True) + ((x.abs() @ a.abs().T) * s.abs()) @ b.abs().T
    return Expected(x, ref, mag, lora_a.shape[0])


def check(expected: Expected, merged: torch.Tensor) -> tuple[float, float, bool]:
    """(max relative error, its bound, within bound) of the merged weight against the float64 expectation."""
    y = matmul_rows(expected.x, merged)
    err = (y - expected.ref).abs()
    bound = 2.0 * (unit_roundoff(merged.dtype) + (expected.rank + 2) * U32)
    slack = 2.0 * subnormal_step(merged.dtype) * expected.x.abs().sum(1, keepdim=True)
    ok = bool(torch.isfinite(y).all()) and bool((err <= bound * expected.mag + slack).all())
    rel = (err / expected.mag.clamp_min(torch.finfo(torch.float64).tiny)).max().item() if err.numel() else 0.0
    return rel, bound, ok


def check_bias(
    original: torch.Tensor, merged: torch.Tensor, terms: list[tuple[torch.Tensor, float]]
) -> tuple[float, float, bool]:
    ref = original.double().clone()
    mag = original.double().abs()
    for vec, s in terms:
        ref += s * vec.double()
        mag += abs(s) * vec.double().abs()
    err = (merged.double() - ref).abs()
    bound = 2.0 * (unit_roundoff(merged.dtype) + 2 * U32)
    ok = bool(torch.isfinite(merged).all()) and bool((err <= bound * mag + subnormal_step(merged.dtype)).all())
    rel = (err / mag.clamp_min(torch.finfo(torch.float64).tiny)).max().item() if err.numel() else 0.0
    return rel, bound, ok
