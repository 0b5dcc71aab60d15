"""Shared judgement for kernel outputs: a float64 reference, relative to PyTorch's own error.

assert_close_vs_reference   err(ours) <= 2 * err(plain torch at the same dtype) + atol, both against float64
torch_lora                  the plain-torch yardstick (PEFT's order of operations) at the inputs' own dtypes
assert_rounded_once         an in-place merge rounded once: within half an ulp of the float64 result
strided_like / dy_like      operands as strided views whose padding holds NaN (a kernel that reads it shows)
poisoned_empty              every torch.empty while it is active is NaN-filled (outputs a kernel forgets)
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F

# mantissa bits (without the implicit one) and smallest normal exponent of each float dtype
_MANTISSA = {torch.float64: 52, torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}


def max_abs_err(a: torch.Tensor, ref64: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.detach().to(torch.float64) - ref64.detach().to(torch.float64)).abs().max().item()


def assert_close_vs_reference(
    ours: torch.Tensor, ref64: torch.Tensor, torch_same_dtype: torch.Tensor, atol: float = 1e-6, name: str = "output"
) -> None:
    """err(ours) <= 2 * err(torch at the same dtype) + atol, errors measured against the float64 result."""
    assert ours.shape == ref64.shape, f"{name}: shape {tuple(ours.shape)} != reference {tuple(ref64.shape)}"
    assert torch.isfinite(ours).all(), f"{name}: non-finite values (poisoned output not overwritten?)"
    err = max_abs_err(ours, ref64)
    torch_err = max_abs_err(torch_same_dtype, ref64)
    bound = 2 * torch_err + atol
    assert err <= bound, f"{name}: max abs err {err:.3e} > bound {bound:.3e} (torch same-dtype err {torch_err:.3e})"


def poison_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, float("nan"))


def ulp_atol(dtype: torch.dtype, ref64: torch.Tensor) -> float:
    """One unit of `dtype`'s precision at the reference's scale: the slack for a different but sound order of
    summation where plain torch happens to be (nearly) exact."""
    scale = ref64.detach().abs().max().item() if ref64.numel() else 0.0
    return torch.finfo(dtype).eps * (1.0 + scale)


@contextlib.contextmanager
def poisoned_empty() -> Iterator[None]:
    """Fill every uninitialised allocation (torch.empty and friends, also those made by the C++ extension through
    at::empty and by Triton launchers) with NaN while active, so an output element a kernel never writes reads as
    NaN instead of whatever the allocator left there. Deterministic mode is on only for this; warn_only keeps
    ops without a deterministic implementation running."""
    was_on = torch.are_deterministic_algorithms_enabled()
    was_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    was_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_on, warn_only=was_warn)
        torch.utils.deterministic.fill_uninitialized_memory = was_fill


def strided_like(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The values of `t` as a view with the requested memory layout; memory the view skips holds NaN.

    contig: a fresh contiguous copy. row_pad: rows of length last-dim + 3 (the row stride a slice buf[..., :K]
    gives). col_step: last-dim stride 2. transposed: the last two dims stored the other way round (2-D and up).
    """
    if layout == "contig":
        return t.clone()
    if layout == "row_pad":
        buf = torch.full((*t.shape[:-1], t.shape[-1] + 3), float("nan"), dtype=t.dtype, device=t.device)
        buf[..., : t.shape[-1]] = t
        return buf[..., : t.shape[-1]]
    if layout == "col_step":
        buf = torch.full((*t.shape[:-1], 2 * t.shape[-1]), float("nan"), dtype=t.dtype, device=t.device)
        buf[..., ::2] = t
        return buf[..., ::2]
    if layout == "transposed":
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    raise ValueError(f"unknown layout {layout!r}")


