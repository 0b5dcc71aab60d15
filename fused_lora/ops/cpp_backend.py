"""The C++ CPU backend (csrc/, built as fused_lora._C): the op contract of CONTRACT.md on CPU tensors.

Importing this module raises ImportError when the extension was not built (or was built against another
torch); fused_lora.ops.backends then falls back to the plain-torch reference. Inputs arrive validated.
When any input is float64 the ops compute in float64 (csrc/lora_float64.cpp) and, like fused_lora.reference,
return t in float64; the fast paths (float32/float16/bfloat16) are untouched by that.
"""
from __future__ import annotations

import torch

try:
    from fused_lora import _C  # noqa: F401  (loading it registers torch.ops.fused_lora_cpu)
except ImportError as exc:  # not built, or an ABI mismatch with the installed torch
    raise ImportError(
        f"fused_lora C++ CPU backend is not available ({exc}); rebuild it with "
        "`pip install --no-build-isolation -e .` or use FUSED_LORA_BACKEND=reference") from exc

_ops = torch.ops.fused_lora_cpu


def _detached(*tensors):
    """The C++ ops run ATen calls on at::parallel_for worker threads, where the dispatcher's "below autograd"
    state of the calling thread does not follow: tensors that require grad would make those calls record autograd
    (or refuse out= and in-place forms). The backend is always called below autograd, so detach on entry."""
    return [t.detach() if isinstance(t, torch.Tensor) else t for t in tensors]


def _ints(values) -> list[int]:
    return [int(v) for v in values]


def _floats(values) -> list[float]:
    return [float(v) for v in values]


def lora_fwd(x, weight, bias, lora_a, lora_b, scale, rank_ptr, dropout_p, seed):
    x, weight, bias, lora_a, lora_b = _detached(x, weight, bias, lora_a, lora_b)
    return tuple(_ops.lora_fwd(x, weight, bias, lora_a, lora_b, scale, _ints(rank_ptr), _floats(dropout_p), seed))


def lora_bwd(dy, x, weight, lora_a, lora_b, scale, t, rank_ptr, dropout_p, seed, need_dx):
    dy, x, weight, lora_a, lora_b, t = _detached(dy, x, weight, lora_a, lora_b, t)
    return tuple(_ops.lora_bwd(dy, x, weight, lora_a, lora_b, scale, t, _ints(rank_ptr), _floats(dropout_p),
                               seed, bool(need_dx)))


def lora_rows_fwd(x, weight, bias, lora_a, lora_b, scale, rank_ptr, row_ids, dropout_p, seed):
    x, weight, bias, lora_a, lora_b = _detached(x, weight, bias, lora_a, lora_b)
    return tuple(_ops.lora_rows_fwd(x, weight, bias, lora_a, lora_b, scale, _ints(rank_ptr), row_ids,
                                    _floats(dropout_p), seed))


def lora_rows_bwd(dy, x, weight, lora_a, lora_b, scale, t, rank_ptr, row_ids, dropout_p, seed, need_dx):
    dy, x, weight, lora_a, lora_b, t = _detached(dy, x, weight, lora_a, lora_b, t)
    return tuple(_ops.lora_rows_bwd(dy, x, weight, lora_a, lora_b, scale, t, _ints(rank_ptr), row_ids,
                                    _floats(dropout_p), seed, bool(need_dx)))


def lora_merge_(weight, lora_a, lora_b, scale, sign, fan_in_fan_out, safe):
    weight, lora_a, lora_b = _detached(weight, lora_a, lora_b)  # a detached weight shares its storage
    return _ops.lora_merge_(weight, lora_a, lora_b, scale, float(sign), bool(fan_in_fan_out), bool(safe))


def dropout_keep(seed, M, K, p, salt):
    return _ops.dropout_keep(seed, int(M), int(K), float(p), int(salt))
