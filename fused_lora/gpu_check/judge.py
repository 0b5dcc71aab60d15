"""The project's judgement of a kernel result (tests/checks.py), for the kit's own checks:

err(ours) <= 2 * err(PyTorch at the same dtype) + atol,   errors = max |x - float64 reference|
"""

from __future__ import annotations

from typing import Tuple

import torch

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def max_abs_err(a: torch.Tensor, ref64: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.detach().to(torch.float64) - ref64.detach().to(device=a.device, dtype=torch.float64)).abs().max().item()


def judge(
    name: str, ours: torch.Tensor, ref64: torch.Tensor, torch_same: torch.Tensor, atol: float
) -> Tuple[bool, str]:
    """(passed, one line saying why)."""
    if tuple(ours.shape) != tuple(ref64.shape):
        return False, f"{name}: shape {tuple(ours.shape)} != reference {tuple(ref64.shape)}"
    if not bool(torch.isfinite(ours).all()):
        return False, f"{name}: non-finite values"
    err, torch_err = max_abs_err(ours, ref64), max_abs_err(torch_same, ref64)
    bound = 2 * torch_err + atol
    verdict = "ok" if err <= bound else "FAILED"
    return err <= bound, f"{name}: err {err:.3e} vs bound {bound:.3e} (torch same dtype {torch_err:.3e}) {verdict}"
