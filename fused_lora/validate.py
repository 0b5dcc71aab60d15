"""Input checks for the public entry points: every problem is named before any kernel launches."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def describe(name: str, t: torch.Tensor) -> str:
    return f"{name} (shape {tuple(t.shape)}, {t.dtype}, {t.device})"


def require_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def require_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{describe(name, t)}: unsupported dtype; expected float32, float16, bfloat16 (or float64)")


def require_same_device(named: Sequence[tuple[str, Optional[torch.Tensor]]]) -> None:
    present = [(n, t) for n, t in named if t is not None]
    first_name, first = present[0]
    for name, t in present[1:]:
        if t.device != first.device:
            raise ValueError(f"{describe(name, t)} is not on the same device as {describe(first_name, first)}")


def check_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    require_tensor("x", x)
    require_tensor("weight", weight)
    require_float("x", x)
    require_float("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"{describe('weight', weight)} must be 2-D [out_features, in_features]")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"{describe('x', x)}: last dim must equal in_features = weight.shape[1] = "
                         f"{weight.shape[1]} ({describe('weight', weight)})")
    if x.dtype != weight.dtype:
        raise TypeError(f"{describe('x', x)} and {describe('weight', weight)} must share a dtype")
    if bias is not None:
        require_tensor("bias", bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"{describe('bias', bias)} must have shape ({weight.shape[0]},) to match "
                             f"{describe('weight', weight)}")


def check_adapters(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                   fan_in_fan_out: bool = False) -> None:
    require_tensor("lora_a", lora_a)
    require_tensor("lora_b", lora_b)
    require_float("lora_a", lora_a)
    require_float("lora_b", lora_b)
    if lora_a.dim() != 2 or lora_b.dim() != 2:
        raise ValueError(f"{describe('lora_a', lora_a)} and {describe('lora_b', lora_b)} must be 2-D "
                         "([r, in_features] and [out_features, r])")
    n_out, k_in = (weight.shape[1], weight.shape[0]) if fan_in_fan_out else (weight.shape[0], weight.shape[1])
    if lora_a.shape[1] != k_in:
        raise ValueError(f"{describe('lora_a', lora_a)}: second dim must equal in_features = {k_in} "
                         f"({describe('weight', weight)})")
    if lora_b.shape[0] != n_out:
        raise ValueError(f"{describe('lora_b', lora_b)}: first dim must equal out_features = {n_out} "
                         f"({describe('weight', weight)})")
    if lora_a.shape[0] != lora_b.shape[1]:
        raise ValueError(f"rank mismatch: {describe('lora_a', lora_a)} has r = {lora_a.shape[0]} but "
                         f"{describe('lora_b', lora_b)} has r = {lora_b.shape[1]}")
    if lora_a.dtype != lora_b.dtype:
        raise TypeError(f"{describe('lora_a', lora_a)} and {describe('lora_b', lora_b)} must share a dtype")
    if lora_a.dtype not in (x.dtype, torch.float32, torch.float64):
        raise TypeError(f"adapters ({lora_a.dtype}) must have x's dtype ({x.dtype}) or float32")
    require_same_device([("x", x), ("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b)])


def check_rank_splits(rank_splits: Sequence[int], total: int) -> None:
    if any(int(r) < 1 for r in rank_splits):
        raise ValueError(f"rank_splits {list(rank_splits)} must all be >= 1")
    if sum(int(r) for r in rank_splits) != total:
        raise ValueError(f"rank_splits {list(rank_splits)} sum to {sum(rank_splits)} but lora_a has {total} ranks")


def check_dropout(ps: Sequence[float]) -> None:
    for p in ps:
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout_p {p} must be in [0, 1)")
