"""Plain-torch reference of every op in fused_lora/ops/CONTRACT.md.

Written for clarity, not speed: it computes in float64 when given float64 tensors, and in float32 otherwise,
so that tests can compare any backend against a float64 result. It is also the `reference` backend
(FUSED_LORA_BACKEND=reference), which makes every feature usable with nothing but torch.
"""

from __future__ import annotations

import math

import numpy as np
import torch

_PHILOX_M0 = np.uint64(0xD2511F53)
_PHILOX_M1 = np.uint64(0xCD9E8D57)
_PHILOX_W0 = np.uint64(0x9E3779B9)
_PHILOX_W1 = np.uint64(0xBB67AE85)
_MASK32 = np.uint64(0xFFFFFFFF)


def _philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on numpy uint64 arrays holding 32-bit values (products fit in 64 bits exactly)."""
    k0 = np.uint64(k0)
    k1 = np.uint64(k1)
    for _ in range(10):
        p0 = _PHILOX_M0 * c0
        p1 = _PHILOX_M1 * c2
        hi0, lo0 = p0 >> np.uint64(32), p0 & _MASK32
        hi1, lo1 = p1 >> np.uint64(32), p1 & _MASK32
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _PHILOX_W0) & _MASK32
        k1 = (k1 + _PHILOX_W1) & _MASK32
    return c0, c1, c2, c3


def dropout_threshold(p: float) -> int:
    """Keep an element iff its 24-bit random word is >= this threshold (so P(keep) = 1 - p)."""
    return min(1 << 24, math.ceil(float(p) * (1 << 24)))


def dropout_keep(seed: torch.Tensor, M: int, K: int, p: float, salt: int) -> torch.Tensor:
    """The dropout keep-mask [M, K] (bool) every backend regenerates bit for bit; see CONTRACT.md."""
    device = seed.device
    if p <= 0.0:
        return torch.ones(M, K, dtype=torch.bool, device=device)
    s = int(seed.reshape(-1)[0].item()) & 0xFFFFFFFFFFFFFFFF
    e = np.arange(M * K, dtype=np.uint64)
    q = e >> np.uint64(2)
    zeros = np.zeros_like(q)
    words = _philox4x32_10(q & _MASK32, q >> np.uint64(32), zeros + np.uint64(salt), zeros, s & 0xFFFFFFFF, s >> 32)
    lane = (e & np.uint64(3)).astype(np.int64)
    word = np.choose(lane, words)
    keep = (word >> np.uint64(8)) >= np.uint64(dropout_threshold(p))
    return torch.from_numpy(keep.reshape(M, K)).to(device)


def _dropped(x: torch.Tensor, seed: torch.Tensor, p: float, salt: int) -> torch.Tensor:
    if p <= 0.0:
        return x
    keep = dropout_keep(seed, x.shape[0], x.shape[1], p, salt)
    inv_keep = torch.tensor(1.0, dtype=torch.float32) / (1.0 - torch.tensor(p, dtype=torch.float32))
    return x * keep.to(x.dtype) * inv_keep.to(x.dtype)


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def lora_fwd(x, weight, bias, lora_a, lora_b, scale, rank_ptr, dropout_p, seed):
    cd = _compute_dtype(x, weight, lora_a)
    xc = x.to(cd)
    y = xc @ weight.to(cd).T
    if bias is not None:
        y = y + bias.to(cd)
    t = torch.zeros(x.shape[0], lora_a.shape[0], dtype=cd, device=x.device)
    for i in range(len(rank_ptr) - 1):
        lo, hi = rank_ptr[i], rank_ptr[i + 1]
        t[:, lo:hi] = (_dropped(xc, seed, dropout_p[i], i) @ lora_a[lo:hi].to(cd).T) * scale[lo:hi].to(cd)
    y = y + t @ lora_b.to(cd).T
    t_out = t if cd == torch.float64 else t.to(torch.float32)
    return y.to(x.dtype), t_out


def lora_bwd(dy, x, weight, lora_a, lora_b, scale, t, rank_ptr, dropout_p, seed, need_dx):
    cd = _compute_dtype(dy, x, lora_a)
    dyc, xc, a, b = dy.to(cd), x.to(cd), lora_a.to(cd), lora_b.to(cd)
    db = dyc.T @ t.to(cd)
    ds = (dyc @ b) * scale.to(cd)
    da = torch.empty_like(a)
    dx = dyc @ weight.to(cd) if need_dx else None
    for i in range(len(rank_ptr) - 1):
        lo, hi = rank_ptr[i], rank_ptr[i + 1]
        da[lo:hi] = ds[:, lo:hi].T @ _dropped(xc, seed, dropout_p[i], i)
        if need_dx:
            dx = dx + _dropped(ds[:, lo:hi] @ a[lo:hi], seed, dropout_p[i], i)
    return (dx.to(x.dtype) if need_dx else None), da.to(lora_a.dtype), db.to(lora_b.dtype)


def _rank_max(rank_ptr) -> int:
    return max([1] + [rank_ptr[i + 1] - rank_ptr[i] for i in range(len(rank_ptr) - 1)])


def lora_rows_fwd(x, weight, bias, lora_a, lora_b, scale, rank_ptr, row_ids, dropout_p, seed):
    cd = _compute_dtype(x, weight, lora_a)
    xc = x.to(cd)
    y = xc @ weight.to(cd).T
    if bias is not None:
        y = y + bias.to(cd)
    t = torch.zeros(x.shape[0], _rank_max(rank_ptr), dtype=cd, device=x.device)
    for i in range(len(rank_ptr) - 1):
        lo, hi = rank_ptr[i], rank_ptr[i + 1]
        rows = (row_ids == i).to(cd)[:, None]
        ti = (_dropped(xc, seed, dropout_p[i], i) @ lora_a[lo:hi].to(cd).T) * scale[lo:hi].to(cd) * rows
        t[:, : hi - lo] += ti
        y = y + ti @ lora_b[:, lo:hi].to(cd).T
    t_out = t if cd == torch.float64 else t.to(torch.float32)
    return y.to(x.dtype), t_out


def lora_rows_bwd(dy, x, weight, lora_a, lora_b, scale, t, rank_ptr, row_ids, dropout_p, seed, need_dx):
    cd = _compute_dtype(dy, x, lora_a)
    dyc, xc, a, b, tc = dy.to(cd), x.to(cd), lora_a.to(cd), lora_b.to(cd), t.to(cd)
    da = torch.zeros_like(a)
    db = torch.zeros_like(b)
    dx = dyc @ weight.to(cd) if need_dx else None
    for i in range(len(rank_ptr) - 1):
        lo, hi = rank_ptr[i], rank_ptr[i + 1]
        rows = (row_ids == i).to(cd)[:, None]
        db[:, lo:hi] = (dyc * rows).T @ tc[:, : hi - lo]
        ds = (dyc @ b[:, lo:hi]) * scale[lo:hi].to(cd) * rows
        da[lo:hi] = ds.T @ _dropped(xc, seed, dropout_p[i], i)
        if need_dx:
            dx = dx + _dropped(ds @ a[lo:hi], seed, dropout_p[i], i)
    return (dx.to(x.dtype) if need_dx else None), da.to(lora_a.dtype), db.to(lora_b.dtype)


def lora_merge_(weight, lora_a, lora_b, scale, sign, fan_in_fan_out, safe):
    cd = torch.float64
    delta = (lora_b.to(cd) * scale.to(cd)) @ lora_a.to(cd)
    if fan_in_fan_out:
        delta = delta.T
    merged = (weight.to(cd) + sign * delta).to(weight.dtype)
    if safe and not torch.isfinite(merged).all():
        return torch.tensor(False)
    weight.copy_(merged)
    return torch.tensor(True)
