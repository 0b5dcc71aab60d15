"""Math entry points: lora_linear (one or several adapters on every row), lora_linear_rows (one adapter per
row), merge_ / unmerge_. They apply torch.autocast's casts, validate, flatten leading dims, build the per-rank
scale vector and the dropout seed, and call the ops in fused_lora.ops (which pick the backend). Autograd comes
with the ops.

torch.autocast (any device type that has it, CPU included, bfloat16 or float16): lora_linear and lora_linear_rows
follow nn.Linear's rules, because PEFT's LoRA is nn.Linear calls. Every float32/float16/bfloat16 operand on the
autocast device (x, weight, bias, lora_a, lora_b) is cast to the autocast dtype; float64 operands are left alone
(so all-float64 inputs compute in float64, and float64 x over float32 weights is refused, as F.linear refuses it).
The output has the autocast dtype; gradients reach every leaf in its own dtype (float32 master adapters get
float32 gradients, x gets x's dtype). merge_/unmerge_ are not autocast ops: they use the tensors' own dtypes.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

from fused_lora import ops
from fused_lora.validate import (
    check_adapters,
    check_linear,
    describe,
    dropout_rates,
    rank_sizes,
    require_float,
    require_tensor,
    scaling_values,
)

Scaling = Union[float, int, Sequence[Union[float, torch.Tensor]], torch.Tensor]
DropoutP = Union[float, torch.Tensor, Sequence[Union[float, torch.Tensor]]]

# the dtypes torch.autocast casts (it never casts float64)
_AUTOCAST_CASTS = (torch.float32, torch.float16, torch.bfloat16)
_INT_IDS = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


# one thread-local read when autocast is off everywhere (the usual eval and float32 training case)
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None)


def autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The dtype torch.autocast runs F.linear in on `device`, or None when autocast is off there."""
    if _any_autocast is not None and not _any_autocast():
        return None
    kind = device.type
    if kind not in ("cpu", "cuda") and not torch.amp.is_autocast_available(kind):
        return None
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None


