"""Shared judgement for kernel outputs: a float64 reference, relative to PyTorch's own error."""
from __future__ import annotations

import torch


def max_abs_err(a: torch.Tensor, ref64: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.detach().to(torch.float64) - ref64.detach().to(torch.float64)).abs().max().item()


def assert_close_vs_reference(ours: torch.Tensor, ref64: torch.Tensor, torch_same_dtype: torch.Tensor,
                              atol: float = 1e-6, name: str = "output") -> None:
    """err(ours) <= 2 * err(torch at the same dtype) + atol, errors measured against the float64 result."""
    assert ours.shape == ref64.shape, f"{name}: shape {tuple(ours.shape)} != reference {tuple(ref64.shape)}"
    assert torch.isfinite(ours).all(), f"{name}: non-finite values (poisoned output not overwritten?)"
    err = max_abs_err(ours, ref64)
    torch_err = max_abs_err(torch_same_dtype, ref64)
    bound = 2 * torch_err + atol
    assert err <= bound, f"{name}: max abs err {err:.3e} > bound {bound:.3e} (torch same-dtype err {torch_err:.3e})"


def poison_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, float("nan"))
