"""The C++ CPU backend (csrc/, fused_lora.ops.cpp_backend) against the float64 reference of every op.

Judged as CONTRACT.md asks: err(ours) <= 2 * err(plain torch at the same dtype) + atol, errors measured
against fused_lora.reference run in float64; dropout masks bit for bit; merge rounded once.
Where fused_lora._C is not built this module is skipped (CI fails instead); for a development build set
FUSED_LORA_CPP_DEV_BUILD=<build dir> to compile csrc/ with torch.utils.cpp_extension.load.
"""
from __future__ import annotations

import glob
import hashlib
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from fused_lora import reference as ref
try:
    from tests.checks import assert_close_vs_reference
except ImportError:  # pytest run with tests/ (not the repo root) on sys.path
    from checks import assert_close_vs_reference


def _load_backend():
    try:
        from fused_lora.ops import cpp_backend
        return cpp_backend
    except ImportError as exc:
        build_dir = os.environ.get("FUSED_LORA_CPP_DEV_BUILD")
        if not build_dir:
            if os.environ.get("CI"):
                raise
            pytest.skip(f"C++ backend not built: {exc}", allow_module_level=True)
    from torch.utils.cpp_extension import load
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.makedirs(build_dir, exist_ok=True)
    module = load(name="fused_lora_C_dev", sources=sorted(glob.glob(os.path.join(root, "csrc", "*.cpp"))),
                  extra_cflags=["-O3", "-fopenmp", "-std=c++17"], extra_ldflags=["-fopenmp"],
                  build_directory=build_dir)
    sys.modules["fused_lora._C"] = module
    from fused_lora.ops import cpp_backend
    return cpp_backend


cb = _load_backend()

LOWP = (torch.float16, torch.bfloat16)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _seed(value=0x9234_5678_9ABC_DEF0 - (1 << 64)):  # high bit set: seed read as uint64
    return torch.tensor([value], dtype=torch.int64)


def _rank_ptr(ranks):
    ptr = [0]
    for r in ranks:
        ptr.append(ptr[-1] + r)
    return ptr


def _atol(ref64: torch.Tensor) -> float:
    return 1e-6 * (1.0 + (ref64.abs().max().item() if ref64.numel() else 0.0))


def _noncontig_rows(x: torch.Tensor, mode: str) -> torch.Tensor:
    """x with the same values but row stride != K ("pad") or column stride 2 ("step")."""
    M, K = x.shape
    if mode == "pad":
        wide = torch.full((M, K + 3), float("nan"), dtype=x.dtype)
        wide[:, :K] = x
        return wide[:, :K]
    if mode == "step":
        wide = torch.full((M, 2 * K), float("nan"), dtype=x.dtype)
        wide[:, ::2] = x
        return wide[:, ::2]
    return x


def _case(M, K, N, ranks, dtype, adapter_dtype=None, bias=True):
    adapter_dtype = adapter_dtype or dtype
    R = sum(ranks)
    x = torch.randn(M, K).to(dtype)
    w = (torch.randn(N, K) / K ** 0.5).to(dtype)
    b = torch.randn(N).to(dtype) if bias else None
    a = (torch.randn(R, K) / K ** 0.5).to(adapter_dtype)
    bb = torch.randn(N, R).to(adapter_dtype)
    scale = (torch.rand(R) + 0.5).float()
    return x, w, b, a, bb, scale


def _d64(t):
    return None if t is None else t.detach().to(torch.float64)


def _dropped_same_dtype(x, seed, p, salt):
    if p <= 0.0:
        return x
    keep = ref.dropout_keep(seed, x.shape[0], x.shape[1], p, salt)
    inv = torch.tensor(1.0, dtype=torch.float32) / (1.0 - torch.tensor(p, dtype=torch.float32))
    return x * keep.to(x.dtype) * inv.to(x.dtype)


def _torch_fwd(x, w, b, a, bb, scale, rank_ptr, dps, seed, row_ids=None):
    """Plain torch at the inputs' own dtypes (what an unfused layer computes): the error yardstick."""
    y = F.linear(x, w, b)
    for i in range(len(rank_ptr) - 1):
        lo, hi = rank_ptr[i], rank_ptr[i + 1]
        xd = _dropped_same_dtype(x, seed, dps[i], i).to(a.dtype)
        ti = (xd @ a[lo:hi].T) * scale[lo:hi].to(a.dtype)
        term = ti @ bb[:, lo:hi].T
        if row_ids is not None:
            term = term * (row_ids == i).to(term.dtype)[:, None]
        y = y + term.to(y.dtype)
    return y


