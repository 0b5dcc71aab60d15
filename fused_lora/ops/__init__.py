"""The op boundary: torch.library custom ops `fused_lora::*`, their fake (meta) impls and autograd formulas.

Each op forwards to the backend module chosen by fused_lora.ops.backends for the tensors' device; the
semantics every backend implements are in CONTRACT.md beside this file. Inputs are validated by
fused_lora.functional before they get here.

Two ways in, one decision of the backend (fused_lora.ops.backends.resolve):
- the registered custom ops (`lora_fwd`, ... below): what torch.compile traces, what opcheck checks, and what runs
  under tensor subclasses, dispatch/function modes, functorch transforms and jit tracing;
- `forward` / `rows_forward`, the entry points fused_lora.functional calls: in plain eager mode they call the
  backend directly (no grad needed) or through `_DenseFn`/`_RowsFn`, lean autograd Functions with the same
  formulas as the registered ops' autograd; anywhere else they call the registered ops. torch.library's Python
  custom-op layers cost more than the whole op at decode sizes, and nothing they add (fake tensors, functionalization,
  autograd wrapping) is needed by a plain eager call.

The ops take their operands in their final dtypes (fused_lora.functional applies torch.autocast's casts before
calling them), so a backend runs with autocast switched off: autocast does not stop at custom ops, and would
otherwise re-cast the float32 arithmetic inside the reference and C++ backends (the shrink t, say) to 16 bits.
"""

from __future__ import annotations

from functools import lru_cache
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from fused_lora.ops.backends import backend_for, backend_info, resolve  # noqa: F401


def _max_rank(rank_ptr: List[int]) -> int:
    return max([1] + [rank_ptr[i + 1] - rank_ptr[i] for i in range(len(rank_ptr) - 1)])


