"""Input checks for the public entry points: every problem is named before any kernel launches.

Each error names the argument, echoes the value (or shape, dtype and device) it was given, and says what is
expected. The scalar parsers (scaling, dropout_p, rank_splits) turn what callers pass into plain Python numbers
once, so nothing downstream sees a string, a bool or a truncated float.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any, Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_SHOWN_CHARS = 120


def describe(name: str, t: torch.Tensor) -> str:
    return f"{name} (shape {tuple(t.shape)}, {t.dtype}, {t.device})"


def shown(name: str, value: Any) -> str:
    """`name=<the value as given>` for messages (tensors by shape, dtype and device; long reprs cut)."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0 and value.device.type == "cpu":
            return f"{name}={value!r}"
        return describe(name, value)
    text = repr(value)
    if len(text) > _SHOWN_CHARS:
        text = text[:_SHOWN_CHARS] + "..."
    return f"{name}={text}"


def require_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def require_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{describe(name, t)}: unsupported dtype {t.dtype}; expected float32, float16, bfloat16 (or float64)"
        )


def require_same_device(named: Sequence[tuple[str, Optional[torch.Tensor]]]) -> None:
    """Every tensor on the first one's device (x's, by convention): the error names both devices."""
    present = [(n, t) for n, t in named if t is not None]
    first_name, first = present[0]
    for name, t in present[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{describe(name, t)} is on {t.device} but {first_name} is on {first.device}; "
                f"every tensor must be on {first_name}'s device ({describe(first_name, first)})"
            )


def _autocast_note(autocast: Optional[torch.dtype]) -> str:
    if autocast is None:
        return ""
    return (
        f" (under torch.autocast({autocast}), which casts float32/float16/bfloat16 tensors to {autocast} and "
        "leaves float64 alone, as for nn.Linear)"
    )


def check_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], autocast: Optional[torch.dtype] = None
) -> None:
    """x [..., K], weight [N, K], bias [N] or None: F.linear's rules (same dtype, same device) after any autocast
    cast; `autocast` (the autocast dtype, if on) only explains the dtypes in the messages."""
    require_tensor("x", x)
    require_tensor("weight", weight)
    require_float("x", x)
    require_float("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"{describe('weight', weight)} must be 2-D [out_features, in_features]")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{describe('x', x)}: last dim must equal in_features = weight.shape[1] = "
            f"{weight.shape[1]} ({describe('weight', weight)})"
        )
    if x.dtype != weight.dtype:
        raise TypeError(
            f"{describe('x', x)} and {describe('weight', weight)} must share a dtype" + _autocast_note(autocast)
        )
    if bias is not None:
        require_tensor("bias", bias)
        if bias.device != x.device:
            raise ValueError(
                f"{describe('bias', bias)} is on {bias.device} but x is on {x.device}: bias must be "
                "on x's device (as for F.linear)"
            )
        if bias.dtype != weight.dtype:
            raise TypeError(
                f"{describe('bias', bias)} must have the dtype of {describe('weight', weight)} "
                "(as for F.linear)" + _autocast_note(autocast)
            )
        if bias.shape != (weight.shape[0],):
            raise ValueError(
                f"{describe('bias', bias)} must have shape ({weight.shape[0]},) to match {describe('weight', weight)}"
            )


