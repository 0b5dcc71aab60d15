"""The op contract of CONTRACT.md composed from plain torch ops: cuBLAS on CUDA tensors, any device in fact.

This is the "never slower than cuBLAS" side of fused_lora/ops/cuda_dispatch.py. The base GEMM is one torch GEMM
(F.linear: cuBLAS, bias in its epilogue); the rank term is added in place with beta = 1, as Unsloth does:

    t = (drop(x) A^T) * scale        (one small GEMM per dropout mask; fp32 result, as the contract says)
    y = x W^T + bias                 (one cuBLAS call)
    y += t B^T                       (y.addmm_: the rank-r GEMM accumulates into y, one more read and write of y)

Mixed batches (per-row adapters) use vLLM's plan without host synchronisation: one base GEMM for all rows, one
shrink over every adapter's ranks, a per-row mask that zeroes the ranks a row does not use, one expand
accumulated into y. The mask keeps every shape static (CUDA-graph capturable); its price is that every row pays
the shrink and expand FLOPs of all stacked ranks (sum of the ranks, not one adapter's), which the cost model
counts.

Numerics (the documented difference from the fused kernels): y is rounded twice in 16-bit dtypes, once after the
base GEMM and once after the rank term is added (PEFT and Unsloth round as often); the shrink is rounded to the
adapters' dtype before it is scaled (as PEFT's lora_A output is). Tests hold it to the same rule as every
backend: error against float64 within twice PyTorch's own same-dtype error.
"""

from __future__ import annotations

from functools import lru_cache
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


def _t_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _device_impl(device: torch.device):
    """Where the mask and the merge come from: the Triton kernels for CUDA tensors (the mask is bit-identical on
    every backend by the contract; the fused merge has no full-size temporary), plain torch elsewhere (this module
    also runs on CPU tensors, where tests hold it to the contract)."""
    if device.type == "cuda":
        from fused_lora.ops import triton_backend

        return triton_backend
    from fused_lora import reference

    return reference


def dropout_keep(seed: Tensor, M: int, K: int, p: float, salt: int) -> Tensor:
    return _device_impl(seed.device).dropout_keep(seed, M, K, p, salt)


def lora_merge_(weight, lora_a, lora_b, scale, sign, fan_in_fan_out, safe):
    return _device_impl(weight.device).lora_merge_(weight, lora_a, lora_b, scale, sign, fan_in_fan_out, safe)


def _keep(seed: Tensor, M: int, K: int, p: float, salt: int) -> Tensor:
    # the mask every backend regenerates bit for bit
    return dropout_keep(seed, M, K, float(p), int(salt))


def _dropped(x: Tensor, seed: Tensor, p: float, salt: int) -> Tensor:
    """drop(x) in x's dtype: keep mask times 1/(1-p), the factor computed in float32 as the contract says."""
    if p <= 0.0:
        return x
    inv_keep = torch.tensor(1.0, dtype=torch.float32) / (1.0 - torch.tensor(float(p), dtype=torch.float32))
    return x * _keep(seed, x.shape[0], x.shape[1], p, salt).to(x.dtype) * inv_keep.to(x.dtype)


def _adapters(rank_ptr: List[int], dropout_p: List[float]):
    return [(i, rank_ptr[i], rank_ptr[i + 1], float(dropout_p[i])) for i in range(len(rank_ptr) - 1)]


def shrink(
    x: Tensor, lora_a: Tensor, scale: Tensor, rank_ptr: List[int], dropout_p: List[float], seed: Tensor
) -> Tensor:
    """t [M, R] = (drop_i(x) A_i^T) * scale for every adapter i; one GEMM for all adapters without dropout."""
    M, R = x.shape[0], lora_a.shape[0]
    t_dtype = _t_dtype(x, lora_a)
    xa = x.to(lora_a.dtype)
    adapters = _adapters(rank_ptr, dropout_p)
    if all(p <= 0.0 for _, _, _, p in adapters):
        return (xa @ lora_a.T).to(t_dtype) * scale.to(t_dtype)
    t = torch.empty(M, R, dtype=t_dtype, device=x.device)
    for i, lo, hi, p in adapters:
        if hi > lo:
            t[:, lo:hi] = (_dropped(x, seed, p, i).to(lora_a.dtype) @ lora_a[lo:hi].T).to(t_dtype)
    return t * scale.to(t_dtype)


def add_rank_term_(out: Tensor, lhs: Tensor, rhs: Tensor) -> Tensor:
    """out += lhs @ rhs with beta = 1, in place. Operands are cast to rhs's dtype (the adapters' dtype), as the
    fused kernels cast t; when that is wider than out (fp32 adapters over a 16-bit model) the product is formed
    in the wider dtype and added with one rounding."""
    if lhs.shape[1] == 0 or out.numel() == 0:
        return out
    lhs = lhs.to(rhs.dtype)
    if rhs.dtype == out.dtype:
        return out.addmm_(lhs, rhs)
    return out.add_(lhs @ rhs)


def lora_fwd(x, weight, bias, lora_a, lora_b, scale, rank_ptr, dropout_p, seed) -> Tuple[Tensor, Tensor]:
    t = shrink(x, lora_a, scale, rank_ptr, dropout_p, seed)
    y = F.linear(x, weight, bias)
    add_rank_term_(y, t, lora_b.T)
    return y, t


def _dx_rank_term_(dx: Tensor, ds: Tensor, lora_a: Tensor, rank_ptr, dropout_p, seed) -> None:
    """dx += sum_i drop_i'(dS_i A_i): one GEMM without dropout, the masked products one adapter at a time."""
    adapters = _adapters(rank_ptr, dropout_p)
    if all(p <= 0.0 for _, _, _, p in adapters):
        add_rank_term_(dx, ds, lora_a)
        return
    for i, lo, hi, p in adapters:
        if hi > lo:
            part = ds[:, lo:hi].to(lora_a.dtype) @ lora_a[lo:hi]
            dx.add_(_dropped(part, seed, p, i))