def _t_dtype(*tensors: Tensor) -> torch.dtype:
    """The shrink t is float32, or float64 when the op computes in float64 (CONTRACT.md)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _none_if_empty(t: Optional[Tensor]) -> Optional[Tensor]:
    """dx as autograd wants it: the registered ops return an empty 1-D tensor for "not requested", backends None."""
    return None if t is None or (t.dim() == 1 and t.numel() == 0) else t


@lru_cache(maxsize=None)
def _has_autocast(device_type: str) -> bool:
    return torch.amp.is_autocast_available(device_type)


_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None)
# True when torch.autocast may be on for some device (then _run switches it off around a backend call)
_maybe_autocast = _any_autocast if _any_autocast is not None else (lambda: True)


def _run(device: torch.device, fn, *args):
    """fn(*args) with torch.autocast off for `device` (one thread-local read when autocast is off everywhere)."""
    if _any_autocast is not None and not _any_autocast():
        return fn(*args)
    kind = device.type
    if _has_autocast(kind) and torch.is_autocast_enabled(kind):
        with torch.autocast(kind, enabled=False):
            return fn(*args)
    return fn(*args)


# ---- forward: all active adapters on every row (one adapter is the n = 1 case) ----
@torch.library.custom_op("fused_lora::lora_fwd", mutates_args=())
def lora_fwd(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_a: Tensor,
    lora_b: Tensor,
    scale: Tensor,
    rank_ptr: List[int],
    dropout_p: List[float],
    seed: Tensor,
) -> Tuple[Tensor, Tensor]:
    return _run(x.device, resolve(x.device).lora_fwd, x, weight, bias, lora_a, lora_b, scale, rank_ptr, dropout_p, seed)


@lora_fwd.register_fake
def _(x, weight, bias, lora_a, lora_b, scale, rank_ptr, dropout_p, seed):
    return (
        x.new_empty(x.shape[0], weight.shape[0]),
        x.new_empty(x.shape[0], lora_a.shape[0], dtype=_t_dtype(x, weight, lora_a)),
    )


@torch.library.custom_op("fused_lora::lora_bwd", mutates_args=())
def lora_bwd(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: Tensor,
    t: Tensor,
    rank_ptr: List[int],
    dropout_p: List[float],
    seed: Tensor,
    need_dx: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    dx, da, db = _run(
        x.device,
        resolve(x.device).lora_bwd,
        dy,
        x,
        weight,
        lora_a,
        lora_b,
        scale,
        t,
        rank_ptr,
        dropout_p,
        seed,
        need_dx,
    )
    # custom ops cannot return None: an empty 1-D tensor stands for "dx not requested"
    return (dx if dx is not None else x.new_empty(0)), da, db


@lora_bwd.register_fake
def _(dy, x, weight, lora_a, lora_b, scale, t, rank_ptr, dropout_p, seed, need_dx):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    return dx, torch.empty_like(lora_a), torch.empty_like(lora_b)


# ---- forward with one adapter (or none) per row: mixed batches ----
@torch.library.custom_op("fused_lora::lora_rows_fwd", mutates_args=())
def lora_rows_fwd(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_a: Tensor,
    lora_b: Tensor,
    scale: Tensor,
    rank_ptr: List[int],
    row_ids: Tensor,
    dropout_p: List[float],
    seed: Tensor,
) -> Tuple[Tensor, Tensor]:
    return _run(
        x.device,
        resolve(x.device).lora_rows_fwd,
        x,
        weight,
        bias,
        lora_a,
        lora_b,
        scale,
        rank_ptr,
        row_ids,
        dropout_p,
        seed,
    )


@lora_rows_fwd.register_fake
def _(x, weight, bias, lora_a, lora_b, scale, rank_ptr, row_ids, dropout_p, seed):
    return (
        x.new_empty(x.shape[0], weight.shape[0]),
        x.new_empty(x.shape[0], _max_rank(rank_ptr), dtype=_t_dtype(x, weight, lora_a)),
    )


@torch.library.custom_op("fused_lora::lora_rows_bwd", mutates_args=())
def lora_rows_bwd(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: Tensor,
    t: Tensor,
    rank_ptr: List[int],
    row_ids: Tensor,
    dropout_p: List[float],
    seed: Tensor,
    need_dx: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    dx, da, db = _run(
        x.device,
        resolve(x.device).lora_rows_bwd,
        dy,
        x,
        weight,
        lora_a,
        lora_b,
        scale,
        t,
        rank_ptr,
        row_ids,
        dropout_p,
        seed,
        need_dx,
    )
    return (dx if dx is not None else x.new_empty(0)), da, db


@lora_rows_bwd.register_fake
def _(dy, x, weight, lora_a, lora_b, scale, t, rank_ptr, row_ids, dropout_p, seed, need_dx):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    return dx, torch.empty_like(lora_a), torch.empty_like(lora_b)


# ---- in-place merge / unmerge ----
@torch.library.custom_op("fused_lora::lora_merge_", mutates_args=("weight",))
def lora_merge_(
    weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: Tensor, sign: float, fan_in_fan_out: bool, safe: bool
) -> Tensor:
    return _run(
        weight.device, resolve(weight.device).lora_merge_, weight, lora_a, lora_b, scale, sign, fan_in_fan_out, safe
    )


@lora_merge_.register_fake
def _(weight, lora_a, lora_b, scale, sign, fan_in_fan_out, safe):
    return weight.new_empty((), dtype=torch.bool)


# ---- the dropout mask, materialised (tests and debugging only: the ops never store it) ----
@torch.library.custom_op("fused_lora::dropout_keep", mutates_args=())
def dropout_keep(seed: Tensor, M: int, K: int, p: float, salt: int) -> Tensor:
    return resolve(seed.device).dropout_keep(seed, M, K, p, salt)


@dropout_keep.register_fake
def _(seed, M, K, p, salt):
    return seed.new_empty(M, K, dtype=torch.bool)


# ---- autograd: W is normally frozen; its gradient (and the bias's) take a plain torch path ----
def _grads(need, dy, x, weight, has_bias, bwd, *bwd_args):
    """(dx, dW, dbias, dA, dB) from one lora_bwd-shaped call `bwd(dy, x, weight, *bwd_args, need_dx)`; `need` is
    (x, weight, bias) needs_input_grad. Shared by the registered ops' autograd and the eager Functions."""
    need_dx, need_w, need_b = need
    dy = dy.contiguous()
    dx, da, db = bwd(dy, x, weight, *bwd_args, need_dx)
    dw = (dy.T @ x.to(dy.dtype)).to(weight.dtype) if need_w else None
    dbias = dy.sum(0).to(weight.dtype) if (need_b and has_bias) else None
    return _none_if_empty(dx), dw, dbias, da, db