def autocast_cast(t: Optional[torch.Tensor], device_type: str, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """One operand as autocast hands it to F.linear: float32/float16/bfloat16 tensors on the autocast device in
    `dtype`; float64, integer and other devices' tensors unchanged. Differentiable (the gradient comes back in the
    operand's own dtype)."""
    if (
        not isinstance(t, torch.Tensor)
        or t.dtype == dtype
        or t.dtype not in _AUTOCAST_CASTS
        or t.device.type != device_type
    ):
        return t
    return t.to(dtype)


def _rank_ptr(ranks: list[int]) -> list[int]:
    ptr = [0]
    for r in ranks:
        ptr.append(ptr[-1] + r)
    return ptr


def _scale_tensor_checked(scaling: torch.Tensor, total: int) -> torch.Tensor:
    scaling_values(scaling, 1)  # dtype and dim checks
    if scaling.dim() == 1 and scaling.shape != (total,):
        raise ValueError(f"{describe('scaling', scaling)} must be 0-d or have one value per rank ({total},)")
    return scaling


# Small read-only tensors that calls with the same Python numbers share (scale vectors, the zero seed), so a call
# does not allocate (or copy from the host) what the previous one already made. Used and filled in plain eager mode
# only (ops.plain_eager: not under torch.compile, FakeTensorMode, `with torch.device(...)`, ...), never filled
# while a CUDA graph is captured (its memory belongs to the graph); made outside inference mode.
_CONSTANTS: dict = {}
_CONSTANTS_SIZE = 256


def _constant(key: tuple, device: torch.device, make):
    value = _CONSTANTS.get(key)
    if value is not None and ops.plain_eager():
        return value
    if not ops.plain_eager() or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return make()
    if torch.is_inference_mode_enabled():
        with torch.inference_mode(False):
            value = make()
    else:
        value = make()
    if len(_CONSTANTS) >= _CONSTANTS_SIZE:
        _CONSTANTS.clear()
    _CONSTANTS[key] = value
    return value


def _scale_vector(scaling: Scaling, rank_ptr: list[int], device: torch.device) -> torch.Tensor:
    """Per-rank float32 scale [R] from a number, one value per adapter, or a 0-d / per-rank [R] tensor."""
    total, n = rank_ptr[-1], len(rank_ptr) - 1
    if isinstance(scaling, torch.Tensor):
        scaling = _scale_tensor_checked(scaling, total).detach().to(device=device, dtype=torch.float32)
        return scaling.expand(total).contiguous() if scaling.dim() == 0 else scaling.contiguous()
    values = scaling_values(scaling, n)
    per_rank = [v for i, v in enumerate(values) for _ in range(rank_ptr[i + 1] - rank_ptr[i])]
    return _constant(
        ("scale", tuple(per_rank), device), device, lambda: torch.tensor(per_rank, dtype=torch.float32, device=device)
    )


def _fold_trainable_scale(lora_a: torch.Tensor, scaling: torch.Tensor) -> torch.Tensor:
    """A scale that needs a gradient (AdaLoRA's lora_E) is folded into A, so the ops' scale stays a constant."""
    column = scaling.reshape(-1, 1) if scaling.dim() > 0 else scaling
    return lora_a * column.to(lora_a.dtype)


def draw_dropout_seed(device: torch.device) -> torch.Tensor:
    """The Philox seed of one call: from torch's generator, so deterministic under torch.manual_seed and fresh
    at every call; it stays on the device (no host sync) and is all autograd keeps of the dropout mask."""
    return torch.randint(-(2**63), 2**63 - 1, (1,), dtype=torch.int64, device=device)


def zero_seed(device: torch.device) -> torch.Tensor:
    """The seed of calls without dropout (never read by the ops then); one shared tensor per device."""
    return _constant(("zero_seed", device), device, lambda: torch.zeros(1, dtype=torch.int64, device=device))


def _seed(x: torch.Tensor, training: bool, ps: list[float]) -> torch.Tensor:
    if training and any(p > 0 for p in ps):
        return draw_dropout_seed(x.device)
    return zero_seed(x.device)


def _rows_2d(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] as [M, K] (M = product of the leading dims, also when K == 0)."""
    if x.dim() == 2:
        return x
    k = x.shape[-1]
    return x.reshape(-1, k) if k else x.reshape(math.prod(x.shape[:-1]), 0)


def _unflatten(y: torch.Tensor, x: torch.Tensor, n_out: int) -> torch.Tensor:
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], n_out)


def _prepare(x, weight, bias, lora_a, lora_b, scaling, rank_splits, dropout_p, training):
    require_tensor("x", x)
    cast_to = autocast_dtype(x.device)
    unscaled_a = lora_a
    if cast_to is not None:
        kind = x.device.type
        x, weight, bias, lora_a, lora_b = (autocast_cast(t, kind, cast_to) for t in (x, weight, bias, lora_a, lora_b))
    check_linear(x, weight, bias, cast_to)
    check_adapters(x, weight, lora_a, lora_b)
    rank_ptr = _rank_ptr(rank_sizes(rank_splits, lora_a.shape[0]))
    ps = dropout_rates(dropout_p, len(rank_ptr) - 1)
    if not training:
        ps = [0.0] * len(ps)
    if isinstance(scaling, torch.Tensor) and scaling.requires_grad:
        # folded before the autocast cast, as PEFT's AdaLoRA multiplies lora_A * lora_E in the adapters' dtype
        lora_a = _fold_trainable_scale(unscaled_a, _scale_tensor_checked(scaling, rank_ptr[-1]))
        if cast_to is not None:
            lora_a = autocast_cast(lora_a, x.device.type, cast_to)
        scale = torch.ones(rank_ptr[-1], dtype=torch.float32, device=x.device)
    else:
        scale = _scale_vector(scaling, rank_ptr, x.device)
    return _rows_2d(x), weight, bias, lora_a.contiguous(), lora_b.contiguous(), scale, rank_ptr, ps


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: Scaling,
    *,
    dropout_p: DropoutP = 0.0,
    training: bool = False,
    rank_splits: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    """y = x W^T + b + sum_i s_i (drop_i(x) A_i^T) B_i^T for x of shape [..., K] (any K >= 0: K == 0 gives the
    bias broadcast, or zeros).

    lora_a [R, K] and lora_b [N, R] hold one adapter, or several stacked along the rank axis with their ranks in
    `rank_splits` (integers, not floats). `scaling`: a real number (not a bool), one per adapter (numbers or 0-d
    tensors), or a tensor, 0-d or per rank [R] (a tensor that requires grad trains, as AdaLoRA's lora_E).
    `dropout_p`: one rate (a number or a 0-d tensor) or one per adapter, in [0, 1); applied to the LoRA path only,
    and only when `training`. Numbers must be finite. Rates and per-adapter scalings given as 0-d tensors are read
    on the host (one sync each on CUDA); a tensor `scaling` is not read on the host (its values are not checked).
    Bad values raise TypeError/ValueError naming the argument and echoing the value given.
    x, weight and bias follow F.linear: one dtype, one device; the adapters have x's dtype or float32.
    Under torch.autocast the operands are cast as nn.Linear's are (module docstring).
    """
    x2, weight, bias, lora_a, lora_b, scale, rank_ptr, ps = _prepare(
        x, weight, bias, lora_a, lora_b, scaling, rank_splits, dropout_p, training
    )
    y = ops.forward(x2, weight.contiguous(), bias, lora_a, lora_b, scale, rank_ptr, ps, _seed(x2, training, ps))
    return _unflatten(y, x, weight.shape[0])


def lora_linear_prepared(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: torch.Tensor,
    rank_ptr: list[int],
    dropout_p: list[float],
    seed: torch.Tensor,
    backend=None,
) -> torch.Tensor:
    """lora_linear for operands a layer plan (fused_lora.plan) checked when it was built, without autocast: the
    ops' own arguments (CONTRACT.md: scale [R] float32, rank_ptr, one rate per adapter, zeros outside training,
    the seed) and optionally the backend module (fused_lora.ops.resolve's answer). x must have weight's dtype and
    device (the plan's key holds them); only its last dim is checked here."""
    dims = x.dim()
    if dims < 1 or x.shape[-1] != weight.shape[1]:
        check_linear(x, weight, bias)
    y = ops.forward(
        x if dims == 2 else _rows_2d(x),
        weight if weight.is_contiguous() else weight.contiguous(),
        bias,
        lora_a,
        lora_b,
        scale,
        rank_ptr,
        dropout_p,
        seed,
        backend,
    )
    return y if dims == 2 else y.reshape(*x.shape[:-1], weight.shape[0])


def lora_linear_rows_prepared(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: torch.Tensor,
    rank_ptr: list[int],
    ids: torch.Tensor,
    dropout_p: list[float],
    seed: torch.Tensor,
    backend=None,
) -> torch.Tensor:
    """lora_linear_rows for operands a layer plan checked (see lora_linear_prepared); `ids`: int64 [M], one per
    row of x.reshape(-1, K), contiguous, as row_ids_for returns them."""
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        check_linear(x, weight, bias)
    x2 = _rows_2d(x)
    y = ops.rows_forward(
        x2,
        weight if weight.is_contiguous() else weight.contiguous(),
        bias,
        lora_a,
        lora_b,
        scale,
        rank_ptr,
        ids,
        dropout_p,
        seed,
        backend,
    )
    return _unflatten(y, x, weight.shape[0])


def _check_ids_in_range(row_ids: torch.Tensor, n_adapters: int) -> None:
    """Refuse ids outside [-1, n_adapters): one min/max reduction; on CUDA one host sync. Skipped where a sync is
    impossible or would be baked into a graph: CUDA graph capture and torch.compile tracing."""
    if row_ids.numel() == 0 or torch.compiler.is_compiling():
        return
    if row_ids.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    lo, hi = (int(v) for v in torch.stack(torch.aminmax(row_ids)).tolist())
    if lo < -1 or hi >= n_adapters:
        raise ValueError(
            f"adapter_ids must be in [-1, {n_adapters}) (-1 = no adapter; {n_adapters} adapter(s)), "
            f"got {describe('adapter_ids', row_ids)} with values in [{lo}, {hi}]; pass "
            "check_ids=False to skip this check (unchecked ids outside the range act as -1)"
        )


def row_ids_for(row_ids: torch.Tensor, x: torch.Tensor, rows: int, n_adapters: int, check_ids: bool) -> torch.Tensor:
    """One int64 id per row of the flattened x (`rows` of them), from ids per row or per sample; contiguous.
    check_ids: as lora_linear_rows (ValueError for ids outside [-1, n_adapters))."""
    require_tensor("adapter_ids", row_ids)
    if row_ids.dtype not in _INT_IDS:
        raise TypeError(f"{describe('adapter_ids', row_ids)} must be an integer tensor")
    if row_ids.device != x.device:
        raise ValueError(f"{describe('adapter_ids', row_ids)} is on {row_ids.device} but x is on {x.device}")
    if check_ids:
        _check_ids_in_range(row_ids, n_adapters)
    ids = row_ids if row_ids.dim() == 1 else row_ids.reshape(-1)
    if ids.dtype != torch.int64:
        ids = ids.to(torch.int64)
    if ids.numel() != rows:
        if x.dim() >= 2 and ids.numel() == x.shape[0]:
            ids = ids.repeat_interleave(rows // max(x.shape[0], 1), output_size=rows)
        else:
            raise ValueError(
                f"{describe('adapter_ids', row_ids)} needs one id per row ({rows}) or per sample "
                f"(x.shape[0] = {x.shape[0] if x.dim() else 'n/a'}) of {describe('x', x)}"
            )
    return ids if ids.is_contiguous() else ids.contiguous()


def lora_linear_rows(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: Scaling,
    rank_splits: Sequence[int],
    row_ids: torch.Tensor,
    *,
    dropout_p: DropoutP = 0.0,
    training: bool = False,
    check_ids: bool = True,
) -> torch.Tensor:
    """Mixed batch: row m of x.reshape(-1, K) uses adapter row_ids[m] of the stacked adapters, or none (-1).

    `row_ids` (called adapter_ids in messages, as in FusedLoRALinear) is an integer tensor on x's device with one
    id per row, or one per sample (x.shape[0]) which is then repeated over the sample's rows. Ids must be in
    [-1, n_adapters). check_ids=True (default) checks that and raises ValueError naming the offending min/max: one
    reduction, and on CUDA one host sync per call. The check is skipped automatically while a CUDA graph is being
    captured (torch.cuda.is_current_stream_capturing()) and under torch.compile (torch.compiler.is_compiling());
    check_ids=False skips it always. Unchecked ids outside [-1, n_adapters) act as -1 (no adapter) on every
    backend. Other arguments as lora_linear (autocast included).
    """
    x2, weight, bias, lora_a, lora_b, scale, rank_ptr, ps = _prepare(
        x, weight, bias, lora_a, lora_b, scaling, rank_splits, dropout_p, training
    )
    ids = row_ids_for(row_ids, x, x2.shape[0], len(rank_ptr) - 1, check_ids)
    y = ops.rows_forward(
        x2, weight.contiguous(), bias, lora_a, lora_b, scale, rank_ptr, ids, ps, _seed(x2, training, ps)
    )
    return _unflatten(y, x, weight.shape[0])


def _merge(weight, lora_a, lora_b, scaling, sign, fan_in_fan_out, safe, rank_splits):
    require_tensor("weight", weight)
    require_float("weight", weight)  # an integer weight would be truncated in place (or refused mid-way)
    if weight.dim() != 2:
        raise ValueError(f"{describe('weight', weight)} must be 2-D")
    if not weight.is_contiguous():
        raise ValueError(f"{describe('weight', weight)} must be contiguous to be merged in place")
    # adapters may be float32 over a low-precision weight, as in forward; x is absent, so stand weight in for it
    check_adapters(weight, weight, lora_a, lora_b, fan_in_fan_out=fan_in_fan_out)
    rank_ptr = _rank_ptr(rank_sizes(rank_splits, lora_a.shape[0]))
    scale = _scale_vector(scaling.detach() if isinstance(scaling, torch.Tensor) else scaling, rank_ptr, weight.device)
    with torch.no_grad():
        applied = ops.lora_merge_(
            weight,
            lora_a.detach().contiguous(),
            lora_b.detach().contiguous(),
            scale,
            float(sign),
            bool(fan_in_fan_out),
            bool(safe),
        )
    if safe and not bool(applied):
        raise ValueError(
            f"merging into {describe('weight', weight)} would produce non-finite values; the weight was left unchanged"
        )
    return weight


def merge_(
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: Scaling,
    *,
    fan_in_fan_out: bool = False,
    safe: bool = False,
    rank_splits: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    """weight += sum_i s_i B_i A_i in place (fp32 accumulation, one rounding; float64 weights or adapters in
    float64). weight is [N, K], or [K, N] with fan_in_fan_out, floating point (an integer or bool weight raises
    TypeError and is left untouched). safe=True raises ValueError and leaves weight bit-identical if a value would
    be non-finite. `scaling` and `rank_splits` as in lora_linear."""
    return _merge(weight, lora_a, lora_b, scaling, +1.0, fan_in_fan_out, safe, rank_splits)


def unmerge_(
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: Scaling,
    *,
    fan_in_fan_out: bool = False,
    safe: bool = False,
    rank_splits: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    """weight -= sum_i s_i B_i A_i in place: the inverse of merge_ up to one rounding per call."""
    return _merge(weight, lora_a, lora_b, scaling, -1.0, fan_in_fan_out, safe, rank_splits)
