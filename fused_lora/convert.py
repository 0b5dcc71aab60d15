"""Adapter conversions users hit when deploying: OLoRA/PiSSA adapters (trained from a mutated base) to plain
LoRA adapters for the original base.

An adapter initialised with (A0, B0) changes the base to W - s B0 A0 before training; after training the
layer computes (W - s B0 A0) + s B A = W + s (B A - B0 A0). Against the original W that is one LoRA adapter of
rank 2r: A' = [A; A0], B' = [B, -B0], with the same scaling s; so r doubles and alpha doubles (alpha * sqrt(2)
under rsLoRA, where s = alpha / sqrt(r)).
"""
from __future__ import annotations

import math

import torch


def mutated_to_lora_tensors(lora_a: torch.Tensor, lora_b: torch.Tensor, initial_a: torch.Tensor,
                            initial_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A', B') of rank 2r whose B' A' equals B A - B0 A0 exactly (no arithmetic, only concatenation)."""
    if lora_a.shape != initial_a.shape or lora_b.shape != initial_b.shape:
        raise ValueError(f"trained adapter (lora_a {tuple(lora_a.shape)}, lora_b {tuple(lora_b.shape)}) and "
                         f"initial adapter (lora_a {tuple(initial_a.shape)}, lora_b {tuple(initial_b.shape)}) "
                         "must have the same shapes")
    return torch.cat([lora_a, initial_a.to(lora_a.dtype)], 0), torch.cat([lora_b, -initial_b.to(lora_b.dtype)], 1)


def converted_alpha(lora_alpha: float, use_rslora: bool) -> float:
    """alpha for the rank-2r adapter that keeps the scaling of the rank-r one."""
    return lora_alpha * (math.sqrt(2.0) if use_rslora else 2.0)