def _setup_fwd(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scale, rank_ptr, dropout_p, seed = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b, scale, output[1], seed)
    ctx.rank_ptr, ctx.dropout_p = rank_ptr, dropout_p
    ctx.has_bias = bias is not None


def _bwd_fwd(ctx, dy, _dt):
    x, weight, lora_a, lora_b, scale, t, seed = ctx.saved_tensors
    return _grads(
        ctx.needs_input_grad[:3],
        dy,
        x,
        weight,
        ctx.has_bias,
        lora_bwd,
        lora_a,
        lora_b,
        scale,
        t,
        ctx.rank_ptr,
        ctx.dropout_p,
        seed,
    ) + (None, None, None, None)


lora_fwd.register_autograd(_bwd_fwd, setup_context=_setup_fwd)


def _setup_rows(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scale, rank_ptr, row_ids, dropout_p, seed = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b, scale, output[1], row_ids, seed)
    ctx.rank_ptr, ctx.dropout_p = rank_ptr, dropout_p
    ctx.has_bias = bias is not None


def _bwd_rows(ctx, dy, _dt):
    x, weight, lora_a, lora_b, scale, t, row_ids, seed = ctx.saved_tensors
    return _grads(
        ctx.needs_input_grad[:3],
        dy,
        x,
        weight,
        ctx.has_bias,
        lora_rows_bwd,
        lora_a,
        lora_b,
        scale,
        t,
        ctx.rank_ptr,
        row_ids,
        ctx.dropout_p,
        seed,
    ) + (None, None, None, None, None)


lora_rows_fwd.register_autograd(_bwd_rows, setup_context=_setup_rows)


# ---- the eager entry points --------------------------------------------------------------------------------------
_PLAIN = (Tensor, torch.nn.Parameter)
_dispatch_modes = torch._C._len_torch_dispatch_stack
_function_modes = torch._C._is_torch_function_mode_enabled
_functorch_levels = torch._C._functorch.peek_interpreter_stack
_jit_tracing = torch._C._get_tracing_state
_is_compiling = torch.compiler.is_compiling
_grad_enabled = torch.is_grad_enabled


def plain_eager() -> bool:
    """Plain eager execution: not traced by torch.compile or torch.jit, no dispatch or function mode (FakeTensorMode,
    `with torch.device(...)`, ...), no functorch transform. Only then may tensors made now be kept for later calls
    (plans, cached constants), and only then may a call skip torch.library's layers."""
    return not (
        _is_compiling()
        or _dispatch_modes()
        or _function_modes()
        or _functorch_levels() is not None
        or _jit_tracing() is not None
    )


def eager_call_ok(*tensors: Optional[Tensor]) -> bool:
    """True when a call may skip torch.library's layers: plain_eager(), and only plain tensors with data (not
    DTensor, FakeTensor or other subclasses, nor meta tensors: they need the registered op and its fake impl)."""
    if not plain_eager():
        return False
    for t in tensors:
        if t is not None and (type(t) not in _PLAIN or t.is_meta):
            return False
    return True


def _needs_grad(*tensors: Optional[Tensor]) -> bool:
    if not _grad_enabled():
        return False
    for t in tensors:
        if t is not None and t.requires_grad:
            return True
    return False


class _DenseFn(torch.autograd.Function):
    """lora_fwd's autograd in eager mode, calling the backend module `impl` directly (formulas: `_grads`)."""

    @staticmethod
    def forward(ctx, impl, x, weight, bias, lora_a, lora_b, scale, rank_ptr, dropout_p, seed):
        y, t = _run(x.device, impl.lora_fwd, x, weight, bias, lora_a, lora_b, scale, rank_ptr, dropout_p, seed)
        ctx.save_for_backward(x, weight, lora_a, lora_b, scale, t, seed)
        ctx.impl, ctx.rank_ptr, ctx.dropout_p, ctx.has_bias = impl, rank_ptr, dropout_p, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_a, lora_b, scale, t, seed = ctx.saved_tensors
        bwd = _eager_bwd(ctx.impl.lora_bwd, x.device)
        dx, dw, dbias, da, db = _grads(
            ctx.needs_input_grad[1:4],
            dy,
            x,
            weight,
            ctx.has_bias,
            bwd,
            lora_a,
            lora_b,
            scale,
            t,
            ctx.rank_ptr,
            ctx.dropout_p,
            seed,
        )
        return None, dx, dw, dbias, da, db, None, None, None, None