def check_adapters(
    x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, fan_in_fan_out: bool = False
) -> None:
    require_tensor("lora_a", lora_a)
    require_tensor("lora_b", lora_b)
    require_float("lora_a", lora_a)
    require_float("lora_b", lora_b)
    if lora_a.dim() != 2 or lora_b.dim() != 2:
        raise ValueError(
            f"{describe('lora_a', lora_a)} and {describe('lora_b', lora_b)} must be 2-D "
            "([r, in_features] and [out_features, r])"
        )
    n_out, k_in = (weight.shape[1], weight.shape[0]) if fan_in_fan_out else (weight.shape[0], weight.shape[1])
    if lora_a.shape[1] != k_in:
        raise ValueError(
            f"{describe('lora_a', lora_a)}: second dim must equal in_features = {k_in} ({describe('weight', weight)})"
        )
    if lora_b.shape[0] != n_out:
        raise ValueError(
            f"{describe('lora_b', lora_b)}: first dim must equal out_features = {n_out} ({describe('weight', weight)})"
        )
    if lora_a.shape[0] != lora_b.shape[1]:
        raise ValueError(
            f"rank mismatch: {describe('lora_a', lora_a)} has r = {lora_a.shape[0]} but "
            f"{describe('lora_b', lora_b)} has r = {lora_b.shape[1]}"
        )
    if lora_a.dtype != lora_b.dtype:
        raise TypeError(f"{describe('lora_a', lora_a)} and {describe('lora_b', lora_b)} must share a dtype")
    if lora_a.dtype not in (x.dtype, torch.float32, torch.float64):
        raise TypeError(
            f"{describe('lora_a', lora_a)} and lora_b must have x's dtype ({x.dtype}) or float32 "
            f"(x: {describe('x', x)})"
        )
    require_same_device([("x", x), ("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b)])


# ---- scalars: scaling, dropout_p, rank_splits ----------------------------------------------------------------
def _real(name: str, given: Any, value: Any) -> float:
    """A real number from a Python/NumPy number or a 0-d real tensor; `given` is what the caller passed."""
    if type(value) is float or type(value) is int:  # the common case, without the ABC checks below
        return float(value)
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype == torch.bool or value.is_complex():
            raise TypeError(
                f"{shown(name, given)}: expected a real number or a 0-d real tensor, got {describe('a tensor', value)}"
            )
        return float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{shown(name, given)}: expected a real number, got {type(value).__name__} {value!r}")
    return float(value)


def _as_list(name: str, given: Any) -> list:
    """The entries of a per-adapter sequence (list, tuple, 1-D tensor), refusing strings and other scalars."""
    if isinstance(given, (str, bytes)) or not hasattr(given, "__iter__"):
        raise TypeError(f"{shown(name, given)}: expected a number or a sequence of numbers, got {type(given).__name__}")
    if isinstance(given, torch.Tensor) and given.dim() != 1:
        raise ValueError(f"{shown(name, given)}: expected a number, a 0-d tensor or one value per adapter")
    return list(given)


def scaling_values(scaling: Any, n_adapters: int) -> Optional[list[float]]:
    """Python floats, one per adapter, from a number, a 0-d tensor or a per-adapter sequence; None when scaling is a
    1-D tensor (per rank: checked by the caller against R). Non-finite Python values are refused; tensor values are
    not read (on a GPU that would need a host sync)."""
    if isinstance(scaling, torch.Tensor):
        if scaling.dtype == torch.bool or scaling.is_complex():
            raise TypeError(f"{shown('scaling', scaling)}: expected a real (floating or integer) tensor")
        if scaling.dim() > 1:
            raise ValueError(f"{shown('scaling', scaling)}: expected a number, a 0-d tensor or one value per rank")
        return None
    if type(scaling) is float or isinstance(scaling, (numbers.Number, bool)):
        values = [_real("scaling", scaling, scaling)] * n_adapters
    else:
        values = [_real("scaling", scaling, v) for v in _as_list("scaling", scaling)]
        if len(values) != n_adapters:
            raise ValueError(
                f"{shown('scaling', scaling)} has {len(values)} values but there are {n_adapters} "
                "adapters (rank_splits)"
            )
    for v in values:
        if not math.isfinite(v):
            raise ValueError(f"{shown('scaling', scaling)}: every scaling must be finite, got {v}")
    return values


def dropout_rates(dropout_p: Any, n_adapters: int) -> list[float]:
    """Python floats in [0, 1), one per adapter, from a number, a 0-d tensor or a per-adapter sequence."""
    if (
        type(dropout_p) is float
        or isinstance(dropout_p, (numbers.Number, bool))
        or (isinstance(dropout_p, torch.Tensor) and dropout_p.dim() == 0)
    ):
        rates = [_real("dropout_p", dropout_p, dropout_p)] * n_adapters
    else:
        rates = [_real("dropout_p", dropout_p, p) for p in _as_list("dropout_p", dropout_p)]
        if len(rates) != n_adapters:
            raise ValueError(
                f"{shown('dropout_p', dropout_p)} has {len(rates)} values but there are {n_adapters} "
                "adapters (rank_splits)"
            )
    for p in rates:
        if not 0.0 <= p < 1.0:  # NaN fails too
            raise ValueError(f"{shown('dropout_p', dropout_p)}: every rate must be in [0, 1), got {p}")
    return rates


def rank_sizes(rank_splits: Any, total: int) -> list[int]:
    """The ranks of the stacked adapters (ints >= 1 summing to lora_a.shape[0]); None means one adapter."""
    if rank_splits is None:
        return [total]
    sizes = []
    for r in _as_list("rank_splits", rank_splits):
        if isinstance(r, bool) or (isinstance(r, torch.Tensor) and r.dtype == torch.bool):
            raise TypeError(f"{shown('rank_splits', rank_splits)}: ranks must be integers, got {r!r}")
        try:
            sizes.append(operator.index(r))
        except TypeError:
            raise TypeError(
                f"{shown('rank_splits', rank_splits)}: ranks must be integers, got {type(r).__name__} {r!r}"
            ) from None
    if any(r < 1 for r in sizes):
        raise ValueError(f"{shown('rank_splits', rank_splits)}: every rank must be >= 1")
    if sum(sizes) != total:
        raise ValueError(f"{shown('rank_splits', rank_splits)} sum to {sum(sizes)} but lora_a has {total} ranks")
    return sizes