def _torch_bwd(dy, x, w, a, bb, scale, t, rank_ptr, dps, seed, row_ids=None):
    ad = a.dtype
    dx = dy @ w
    da = torch.zeros_like(a)
    db = torch.zeros_like(bb)
    for i in range(len(rank_ptr) - 1):
        lo, hi = rank_ptr[i], rank_ptr[i + 1]
        rows = torch.ones(x.shape[0], dtype=ad) if row_ids is None else (row_ids == i).to(ad)
        dya = dy.to(ad) * rows[:, None]
        ti = t[:, : hi - lo] if row_ids is not None else t[:, lo:hi]
        db[:, lo:hi] = dya.T @ ti.to(ad)
        ds = (dya @ bb[:, lo:hi]) * scale[lo:hi].to(ad)
        da[lo:hi] = ds.T @ _dropped_same_dtype(x, seed, dps[i], i).to(ad)
        dx = dx + _dropped_same_dtype((ds @ a[lo:hi]).to(dx.dtype), seed, dps[i], i)
    return dx, da, db


DENSE_CONFIGS = {
    "r1_nodrop_bias": dict(ranks=[1], dps=[0.0], bias=True, layout="contig"),
    "r7_drop_nobias_pad": dict(ranks=[7], dps=[0.3], bias=False, layout="pad"),
    "multi_mixed_drop_step": dict(ranks=[1, 7, 4], dps=[0.0, 0.25, 0.6], bias=True, layout="step"),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", list(DENSE_CONFIGS), ids=str)
def test_lora_fwd_bwd_vs_reference(dtype, config):
    cfg = DENSE_CONFIGS[config]
    M, K, N = 67, 45, 29
    x, w, b, a, bb, scale = _case(M, K, N, cfg["ranks"], dtype, bias=cfg["bias"])
    x = _noncontig_rows(x, cfg["layout"])
    rp, dps, seed = _rank_ptr(cfg["ranks"]), cfg["dps"], _seed()

    y, t = cb.lora_fwd(x, w, b, a, bb, scale, rp, dps, seed)
    y64, t64 = ref.lora_fwd(_d64(x), _d64(w), _d64(b), _d64(a), _d64(bb), scale, rp, dps, seed)
    assert y.dtype == dtype and t.dtype == torch.float32
    assert_close_vs_reference(y, y64, _torch_fwd(x, w, b, a, bb, scale, rp, dps, seed), atol=_atol(y64), name="y")
    t_torch = ref.lora_fwd(x.float(), w.float(), None, a.float(), bb.float(), scale, rp, dps, seed)[1]
    assert_close_vs_reference(t, t64, t_torch, atol=_atol(t64), name="t")

    dy = torch.randn(M, N).to(dtype)
    dx, da, db = cb.lora_bwd(dy, x, w, a, bb, scale, t, rp, dps, seed, True)
    ref_g = ref.lora_bwd(_d64(dy), _d64(x), _d64(w), _d64(a), _d64(bb), scale, _d64(t), rp, dps, seed, True)
    torch_g = _torch_bwd(dy, x, w, a, bb, scale, t, rp, dps, seed)
    for name, ours, r64, same in zip(("dx", "dA", "dB"), (dx, da, db), ref_g, torch_g):
        assert ours.dtype == same.dtype, name
        assert_close_vs_reference(ours, r64, same, atol=_atol(r64), name=name)

    none_dx, da2, db2 = cb.lora_bwd(dy, x, w, a, bb, scale, t, rp, dps, seed, False)
    assert none_dx is None
    torch.testing.assert_close(da2, da, rtol=0, atol=0)
    torch.testing.assert_close(db2, db, rtol=0, atol=0)


def test_fp32_adapters_with_bf16_x_keep_fp32_accuracy():
    M, K, N, ranks = 33, 70, 21, [7]
    x, w, b, a, bb, scale = _case(M, K, N, ranks, torch.bfloat16, adapter_dtype=torch.float32)
    rp, dps, seed = _rank_ptr(ranks), [0.2], _seed(7)
    y, t = cb.lora_fwd(x, w, b, a, bb, scale, rp, dps, seed)
    y64, t64 = ref.lora_fwd(_d64(x), _d64(w), _d64(b), _d64(a), _d64(bb), scale, rp, dps, seed)
    # t never sees bf16: fp32 accuracy (an fp32 computation from the same inputs is the yardstick)
    t_fp32 = ref.lora_fwd(x.float(), w.float(), None, a, bb, scale, rp, dps, seed)[1]
    assert_close_vs_reference(t, t64, t_fp32, atol=_atol(t64), name="t")
    assert_close_vs_reference(y, y64, _torch_fwd(x, w, b, a, bb, scale, rp, dps, seed), atol=_atol(y64), name="y")
    dy = torch.randn(M, N).to(torch.bfloat16)
    dx, da, db = cb.lora_bwd(dy, x, w, a, bb, scale, t, rp, dps, seed, True)
    assert da.dtype == torch.float32 and db.dtype == torch.float32 and dx.dtype == torch.bfloat16
    ref_g = ref.lora_bwd(_d64(dy), _d64(x), _d64(w), _d64(a), _d64(bb), scale, _d64(t), rp, dps, seed, True)
    fp32_g = ref.lora_bwd(dy.float(), x.float(), w.float(), a, bb, scale, t, rp, dps, seed, True)
    assert_close_vs_reference(da, ref_g[1], fp32_g[1], atol=_atol(ref_g[1]), name="dA")
    assert_close_vs_reference(db, ref_g[2], fp32_g[2], atol=_atol(ref_g[2]), name="dB")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rows_fwd_bwd_vs_reference(dtype):
    M, K, N, ranks, dps = 71, 45, 29, [1, 7, 4], [0.0, 0.4, 0.1]
    x, w, b, a, bb, scale = _case(M, K, N, ranks, dtype)
    x = _noncontig_rows(x, "pad")
    rp, seed = _rank_ptr(ranks), _seed(-5)
    row_ids = torch.randint(-1, len(ranks), (M,))
    row_ids[:3] = torch.tensor([-1, 1, 2])

    y, t = cb.lora_rows_fwd(x, w, b, a, bb, scale, rp, row_ids, dps, seed)
    y64, t64 = ref.lora_rows_fwd(_d64(x), _d64(w), _d64(b), _d64(a), _d64(bb), scale, rp, row_ids, dps, seed)
    assert t.shape == (M, 7) and t.dtype == torch.float32
    assert_close_vs_reference(y, y64, _torch_fwd(x, w, b, a, bb, scale, rp, dps, seed, row_ids),
                              atol=_atol(y64), name="y")
    t_fp32 = ref.lora_rows_fwd(x.float(), w.float(), None, a.float(), bb.float(), scale, rp, row_ids, dps, seed)[1]
    assert_close_vs_reference(t, t64, t_fp32, atol=_atol(t64), name="t")
    assert (t[row_ids == -1] == 0).all() and (t[row_ids == 0, 1:] == 0).all()

    dy = torch.randn(M, N).to(dtype)
    dx, da, db = cb.lora_rows_bwd(dy, x, w, a, bb, scale, t, rp, row_ids, dps, seed, True)
    ref_g = ref.lora_rows_bwd(_d64(dy), _d64(x), _d64(w), _d64(a), _d64(bb), scale, _d64(t), rp, row_ids, dps,
                              seed, True)
    torch_g = _torch_bwd(dy, x, w, a, bb, scale, t, rp, dps, seed, row_ids)
    for name, ours, r64, same in zip(("dx", "dA", "dB"), (dx, da, db), ref_g, torch_g):
        assert_close_vs_reference(ours, r64, same, atol=_atol(r64), name=name)
    assert cb.lora_rows_bwd(dy, x, w, a, bb, scale, t, rp, row_ids, dps, seed, False)[0] is None


def test_rows_all_unassigned_is_base_linear():
    x, w, b, a, bb, scale = _case(9, 13, 11, [3], torch.float32)
    row_ids = torch.full((9,), -1, dtype=torch.int64)
    y, t = cb.lora_rows_fwd(x, w, b, a, bb, scale, [0, 3], row_ids, [0.5], _seed())
    torch.testing.assert_close(y, F.linear(x, w, b))
    assert (t == 0).all()
    _, da, db = cb.lora_rows_bwd(torch.randn(9, 11), x, w, a, bb, scale, t, [0, 3], row_ids, [0.5], _seed(), True)
    assert (da == 0).all() and (db == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_empty_batch(dtype):
    x, w, b, a, bb, scale = _case(0, 13, 11, [2, 3], dtype)
    rp, dps, seed = [0, 2, 5], [0.0, 0.5], _seed()
    y, t = cb.lora_fwd(x, w, b, a, bb, scale, rp, dps, seed)
    assert y.shape == (0, 11) and t.shape == (0, 5)
    dx, da, db = cb.lora_bwd(torch.randn(0, 11).to(dtype), x, w, a, bb, scale, t, rp, dps, seed, True)
    assert dx.shape == (0, 13) and (da == 0).all() and (db == 0).all()
    row_ids = torch.empty(0, dtype=torch.int64)
    y, t = cb.lora_rows_fwd(x, w, b, a, bb, scale, rp, row_ids, dps, seed)
    assert y.shape == (0, 11) and t.shape == (0, 3)
    dx, da, db = cb.lora_rows_bwd(torch.randn(0, 11).to(dtype), x, w, a, bb, scale, t, rp, row_ids, dps, seed,
                                  True)
    assert dx.shape == (0, 13) and (da == 0).all() and (db == 0).all()


@pytest.mark.parametrize("M,K,p,salt,seed", [(5, 7, 0.3, 0, 0), (3, 13, 0.5, 2, -1), (17, 33, 0.9, 1, 2**40 + 3),
                                             (64, 130, 0.1, 5, 12345), (4, 4, 1.0, 0, 9), (6, 9, 0.0, 3, 1)])
def test_dropout_keep_bit_identical(M, K, p, salt, seed):
    s = _seed(seed)
    assert torch.equal(cb.dropout_keep(s, M, K, p, salt), ref.dropout_keep(s, M, K, p, salt))


def test_dropout_mask_is_the_contract_mask_inside_fwd():
    # x = identity columns: t = drop(x) A^T exposes the mask row by row; any deviation from the reference shows
    M = K = 24
    x = torch.eye(M)
    a = torch.randn(3, K)
    w, bb, scale = torch.zeros(5, K), torch.zeros(5, 3), torch.ones(3)
    seed = _seed(99)
    _, t = cb.lora_fwd(x, w, None, a, bb, scale, [0, 3], [0.5], seed)
    keep = ref.dropout_keep(seed, M, K, 0.5, 0)
    expected = (x * keep.float() * 2.0) @ a.T
    torch.testing.assert_close(t, expected, rtol=1e-6, atol=1e-6)


def _merge_case(dtype, fan_in_fan_out, N=67, K=45, ranks=(7,)):
    R = sum(ranks)
    w = torch.randn(N, K).to(dtype)
    a = (torch.randn(R, K) * 0.3).to(dtype)
    bb = (torch.randn(N, R) * 0.3).to(dtype)
    scale = (torch.rand(R) + 0.5).float()
    if fan_in_fan_out:
        w = w.T.contiguous()
    return w, a, bb, scale


@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_merge_rounds_once(dtype, fan_in_fan_out, sign):
    w, a, bb, scale = _merge_case(dtype, fan_in_fan_out)
    delta = (bb.double() * scale.double()) @ a.double()
    if fan_in_fan_out:
        delta = delta.T
    exact = w.double() + sign * delta
    ours = w.clone()
    assert bool(cb.lora_merge_(ours, a, bb, scale, sign, fan_in_fan_out, False))
    rounded_once = exact.to(dtype)
    assert (ours == rounded_once).double().mean().item() >= 0.99
    # where the sum does not cancel, at most one ulp from the exact value
    big = exact.abs() >= 2.0 ** -8 * (w.double().abs() + delta.abs())
    ulp = torch.finfo(dtype).eps * exact.abs().to(dtype).double()
    assert ((ours.double() - exact).abs() <= ulp + 1e-30)[big].all()


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_merge_fp32_and_unmerge(fan_in_fan_out):
    w, a, bb, scale = _merge_case(torch.float32, fan_in_fan_out)
    merged64 = _d64(w).clone()
    ref.lora_merge_(merged64, _d64(a), _d64(bb), scale, 1.0, fan_in_fan_out, False)
    ours = w.clone()
    assert bool(cb.lora_merge_(ours, a, bb, scale, 1.0, fan_in_fan_out, True))
    torch.testing.assert_close(ours.double(), merged64, rtol=2e-6, atol=1e-6)
    assert bool(cb.lora_merge_(ours, a, bb, scale, -1.0, fan_in_fan_out, True))
    torch.testing.assert_close(ours, w, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_safe_merge_with_inf_leaves_weight_untouched(dtype, fan_in_fan_out):
    w, a, bb, scale = _merge_case(dtype, fan_in_fan_out, N=150)  # several panels
    bb[140, 3] = float("inf")
    before = hashlib.sha256(w.view(torch.uint8).numpy().tobytes()).hexdigest()
    assert not bool(cb.lora_merge_(w, a, bb, scale, 1.0, fan_in_fan_out, True))
    assert hashlib.sha256(w.view(torch.uint8).numpy().tobytes()).hexdigest() == before
    # unsafe: written, and the inf shows up
    assert bool(cb.lora_merge_(w, a, bb, scale, 1.0, fan_in_fan_out, False))
    assert not torch.isfinite(w).all()


def test_bf16_exact_mode_rounds_once(monkeypatch):
    """FUSED_LORA_CPU_BF16_EXACT=1: x W^T and the rank term meet in fp32 and are rounded once."""
    monkeypatch.setenv("FUSED_LORA_CPU_BF16_EXACT", "1")
    x, w, b, a, bb, scale = _case(40, 96, 52, [5], torch.bfloat16)
    rp, dps, seed = [0, 5], [0.0], _seed()
    y, _ = cb.lora_fwd(x, w, b, a, bb, scale, rp, dps, seed)
    y64, _ = ref.lora_fwd(_d64(x), _d64(w), _d64(b), _d64(a), _d64(bb), scale, rp, dps, seed)
    # fp32 accumulation order may move a value that sits on a rounding boundary; nearly all are exact
    assert (y == y64.to(torch.bfloat16)).double().mean().item() >= 0.99


def test_fp16_rounds_once():
    x, w, b, a, bb, scale = _case(40, 96, 52, [5], torch.float16)
    rp, dps, seed = [0, 5], [0.0], _seed()
    y, _ = cb.lora_fwd(x, w, b, a, bb, scale, rp, dps, seed)
    y64, _ = ref.lora_fwd(_d64(x), _d64(w), _d64(b), _d64(a), _d64(bb), scale, rp, dps, seed)
    assert (y == y64.to(torch.float16)).double().mean().item() >= 0.99


# ---- 16-bit "fast" mode (bf16 by default, fp16 with FUSED_LORA_CPU_FP16_FAST=1): the base GEMM first, rounded,
# then bias + rank term added onto it in fp32 and rounded once more. N and K above 64 reach the kernels' full
# 64-column steps as well as their tails.
FAST_MODES = {"bf16": (torch.bfloat16, {}), "fp16_fast": (torch.float16, {"FUSED_LORA_CPU_FP16_FAST": "1"})}


def _fast_mode(monkeypatch, mode):
    dtype, env = FAST_MODES[mode]
    monkeypatch.delenv("FUSED_LORA_CPU_BF16_EXACT", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return dtype


def _base_then_term(base64, term64, dtype):
    """round(round(base) + term): the value the fast mode documents (term = bias + rank term, exact)."""
    return (base64.to(dtype).to(torch.float64) + term64).to(dtype)


@pytest.mark.parametrize("mode", list(FAST_MODES))
@pytest.mark.parametrize("bias", [True, False])
def test_fast_mode_adds_rank_term_onto_rounded_base(monkeypatch, mode, bias):
    dtype = _fast_mode(monkeypatch, mode)
    M, K, N, ranks = 37, 150, 141, [5]
    x, w, b, a, bb, scale = _case(M, K, N, ranks, dtype, bias=bias)
    bb = bb * 0.05  # rank term of the order of the base's last bits: where the two roundings show
    rp, dps, seed = [0, 5], [0.0], _seed()
    y, t = cb.lora_fwd(x, w, b, a, bb, scale, rp, dps, seed)
    x64, w64, b64, a64, bb64 = _d64(x), _d64(w), _d64(b), _d64(a), _d64(bb)
    t64 = ref.lora_fwd(x64, w64, None, a64, bb64, scale, rp, dps, seed)[1]
    term64 = t64 @ bb64.T + (b64 if bias else 0.0)
    expected = _base_then_term(x64 @ w64.T, term64, dtype)
    # fp32 accumulation order may move a value that sits on a rounding boundary; nearly all are exact
    assert (y == expected).double().mean().item() >= 0.99
    # the documented order, not the older one (rank term rounded first, then added to the fp32 base)
    older = (x64 @ w64.T + term64.to(dtype).to(torch.float64)).to(dtype)
    assert (older != expected).double().mean().item() > 0.02

    dy = torch.randn(M, N).to(dtype)
    dx, _, _ = cb.lora_bwd(dy, x, w, a, bb, scale, t, rp, dps, seed, True)
    ds64 = (_d64(dy) @ bb64) * scale.double()
    assert (dx == _base_then_term(_d64(dy) @ w64, ds64 @ a64, dtype)).double().mean().item() >= 0.99


@pytest.mark.parametrize("mode", list(FAST_MODES))
@pytest.mark.parametrize("bias", [True, False])
def test_fast_mode_dense_and_rows_vs_reference(monkeypatch, mode, bias):
    dtype = _fast_mode(monkeypatch, mode)
    M, K, N, ranks, dps = 70, 131, 150, [1, 7, 4], [0.0, 0.3, 0.0]
    x, w, b, a, bb, scale = _case(M, K, N, ranks, dtype, bias=bias)
    x = _noncontig_rows(x, "pad")
    rp, seed = _rank_ptr(ranks), _seed(11)
    x64, w64, b64, a64, bb64 = _d64(x), _d64(w), _d64(b), _d64(a), _d64(bb)
    dy = torch.randn(M, N).to(dtype)
    for drop in ([0.0, 0.0, 0.0], dps):  # the expand-only path, and the dropout path's fp32 rows
        y, t = cb.lora_fwd(x, w, b, a, bb, scale, rp, drop, seed)
        y64, _ = ref.lora_fwd(x64, w64, b64, a64, bb64, scale, rp, drop, seed)
        assert_close_vs_reference(y, y64, _torch_fwd(x, w, b, a, bb, scale, rp, drop, seed), atol=_atol(y64),
                                  name=f"y {drop}")
        dx, _, _ = cb.lora_bwd(dy, x, w, a, bb, scale, t, rp, drop, seed, True)
        dx64 = ref.lora_bwd(_d64(dy), x64, w64, a64, bb64, scale, _d64(t), rp, drop, seed, True)[0]
        dx_torch = _torch_bwd(dy, x, w, a, bb, scale, t, rp, drop, seed)[0]
        assert_close_vs_reference(dx, dx64, dx_torch, atol=_atol(dx64), name=f"dx {drop}")

    row_ids = torch.randint(-1, len(ranks), (M,))
    row_ids[:4] = torch.tensor([-1, 0, 1, 2])
    y, t = cb.lora_rows_fwd(x, w, b, a, bb, scale, rp, row_ids, dps, seed)
    y64, _ = ref.lora_rows_fwd(x64, w64, b64, a64, bb64, scale, rp, row_ids, dps, seed)
    assert_close_vs_reference(y, y64, _torch_fwd(x, w, b, a, bb, scale, rp, dps, seed, row_ids), atol=_atol(y64),
                              name="rows y")
    none = row_ids == -1  # rows without an adapter: the rounded base, plus the bias when there is one
    base_only = _base_then_term(x64 @ w64.T, b64 if bias else torch.zeros(N, dtype=torch.float64), dtype)
    assert (y[none] == base_only[none]).double().mean().item() >= 0.99
    dx, _, _ = cb.lora_rows_bwd(dy, x, w, a, bb, scale, t, rp, row_ids, dps, seed, True)
    dx64 = ref.lora_rows_bwd(_d64(dy), x64, w64, a64, bb64, scale, _d64(t), rp, row_ids, dps, seed, True)[0]
    dx_torch = _torch_bwd(dy, x, w, a, bb, scale, t, rp, dps, seed, row_ids)[0]
    assert_close_vs_reference(dx, dx64, dx_torch, atol=_atol(dx64), name="rows dx")
    assert torch.equal(dx[none], (dy @ w)[none])


# ---- float64: every op computes in float64 when any input is float64 (as the reference does), for gradcheck ----
F64 = torch.float64


def _atol64(ref64: torch.Tensor) -> float:
    return 1e-12 * (1.0 + (ref64.abs().max().item() if ref64.numel() else 0.0))


def _assert_f64_close(ours, ref64, torch_same, name):
    assert_close_vs_reference(ours, ref64, torch_same, atol=_atol64(ref64), name=name)


@pytest.mark.parametrize("config", list(DENSE_CONFIGS), ids=str)
@pytest.mark.parametrize("M", [0, 67])
def test_float64_fwd_bwd_vs_reference(config, M):
    cfg = DENSE_CONFIGS[config]
    K, N = 45, 29
    x, w, b, a, bb, scale = _case(M, K, N, cfg["ranks"], F64, bias=cfg["bias"])
    x = _noncontig_rows(x, cfg["layout"])
    rp, dps, seed = _rank_ptr(cfg["ranks"]), cfg["dps"], _seed()

    y, t = cb.lora_fwd(x, w, b, a, bb, scale, rp, dps, seed)
    y64, t64 = ref.lora_fwd(x, w, b, a, bb, scale, rp, dps, seed)
    assert y.dtype == F64 and t.dtype == F64  # t follows the reference: float64 for float64 inputs
    _assert_f64_close(y, y64, _torch_fwd(x, w, b, a, bb, scale, rp, dps, seed), "y")
    _assert_f64_close(t, t64, t64, "t")

    dy = torch.randn(M, N, dtype=F64)
    dx, da, db = cb.lora_bwd(dy, x, w, a, bb, scale, t, rp, dps, seed, True)
    ref_g = ref.lora_bwd(dy, x, w, a, bb, scale, t, rp, dps, seed, True)
    torch_g = _torch_bwd(dy, x, w, a, bb, scale, t, rp, dps, seed)
    for name, ours, r64, same in zip(("dx", "dA", "dB"), (dx, da, db), ref_g, torch_g):
        assert ours.dtype == F64, name
        _assert_f64_close(ours, r64, same, name)
    none_dx, da2, db2 = cb.lora_bwd(dy, x, w, a, bb, scale, t, rp, dps, seed, False)
    assert none_dx is None
    assert torch.equal(da2, da) and torch.equal(db2, db)


def test_float64_dropout_mask_is_the_contract_mask():
    # identity x exposes the mask element by element: t = drop(I) A^T row by row, exactly
    M = K = 24
    x, a = torch.eye(M, dtype=F64), torch.randn(3, K, dtype=F64)
    w, bb, scale = torch.zeros(5, K, dtype=F64), torch.zeros(5, 3, dtype=F64), torch.ones(3)
    seed = _seed(99)
    _, t = cb.lora_fwd(x, w, None, a, bb, scale, [0, 3], [0.5], seed)
    keep = ref.dropout_keep(seed, M, K, 0.5, 0)
    torch.testing.assert_close(t, (x * keep.to(F64) * 2.0) @ a.T, rtol=1e-14, atol=1e-14)
    assert 0 < keep.sum() < M * K


def test_float64_rows_fwd_bwd_vs_reference():
    M, K, N, ranks, dps = 71, 45, 29, [1, 7, 4, 2], [0.0, 0.4, 0.1, 0.3]
    x, w, b, a, bb, scale = _case(M, K, N, ranks, F64)
    x = _noncontig_rows(x, "step")
    rp, seed = _rank_ptr(ranks), _seed(-5)
    row_ids = torch.randint(-1, 3, (M,))  # adapter 3 owns no row
    row_ids[:3] = torch.tensor([-1, 1, 2])

    y, t = cb.lora_rows_fwd(x, w, b, a, bb, scale, rp, row_ids, dps, seed)
    y64, t64 = ref.lora_rows_fwd(x, w, b, a, bb, scale, rp, row_ids, dps, seed)
    assert y.dtype == F64 and t.dtype == F64 and t.shape == (M, 7)
    _assert_f64_close(y, y64, _torch_fwd(x, w, b, a, bb, scale, rp, dps, seed, row_ids), "y")
    _assert_f64_close(t, t64, t64, "t")
    assert (t[row_ids == -1] == 0).all() and (t[row_ids == 0, 1:] == 0).all()

    dy = torch.randn(M, N, dtype=F64)
    dx, da, db = cb.lora_rows_bwd(dy, x, w, a, bb, scale, t, rp, row_ids, dps, seed, True)
    ref_g = ref.lora_rows_bwd(dy, x, w, a, bb, scale, t, rp, row_ids, dps, seed, True)
    torch_g = _torch_bwd(dy, x, w, a, bb, scale, t, rp, dps, seed, row_ids)
    for name, ours, r64, same in zip(("dx", "dA", "dB"), (dx, da, db), ref_g, torch_g):
        assert ours.dtype == F64, name
        _assert_f64_close(ours, r64, same, name)
    assert (da[12:] == 0).all() and (db[:, 12:] == 0).all()
    assert cb.lora_rows_bwd(dy, x, w, a, bb, scale, t, rp, row_ids, dps, seed, False)[0] is None


def test_float64_empty_batch():
    x, w, b, a, bb, scale = _case(0, 13, 11, [2, 3], F64)
    rp, dps, seed = [0, 2, 5], [0.0, 0.5], _seed()
    row_ids = torch.empty(0, dtype=torch.int64)
    y, t = cb.lora_rows_fwd(x, w, b, a, bb, scale, rp, row_ids, dps, seed)
    assert y.shape == (0, 11) and t.shape == (0, 3) and t.dtype == F64
    dx, da, db = cb.lora_rows_bwd(torch.randn(0, 11, dtype=F64), x, w, a, bb, scale, t, rp, row_ids, dps, seed,
                                  True)
    assert dx.shape == (0, 13) and (da == 0).all() and (db == 0).all()


def test_float32_adapters_with_float64_x_compute_in_float64():
    """The combination the checks let through: computed in float64 like the reference; dA/dB in float32."""
    M, K, N, ranks = 33, 70, 21, [7]
    x, w, b, a, bb, scale = _case(M, K, N, ranks, F64, adapter_dtype=torch.float32)
    rp, dps, seed = _rank_ptr(ranks), [0.2], _seed(7)
    y, t = cb.lora_fwd(x, w, b, a, bb, scale, rp, dps, seed)
    y64, t64 = ref.lora_fwd(x, w, b, _d64(a), _d64(bb), scale, rp, dps, seed)
    assert y.dtype == F64 and t.dtype == F64
    _assert_f64_close(y, y64, y64, "y")
    _assert_f64_close(t, t64, t64, "t")
    dy = torch.randn(M, N, dtype=F64)
    dx, da, db = cb.lora_bwd(dy, x, w, a, bb, scale, t, rp, dps, seed, True)
    ref_g = ref.lora_bwd(dy, x, w, _d64(a), _d64(bb), scale, t, rp, dps, seed, True)
    assert dx.dtype == F64 and da.dtype == torch.float32 and db.dtype == torch.float32
    _assert_f64_close(dx, ref_g[0], ref_g[0], "dx")
    for name, ours, r64 in (("dA", da, ref_g[1]), ("dB", db, ref_g[2])):  # float64 values rounded once
        assert_close_vs_reference(ours, r64, r64.to(torch.float32), atol=_atol64(r64), name=name)
    row_ids = torch.randint(-1, 1, (M,))
    y, t = cb.lora_rows_fwd(x, w, b, a, bb, scale, rp, row_ids, dps, seed)
    y64, _ = ref.lora_rows_fwd(x, w, b, _d64(a), _d64(bb), scale, rp, row_ids, dps, seed)
    _assert_f64_close(y, y64, y64, "rows y")


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_float64_merge_vs_reference(fan_in_fan_out, sign):
    w, a, bb, scale = _merge_case(F64, fan_in_fan_out, N=150)  # several panels
    expected = w.clone()
    ref.lora_merge_(expected, a, bb, scale, sign, fan_in_fan_out, False)
    ours = w.clone()
    assert bool(cb.lora_merge_(ours, a, bb, scale, sign, fan_in_fan_out, True))
    _assert_f64_close(ours, expected, expected, "merged")
    assert bool(cb.lora_merge_(ours, a, bb, scale, -sign, fan_in_fan_out, False))
    torch.testing.assert_close(ours, w, rtol=0, atol=1e-13)


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_float64_safe_merge_with_inf_leaves_weight_untouched(fan_in_fan_out):
    w, a, bb, scale = _merge_case(F64, fan_in_fan_out, N=150)
    bb[140, 3] = float("inf")
    before = w.clone()
    assert not bool(cb.lora_merge_(w, a, bb, scale, 1.0, fan_in_fan_out, True))
    assert torch.equal(w, before)
    assert bool(cb.lora_merge_(w, a, bb, scale, 1.0, fan_in_fan_out, False))
    assert not torch.isfinite(w).all()


def test_float64_adapters_merge_into_float32_weight_rounded_once():
    w, a, bb, scale = _merge_case(torch.float32, False)
    a, bb = _d64(a), _d64(bb)
    expected = w.clone()
    ref.lora_merge_(expected, a, bb, scale, 1.0, False, False)
    ours = w.clone()
    assert bool(cb.lora_merge_(ours, a, bb, scale, 1.0, False, True))
    assert (ours == expected).double().mean().item() >= 0.99
    torch.testing.assert_close(ours, expected, rtol=2e-7, atol=1e-7)