class _RowsFn(torch.autograd.Function):
    """lora_rows_fwd's autograd in eager mode (see _DenseFn)."""

    @staticmethod
    def forward(ctx, impl, x, weight, bias, lora_a, lora_b, scale, rank_ptr, row_ids, dropout_p, seed):
        y, t = _run(
            x.device, impl.lora_rows_fwd, x, weight, bias, lora_a, lora_b, scale, rank_ptr, row_ids, dropout_p, seed
        )
        ctx.save_for_backward(x, weight, lora_a, lora_b, scale, t, row_ids, seed)
        ctx.impl, ctx.rank_ptr, ctx.dropout_p, ctx.has_bias = impl, rank_ptr, dropout_p, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_a, lora_b, scale, t, row_ids, seed = ctx.saved_tensors
        bwd = _eager_bwd(ctx.impl.lora_rows_bwd, x.device)
        dx, dw, dbias, da, db = _grads(
            ctx.needs_input_grad[1:4],
            dy,
            x,
            weight,
            ctx.has_bias,
            bwd,
            lora_a,
            lora_b,
            scale,
            t,
            ctx.rank_ptr,
            row_ids,
            ctx.dropout_p,
            seed,
        )
        return None, dx, dw, dbias, da, db, None, None, None, None, None


def _eager_bwd(fn, device):
    return lambda *args: _run(device, fn, *args)


def forward(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_a: Tensor,
    lora_b: Tensor,
    scale: Tensor,
    rank_ptr: List[int],
    dropout_p: List[float],
    seed: Tensor,
    backend=None,
) -> Tensor:
    """y of lora_fwd (arguments as CONTRACT.md). In plain eager mode the backend runs directly (`backend`: a
    module from resolve(x.device), e.g. remembered by a layer's plan; default: resolved here); elsewhere the
    registered op runs (eager_call_ok)."""
    if eager_call_ok(x, weight, bias, lora_a, lora_b):
        impl = backend if backend is not None else resolve(x.device)
        if _needs_grad(x, weight, bias, lora_a, lora_b):
            return _DenseFn.apply(impl, x, weight, bias, lora_a, lora_b, scale, rank_ptr, dropout_p, seed)
        if not _maybe_autocast():  # _run's common case, without its frame
            return impl.lora_fwd(x, weight, bias, lora_a, lora_b, scale, rank_ptr, dropout_p, seed)[0]
        return _run(x.device, impl.lora_fwd, x, weight, bias, lora_a, lora_b, scale, rank_ptr, dropout_p, seed)[0]
    return lora_fwd(x, weight, bias, lora_a, lora_b, scale, rank_ptr, dropout_p, seed)[0]


def rows_forward(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_a: Tensor,
    lora_b: Tensor,
    scale: Tensor,
    rank_ptr: List[int],
    row_ids: Tensor,
    dropout_p: List[float],
    seed: Tensor,
    backend=None,
) -> Tensor:
    """y of lora_rows_fwd; the eager/registered choice as `forward`."""
    if eager_call_ok(x, weight, bias, lora_a, lora_b, row_ids):
        impl = backend if backend is not None else resolve(x.device)
        if _needs_grad(x, weight, bias, lora_a, lora_b):
            return _RowsFn.apply(impl, x, weight, bias, lora_a, lora_b, scale, rank_ptr, row_ids, dropout_p, seed)
        if not _maybe_autocast():
            return impl.lora_rows_fwd(x, weight, bias, lora_a, lora_b, scale, rank_ptr, row_ids, dropout_p, seed)[0]
        return _run(
            x.device, impl.lora_rows_fwd, x, weight, bias, lora_a, lora_b, scale, rank_ptr, row_ids, dropout_p, seed
        )[0]
    return lora_rows_fwd(x, weight, bias, lora_a, lora_b, scale, rank_ptr, row_ids, dropout_p, seed)[0]
