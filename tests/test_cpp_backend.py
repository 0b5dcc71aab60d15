"""The C++ CPU backend (csrc/, fused_lora.ops.cpp_backend) against the float64 reference of every op.

Judged as CONTRACT.md asks: err(ours) <= 2 * err(plain torch at the same dtype) + atol, errors measured
against fused_lora.reference run in float64; dropout masks bit for bit; merge rounded once.
Every test runs once per ISA level this machine supports (cpp_backend.isa_paths(), e.g. baseline and avx2 on an
AVX2-only CPU), with the kernels capped at that level.
Where fused_lora._C is not built this module is skipped (CI fails instead); for a development build set
FUSED_LORA_CPP_DEV_BUILD=<build dir> to compile csrc/ with torch.utils.cpp_extension.load.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
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
    module = load(
        name="fused_lora_C_dev",
        sources=sorted(glob.glob(os.path.join(root, "csrc", "*.cpp"))),
        extra_cflags=["-O3", "-fopenmp", "-std=c++17"],
        extra_ldflags=["-fopenmp"],
        build_directory=build_dir,
    )
    sys.modules["fused_lora._C"] = module
    from fused_lora.ops import cpp_backend

    return cpp_backend


cb = _load_backend()


@pytest.fixture(autouse=True, params=cb.isa_paths())
def isa_level(request):
    """Every case once per ISA level the CPU supports, the C++ kernels capped at it."""
    with cb.use_isa(request.param) as level:
        assert cb.active_isa() == level == request.param
        yield level


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
    w = (torch.randn(N, K) / K**0.5).to(dtype)
    b = torch.randn(N).to(dtype) if bias else None
    a = (torch.randn(R, K) / K**0.5).to(adapter_dtype)
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
    assert_close_vs_reference(
        y, y64, _torch_fwd(x, w, b, a, bb, scale, rp, dps, seed, row_ids), atol=_atol(y64), name="y"
    )
    t_fp32 = ref.lora_rows_fwd(x.float(), w.float(), None, a.float(), bb.float(), scale, rp, row_ids, dps, seed)[1]
    assert_close_vs_reference(t, t64, t_fp32, atol=_atol(t64), name="t")
    assert (t[row_ids == -1] == 0).all() and (t[row_ids == 0, 1:] == 0).all()

    dy = torch.randn(M, N).to(dtype)
    dx, da, db = cb.lora_rows_bwd(dy, x, w, a, bb, scale, t, rp, row_ids, dps, seed, True)
    ref_g = ref.lora_rows_bwd(
        _d64(dy), _d64(x), _d64(w), _d64(a), _d64(bb), scale, _d64(t), rp, row_ids, dps, seed, True
    )
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
    dx, da, db = cb.lora_rows_bwd(torch.randn(0, 11).to(dtype), x, w, a, bb, scale, t, rp, row_ids, dps, seed, True)
    assert dx.shape == (0, 13) and (da == 0).all() and (db == 0).all()


@pytest.mark.parametrize(
    "M,K,p,salt,seed",
    [
        (5, 7, 0.3, 0, 0),
        (3, 13, 0.5, 2, -1),
        (17, 33, 0.9, 1, 2**40 + 3),
        (64, 130, 0.1, 5, 12345),
        (4, 4, 1.0, 0, 9),
        (6, 9, 0.0, 3, 1),
    ],
)
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
    big = exact.abs() >= 2.0**-8 * (w.double().abs() + delta.abs())
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
    monkeypatch.delenv("FUSED_LORA_CPU_GEMM", raising=False)
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


# ---- 16-bit "fast" mode, the vendor base GEMM (bf16 with FUSED_LORA_CPU_GEMM=vendor, the default for larger
# batches where torch runs bf16 GEMMs on oneDNN; fp16 with FUSED_LORA_CPU_FP16_FAST=1): the base GEMM first, rounded,
# then bias + rank term added onto it in fp32 and rounded once more. N and K above 64 reach the kernels' full
# 64-column steps as well as their tails. tests/test_cpp_strategies.py covers the other base GEMMs.
FAST_MODES = {
    "bf16": (torch.bfloat16, {"FUSED_LORA_CPU_GEMM": "vendor"}),
    "fp16_fast": (torch.float16, {"FUSED_LORA_CPU_FP16_FAST": "1"}),
}
GEMM_SWITCHES = (
    "FUSED_LORA_CPU_GEMM",
    "FUSED_LORA_CPU_DIRECT_MAX_ROWS",
    "FUSED_LORA_CPU_FP16_FAST",
    "FUSED_LORA_CPU_BF16_EXACT",
)


def _fast_mode(monkeypatch, mode):
    dtype, env = FAST_MODES[mode]
    for name in GEMM_SWITCHES:
        monkeypatch.delenv(name, raising=False)
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
        assert_close_vs_reference(
            y, y64, _torch_fwd(x, w, b, a, bb, scale, rp, drop, seed), atol=_atol(y64), name=f"y {drop}"
        )
        dx, _, _ = cb.lora_bwd(dy, x, w, a, bb, scale, t, rp, drop, seed, True)
        dx64 = ref.lora_bwd(_d64(dy), x64, w64, a64, bb64, scale, _d64(t), rp, drop, seed, True)[0]
        dx_torch = _torch_bwd(dy, x, w, a, bb, scale, t, rp, drop, seed)[0]
        assert_close_vs_reference(dx, dx64, dx_torch, atol=_atol(dx64), name=f"dx {drop}")

    row_ids = torch.randint(-1, len(ranks), (M,))
    row_ids[:4] = torch.tensor([-1, 0, 1, 2])
    y, t = cb.lora_rows_fwd(x, w, b, a, bb, scale, rp, row_ids, dps, seed)
    y64, _ = ref.lora_rows_fwd(x64, w64, b64, a64, bb64, scale, rp, row_ids, dps, seed)
    assert_close_vs_reference(
        y, y64, _torch_fwd(x, w, b, a, bb, scale, rp, dps, seed, row_ids), atol=_atol(y64), name="rows y"
    )
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
    dx, da, db = cb.lora_rows_bwd(torch.randn(0, 11, dtype=F64), x, w, a, bb, scale, t, rp, row_ids, dps, seed, True)
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


# ---- operands with padding after their rows (NaN there) or a strided bias: nothing past a row's end may be read.
# oneDNN's AMX brgemm reads each row of A up to a multiple of 32 columns (uxlfoundation/oneDNN#5717), so every
# operand a vendor GEMM sees must be packed; our own kernels must honour strides. K, N and the ranks are not
# multiples of 32 (nor of 16). A machine without AMX cannot show the leak itself: tests/test_cpp_isa_gemm.py runs
# these layouts against a GEMM that reads past the K tail the way the AMX kernel does.
STRIDE_MODES = {  # the rule's choice at M = 37 (direct for 16-bit where torch has no oneDNN), and each forced
    "fp32": (torch.float32, {}),
    "fp32_vendor": (torch.float32, {"FUSED_LORA_CPU_GEMM": "vendor"}),
    "fp32_direct": (torch.float32, {"FUSED_LORA_CPU_GEMM": "direct"}),
    "fp16": (torch.float16, {}),
    "fp16_fast": (torch.float16, {"FUSED_LORA_CPU_FP16_FAST": "1"}),
    "bf16": (torch.bfloat16, {}),
    "bf16_vendor": (torch.bfloat16, {"FUSED_LORA_CPU_GEMM": "vendor"}),
    "bf16_mixed": (torch.bfloat16, {"FUSED_LORA_CPU_GEMM": "mixed"}),
    "bf16_exact": (torch.bfloat16, {"FUSED_LORA_CPU_BF16_EXACT": "1"}),
}
STRIDED_OPERANDS = ("x", "dy", "weights", "t", "bias", "all")  # weights: weight, lora_a and lora_b


def _nan_strided_1d(v: torch.Tensor) -> torch.Tensor:
    """v with the same values at stride 2, NaN in between."""
    wide = torch.full((2 * v.numel(),), float("nan"), dtype=v.dtype)
    wide[::2] = v
    return wide[::2]


def _set_mode(monkeypatch, mode):
    dtype, env = STRIDE_MODES[mode]
    for name in GEMM_SWITCHES:
        monkeypatch.delenv(name, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return dtype


@pytest.mark.parametrize("mode", list(STRIDE_MODES))
@pytest.mark.parametrize("operand", STRIDED_OPERANDS)
def test_row_strided_operands_with_nan_padding(monkeypatch, mode, operand):
    dtype = _set_mode(monkeypatch, mode)
    M, K, N, ranks, dps = 37, 45, 29, [1, 7, 4], [0.0, 0.3, 0.0]
    x, w, b, a, bb, scale = _case(M, K, N, ranks, dtype)
    dy = torch.randn(M, N).to(dtype)
    rp, seed = _rank_ptr(ranks), _seed(3)
    row_ids = torch.randint(-1, len(ranks), (M,))
    row_ids[:4] = torch.tensor([-1, 0, 1, 2])

    def lay(name, v):
        if operand not in (name, "all") and not (operand == "weights" and name in ("weight", "lora_a", "lora_b")):
            return v
        return _nan_strided_1d(v) if v.dim() == 1 else _noncontig_rows(v, "pad")

    xs, ws, bs, as_, bbs, dys = (
        lay("x", x),
        lay("weight", w),
        lay("bias", b),
        lay("lora_a", a),
        lay("lora_b", bb),
        lay("dy", dy),
    )
    x64, w64, b64, a64, bb64, dy64 = _d64(x), _d64(w), _d64(b), _d64(a), _d64(bb), _d64(dy)
    for drop in ([0.0, 0.0, 0.0], dps):  # direct kernels (no dropout) and the fp32 staging with masks
        y, t = cb.lora_fwd(xs, ws, bs, as_, bbs, scale, rp, drop, seed)
        y64, t64 = ref.lora_fwd(x64, w64, b64, a64, bb64, scale, rp, drop, seed)
        assert_close_vs_reference(
            y, y64, _torch_fwd(x, w, b, a, bb, scale, rp, drop, seed), atol=_atol(y64), name=f"y {drop}"
        )
        t_fp32 = ref.lora_fwd(x.float(), w.float(), None, a.float(), bb.float(), scale, rp, drop, seed)[1]
        assert_close_vs_reference(t, t64, t_fp32, atol=_atol(t64), name=f"t {drop}")
        grads = cb.lora_bwd(dys, xs, ws, as_, bbs, scale, lay("t", t), rp, drop, seed, True)
        ref_g = ref.lora_bwd(dy64, x64, w64, a64, bb64, scale, _d64(t), rp, drop, seed, True)
        torch_g = _torch_bwd(dy, x, w, a, bb, scale, t, rp, drop, seed)
        for name, ours, r64, same in zip(("dx", "dA", "dB"), grads, ref_g, torch_g):
            assert_close_vs_reference(ours, r64, same, atol=_atol(r64), name=f"{name} {drop}")

    y, t = cb.lora_rows_fwd(xs, ws, bs, as_, bbs, scale, rp, row_ids, dps, seed)
    y64, t64 = ref.lora_rows_fwd(x64, w64, b64, a64, bb64, scale, rp, row_ids, dps, seed)
    assert_close_vs_reference(
        y, y64, _torch_fwd(x, w, b, a, bb, scale, rp, dps, seed, row_ids), atol=_atol(y64), name="rows y"
    )
    grads = cb.lora_rows_bwd(dys, xs, ws, as_, bbs, scale, lay("t", t), rp, row_ids, dps, seed, True)
    ref_g = ref.lora_rows_bwd(dy64, x64, w64, a64, bb64, scale, _d64(t), rp, row_ids, dps, seed, True)
    torch_g = _torch_bwd(dy, x, w, a, bb, scale, t, rp, dps, seed, row_ids)
    for name, ours, r64, same in zip(("dx", "dA", "dB"), grads, ref_g, torch_g):
        assert_close_vs_reference(ours, r64, same, atol=_atol(r64), name=f"rows {name}")


def test_single_padded_row_and_broadcast_rows():
    """One padded row (torch calls it contiguous) and rows sharing memory (stride 0), bf16 fast path."""
    K, N, ranks = 45, 29, [3]
    x1, w, b, a, bb, scale = _case(1, K, N, ranks, torch.bfloat16)
    rp, seed = _rank_ptr(ranks), _seed()
    for x in (_noncontig_rows(x1, "pad"), x1.expand(5, K)):
        y, t = cb.lora_fwd(x, w, b, a, bb, scale, rp, [0.0], seed)
        y64, _ = ref.lora_fwd(_d64(x), _d64(w), _d64(b), _d64(a), _d64(bb), scale, rp, [0.0], seed)
        assert_close_vs_reference(y, y64, _torch_fwd(x, w, b, a, bb, scale, rp, [0.0], seed), atol=_atol(y64))
        dy = torch.randn(1, N).to(torch.bfloat16).expand(x.shape[0], N)
        dx, da, db = cb.lora_bwd(dy, x, w, a, bb, scale, t, rp, [0.0], seed, True)
        ref_g = ref.lora_bwd(_d64(dy), _d64(x), _d64(w), _d64(a), _d64(bb), scale, _d64(t), rp, [0.0], seed, True)
        for name, ours, r64, same in zip(
            ("dx", "dA", "dB"), (dx, da, db), ref_g, _torch_bwd(dy, x, w, a, bb, scale, t, rp, [0.0], seed)
        ):
            assert_close_vs_reference(ours, r64, same, atol=_atol(r64), name=name)


def test_merge_into_row_strided_weight():
    """A weight with padding after its rows is merged in place, the padding untouched."""
    w, a, bb, scale = _merge_case(torch.bfloat16, False)
    wide = torch.full((w.shape[0], w.shape[1] + 5), float("nan"), dtype=w.dtype)
    wide[:, : w.shape[1]] = w
    expected = w.clone()
    assert bool(cb.lora_merge_(expected, a, bb, scale, 1.0, False, True))
    assert bool(cb.lora_merge_(wide[:, : w.shape[1]], a, bb, scale, 1.0, False, True))
    assert torch.equal(wide[:, : w.shape[1]], expected)
    assert wide[:, w.shape[1] :].isnan().all()


# ---- per-row adapter ids outside [-1, n): no adapter for that row, on every backend (CONTRACT.md) ----
@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,), ids=str)
def test_rows_out_of_range_ids_act_as_no_adapter(dtype):
    M, K, N, ranks, dps = 23, 19, 17, [2, 5], [0.0, 0.4]
    x, w, b, a, bb, scale = _case(M, K, N, ranks, dtype)
    rp, seed = _rank_ptr(ranks), _seed(21)
    row_ids = torch.randint(0, 2, (M,))
    row_ids[[0, 3, 7, 11, 20]] = torch.tensor([2, -2, 99, -(2**40), 2**62])
    as_none = torch.where((row_ids < -1) | (row_ids >= len(ranks)), -1, row_ids)
    y, t = cb.lora_rows_fwd(x, w, b, a, bb, scale, rp, row_ids, dps, seed)
    y_none, t_none = cb.lora_rows_fwd(x, w, b, a, bb, scale, rp, as_none, dps, seed)
    assert torch.equal(y, y_none) and torch.equal(t, t_none)
    assert (t[[0, 3, 7, 11, 20]] == 0).all()
    y64, _ = ref.lora_rows_fwd(_d64(x), _d64(w), _d64(b), _d64(a), _d64(bb), scale, rp, row_ids, dps, seed)
    assert_close_vs_reference(y, y64, _torch_fwd(x, w, b, a, bb, scale, rp, dps, seed, row_ids), atol=_atol(y64))
    dy = torch.randn(M, N).to(dtype)
    got = cb.lora_rows_bwd(dy, x, w, a, bb, scale, t, rp, row_ids, dps, seed, True)
    want = cb.lora_rows_bwd(dy, x, w, a, bb, scale, t, rp, as_none, dps, seed, True)
    for name, g, e in zip(("dx", "dA", "dB"), got, want):
        assert torch.equal(g, e), name


# ---- edge shapes on every dtype combination the contract allows ----
DTYPE_COMBOS = {  # (x/weight/bias dtype, lora_a/lora_b dtype)
    "fp32": (torch.float32, torch.float32),
    "fp16": (torch.float16, torch.float16),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "fp16_fp32ad": (torch.float16, torch.float32),
    "bf16_fp32ad": (torch.bfloat16, torch.float32),
    "fp64": (torch.float64, torch.float64),
    "fp64_fp32ad": (torch.float64, torch.float32),
}
EDGE_SHAPES = {
    "K0": (6, 0, 7, [2, 1]),
    "N0": (6, 9, 0, [2, 1]),
    "M0": (0, 9, 7, [2, 1]),
    "rank1": (6, 9, 7, [1]),
    "one": (1, 1, 1, [1]),
}


def _tol_check(ours, r64, same, name):
    assert ours.shape == r64.shape, name
    if ours.dtype == torch.float64:
        _assert_f64_close(ours, r64, same, name)
    else:
        assert_close_vs_reference(ours, r64, same, atol=_atol(r64), name=name)


@pytest.mark.parametrize("combo", list(DTYPE_COMBOS))
@pytest.mark.parametrize("shape", list(EDGE_SHAPES))
def test_edge_shapes_every_dtype_combination(combo, shape):
    dtype, ad = DTYPE_COMBOS[combo]
    M, K, N, ranks = EDGE_SHAPES[shape]
    x, w, b, a, bb, scale = _case(M, K, N, ranks, dtype, adapter_dtype=ad)
    rp, dps, seed = _rank_ptr(ranks), [0.0, 0.5][: len(ranks)], _seed(4)
    R = sum(ranks)
    t_dtype = torch.float64 if torch.float64 in (dtype, ad) else torch.float32
    args64 = (_d64(x), _d64(w), _d64(b), _d64(a), _d64(bb))

    y, t = cb.lora_fwd(x, w, b, a, bb, scale, rp, dps, seed)
    y64, t64 = ref.lora_fwd(*args64, scale, rp, dps, seed)
    assert y.dtype == dtype and t.dtype == t_dtype and t.shape == (M, R)
    _tol_check(y, y64, _torch_fwd(x, w, b, a, bb, scale, rp, dps, seed), "y")
    _tol_check(t, t64, t64, "t")
    if K == 0:
        assert torch.equal(y, b.expand(M, N)) and (t == 0).all()

    dy = torch.randn(M, N).to(dtype)
    dx, da, db = cb.lora_bwd(dy, x, w, a, bb, scale, t, rp, dps, seed, True)
    assert dx.dtype == dtype and da.dtype == ad and db.dtype == ad
    ref_g = ref.lora_bwd(_d64(dy), *args64[:2], *args64[3:], scale, _d64(t), rp, dps, seed, True)
    for name, ours, r64, same in zip(
        ("dx", "dA", "dB"), (dx, da, db), ref_g, _torch_bwd(dy, x, w, a, bb, scale, t, rp, dps, seed)
    ):
        _tol_check(ours, r64, same, name)
    if K == 0 or N == 0 or M == 0:
        assert (da == 0).all() and (db == 0).all() and (dx == 0).all()

    row_ids = torch.arange(M) % (len(ranks) + 1) - 1
    y, t = cb.lora_rows_fwd(x, w, b, a, bb, scale, rp, row_ids, dps, seed)
    y64, t64 = ref.lora_rows_fwd(*args64, scale, rp, row_ids, dps, seed)
    assert t.shape == (M, max(ranks)) and t.dtype == t_dtype
    _tol_check(y, y64, _torch_fwd(x, w, b, a, bb, scale, rp, dps, seed, row_ids), "rows y")
    _tol_check(t, t64, t64, "rows t")
    grads = cb.lora_rows_bwd(dy, x, w, a, bb, scale, t, rp, row_ids, dps, seed, True)
    ref_g = ref.lora_rows_bwd(_d64(dy), *args64[:2], *args64[3:], scale, _d64(t), rp, row_ids, dps, seed, True)
    for name, ours, r64, same in zip(
        ("dx", "dA", "dB"), grads, ref_g, _torch_bwd(dy, x, w, a, bb, scale, t, rp, dps, seed, row_ids)
    ):
        _tol_check(ours, r64, same, f"rows {name}")


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.int64, torch.bool, torch.uint8], ids=str)
def test_integer_and_bool_tensors_are_refused_by_name(dtype):
    w = torch.ones(5, 4).to(dtype)
    a, bb, scale = torch.randn(2, 4), torch.randn(5, 2), torch.ones(2)
    before = w.clone()
    with pytest.raises(TypeError, match=rf"lora_merge_: weight has dtype {re.escape(str(dtype))}; expected"):
        cb.lora_merge_(w, a, bb, scale, 1.0, False, True)
    assert torch.equal(w, before)
    with pytest.raises(TypeError, match=r"lora_fwd: x has dtype"):
        cb.lora_fwd(torch.ones(3, 4).to(dtype), torch.randn(5, 4), None, a, bb, scale, [0, 2], [0.0], _seed())
    with pytest.raises(TypeError, match=r"lora_rows_fwd: weight has dtype"):
        cb.lora_rows_fwd(
            torch.randn(3, 4), w, None, a, bb, scale, [0, 2], torch.zeros(3, dtype=torch.int64), [0.0], _seed()
        )
    with pytest.raises(TypeError, match=r"lora_bwd: dy has dtype"):
        cb.lora_bwd(
            torch.ones(3, 5).to(dtype),
            torch.randn(3, 4),
            torch.randn(5, 4),
            a,
            bb,
            scale,
            torch.zeros(3, 2),
            [0, 2],
            [0.0],
            _seed(),
            True,
        )


def test_float_row_ids_are_refused_by_name():
    x, w, b, a, bb, scale = _case(3, 4, 5, [2], torch.float32)
    with pytest.raises(TypeError, match=r"row_ids has dtype torch\.float32; expected an integer dtype"):
        cb.lora_rows_fwd(x, w, b, a, bb, scale, [0, 2], torch.zeros(3), [0.0], _seed())