def torch_lora(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: torch.Tensor,
    rank_ptr: Sequence[int],
    keeps: Optional[Sequence[Optional[torch.Tensor]]] = None,
    inv_keep: Optional[Sequence[float]] = None,
    row_ids: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """y = F.linear(x, W, b) + sum_i lora_B_i(lora_A_i(drop_i(x))) * s_i in plain torch, as PEFT orders it.

    Run on the inputs' own dtypes (or under torch.autocast) it is the error yardstick; run on float64 copies it is
    the exact answer. scale [R]: per-rank scaling. keeps[i] [M, K] bool (None: no dropout for adapter i) with
    inv_keep[i] = 1/(1-p_i) as float32 computes it. row_ids [M] (int64): row m takes only adapter row_ids[m]
    (rows with any other id, -1 or out of range, take none). Differentiable in every tensor.
    """
    y = F.linear(x, weight, bias)
    rows = math.prod(x.shape[:-1])  # explicit: reshape(-1, 0) is ambiguous when K or N is 0
    x2 = x.reshape(rows, x.shape[-1])
    y2 = y.reshape(rows, y.shape[-1])
    term = None
    for i in range(len(rank_ptr) - 1):
        lo, hi = rank_ptr[i], rank_ptr[i + 1]
        xd = x2
        if keeps is not None and keeps[i] is not None:
            inv = torch.tensor(inv_keep[i], dtype=torch.float32, device=x.device)
            xd = x2 * keeps[i].to(x2.dtype) * inv.to(x2.dtype)
        h = F.linear(xd.to(lora_a.dtype), lora_a[lo:hi])
        h = h * scale[lo:hi].to(device=h.device, dtype=h.dtype)
        ti = F.linear(h, lora_b[:, lo:hi])
        if row_ids is not None:
            ti = ti * (row_ids == i).to(ti.dtype)[:, None]
        term = ti if term is None else term + ti
    if term is None:
        return y
    # PEFT adds the LoRA term at its own dtype (fp32 adapters: fp32) and casts the sum back to the output dtype
    return (y2 + term).to(y.dtype).reshape(y.shape)


def half_ulp(values64: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Half the spacing of `dtype` at each value (subnormal spacing below the smallest normal), in float64."""
    finfo = torch.finfo(dtype)
    min_exp = int(math.log2(finfo.tiny))
    exp = torch.floor(torch.log2(values64.abs().clamp_min(finfo.tiny)))
    exp = exp.clamp_min(min_exp)
    return torch.pow(2.0, exp - _MANTISSA[dtype]) / 2


def assert_rounded_once(
    ours: torch.Tensor, exact64: torch.Tensor, accum_slack64: torch.Tensor, name: str = "weight"
) -> None:
    """Each element of `ours` is the float64 result rounded once to ours.dtype: within half an ulp of it, plus
    `accum_slack64` (the bound on the accumulation error of the precision the merge computes in)."""
    assert ours.shape == exact64.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(exact64.shape)}"
    if ours.numel() == 0:
        return
    assert torch.isfinite(ours).all(), f"{name}: non-finite values after the merge"
    err = (ours.detach().to(torch.float64) - exact64).abs()
    bound = half_ulp(exact64, ours.dtype) + accum_slack64
    worst = int(torch.argmax(err - bound))
    assert bool((err <= bound).all()), (
        f"{name}: not rounded once: element {worst} is {ours.reshape(-1)[worst].item()!r}, exact "
        f"{exact64.reshape(-1)[worst].item()!r}, err {err.reshape(-1)[worst].item():.3e} > half ulp + "
        f"accumulation slack {bound.reshape(-1)[worst].item():.3e} ({int((err > bound).sum())} elements)"
    )


def assert_bits_equal(ours: torch.Tensor, before: torch.Tensor, name: str = "weight") -> None:
    """Bit-identical (NaN payloads and signed zeros included), as a refused in-place op must leave its input."""
    assert ours.dtype == before.dtype and ours.shape == before.shape, f"{name}: dtype/shape changed"
    int_view = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[ours.element_size()]
    a = ours.detach().contiguous().view(int_view) if ours.is_floating_point() else ours.detach()
    b = before.detach().contiguous().view(int_view) if before.is_floating_point() else before.detach()
    changed = int((a != b).sum())
    assert changed == 0, f"{name}: {changed} element(s) changed by a call that was refused"