def _da(ds: Tensor, x: Tensor, lora_a: Tensor, rank_ptr, dropout_p, seed) -> Tensor:
    adapters = _adapters(rank_ptr, dropout_p)
    if all(p <= 0.0 for _, _, _, p in adapters):
        return ds.T @ x.to(lora_a.dtype)
    da = torch.zeros_like(lora_a)
    for i, lo, hi, p in adapters:
        if hi > lo:
            da[lo:hi] = ds[:, lo:hi].T @ _dropped(x, seed, p, i).to(lora_a.dtype)
    return da


def lora_bwd(
    dy, x, weight, lora_a, lora_b, scale, t, rank_ptr, dropout_p, seed, need_dx
) -> Tuple[Optional[Tensor], Tensor, Tensor]:
    adt = lora_a.dtype
    dya = dy.to(adt)
    db = dya.T @ t.to(adt)
    ds = (dya @ lora_b) * scale.to(adt)
    da = _da(ds, x, lora_a, rank_ptr, dropout_p, seed)
    dx = None
    if need_dx:
        dx = dy @ weight
        _dx_rank_term_(dx, ds, lora_a, rank_ptr, dropout_p, seed)
    return dx, da, db


# ---- per-row adapters ------------------------------------------------------------------------------------------
@lru_cache(maxsize=256)
def _rank_tables(rank_ptr: tuple, device: torch.device):
    """(owner [R]: adapter of each stacked rank, local [R]: its index inside that adapter, gather index
    [n, r_max]: the stacked rank of (adapter, local rank), clamped; valid [n, r_max]) on `device`, built once."""
    n = len(rank_ptr) - 1
    r_max = max([1] + [rank_ptr[i + 1] - rank_ptr[i] for i in range(n)])
    owner, local = [], []
    for i in range(n):
        owner += [i] * (rank_ptr[i + 1] - rank_ptr[i])
        local += list(range(rank_ptr[i + 1] - rank_ptr[i]))
    R = rank_ptr[-1]
    index = [[min(rank_ptr[i] + j, max(R - 1, 0)) for j in range(r_max)] for i in range(max(n, 1))]
    valid = [[n > 0 and j < rank_ptr[i + 1] - rank_ptr[i] for j in range(r_max)] for i in range(max(n, 1))]
    as_tensor = lambda v, dt: torch.tensor(v, dtype=dt, device=device)  # noqa: E731
    return (
        as_tensor(owner, torch.int64),
        as_tensor(local, torch.int64),
        as_tensor(index, torch.int64),
        as_tensor(valid, torch.bool),
        r_max,
    )


def _row_selection(row_ids: Tensor, rank_ptr, device) -> Tuple[Tensor, Tensor, Tensor, Tensor, int]:
    """sel [M, R]: rank j belongs to row m's adapter (ids outside [-1, n) select nothing), plus the tables."""
    owner, local, index, valid, r_max = _rank_tables(tuple(rank_ptr), torch.device(device))
    sel = row_ids[:, None] == owner[None, :]
    return sel, local, index, valid, r_max


def _per_row_t(t_all: Tensor, row_ids: Tensor, index: Tensor, valid: Tensor, n: int) -> Tensor:
    """t [M, r_max]: each row's own adapter's ranks (zeros past its rank, and for rows without an adapter)."""
    in_range = (row_ids >= 0) & (row_ids < n)
    a = row_ids.clamp(0, max(n - 1, 0))
    if t_all.shape[1] == 0:
        return torch.zeros(t_all.shape[0], index.shape[1], dtype=t_all.dtype, device=t_all.device)
    picked = t_all.gather(1, index[a])
    return picked * (valid[a] & in_range[:, None]).to(picked.dtype)


def lora_rows_fwd(x, weight, bias, lora_a, lora_b, scale, rank_ptr, row_ids, dropout_p, seed) -> Tuple[Tensor, Tensor]:
    n = len(rank_ptr) - 1
    sel, _, index, valid, _ = _row_selection(row_ids, rank_ptr, x.device)
    t_all = shrink(x, lora_a, scale, rank_ptr, dropout_p, seed) * sel.to(_t_dtype(x, lora_a))
    y = F.linear(x, weight, bias)
    add_rank_term_(y, t_all, lora_b.T)
    return y, _per_row_t(t_all, row_ids, index, valid, n)


def lora_rows_bwd(
    dy, x, weight, lora_a, lora_b, scale, t, rank_ptr, row_ids, dropout_p, seed, need_dx
) -> Tuple[Optional[Tensor], Tensor, Tensor]:
    adt = lora_a.dtype
    sel, local, _, _, _ = _row_selection(row_ids, rank_ptr, x.device)
    M, R = x.shape[0], lora_a.shape[0]
    # the stacked [M, R] layout of t: column j holds the row's local rank local[j] when the row uses j's adapter
    t_all = t.to(adt).gather(1, local[None, :].expand(M, R)) * sel.to(adt) if R > 0 else t.new_zeros(M, 0).to(adt)
    dya = dy.to(adt)
    db = dya.T @ t_all
    ds = (dya @ lora_b) * scale.to(adt) * sel.to(adt)
    da = _da(ds, x, lora_a, rank_ptr, dropout_p, seed)
    dx = None
    if need_dx:
        dx = dy @ weight
        _dx_rank_term_(dx, ds, lora_a, rank_ptr, dropout_p, seed)
    return dx, da, db
