"""Per-row (mixed-batch) Triton kernels against the float64 reference, on --device (tests/devices.py).

Judged relative to PyTorch's own error at the same dtype (tests/checks.py), computed on the CPU. CPU: the
interpreter, bf16 skipped (it corrupts it silently; the codegen test compiles the bf16 variants). CUDA: compiled
kernels, bf16 included, on the GPU-marked cases.
"""

import pytest
import torch

from fused_lora import reference as ref
from fused_lora.kernels import rows
from tests.checks import assert_close_vs_reference
from tests.devices import cpu, device_params, move

# bf16: fp16's slack scaled by the ulp ratio (8 significant bits to 11)
ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Every torch.empty made during the test starts as NaN (floats) or -7 (ints): unwritten outputs show."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan") if t.is_floating_point() else -7) if t.numel() else t

    monkeypatch.setattr(torch, "empty", empty)


def _rank_ptr(ranks):
    ptr = [0]
    for r in ranks:
        ptr.append(ptr[-1] + r)
    return ptr


def _inputs(M, K, N, ranks, dtype, adapter_dtype, bias, none_rows=True, strided_x=True):
    gen = torch.Generator().manual_seed(M * 1000 + K * 10 + N + len(ranks))
    R = sum(ranks)
    # Non-contiguous rows: x is a column slice of a wider buffer.
    x = torch.randn(M, K + (5 if strided_x else 0), generator=gen).to(dtype)[:, :K]
    w = (torch.randn(N, K, generator=gen) / K**0.5).to(dtype)
    b = torch.randn(N, generator=gen).to(dtype) if bias else None
    a = (torch.randn(R, K, generator=gen) / K**0.5).to(adapter_dtype)
    bb = (torch.randn(N, R, generator=gen) * 0.5).to(adapter_dtype)
    scale = (torch.rand(R, generator=gen) + 0.5).to(torch.float32)
    row_ids = torch.randint(-1 if none_rows else 0, len(ranks), (M,), generator=gen)
    dy = torch.randn(M, N, generator=gen).to(dtype)
    seed = torch.tensor([0x1234_5678_9ABC_DEF], dtype=torch.int64)
    return x, w, b, a, bb, scale, row_ids, dy, seed


def _drop(x, seed, p, salt):
    """The contract's dropout at x's own dtype (what a plain PyTorch model computes)."""
    if p <= 0:
        return x
    keep = ref.dropout_keep(seed, x.shape[0], x.shape[1], p, salt)
    inv = (torch.tensor(1.0) / (1.0 - torch.tensor(p, dtype=torch.float32))).to(x.dtype)
    return x * keep.to(x.dtype) * inv


def _torch_same_dtype(x, w, b, a, bb, scale, rank_ptr, row_ids, dropout_p, seed, dy):
    """The plain PyTorch forward/backward at the inputs' dtypes, for the error bar of the comparison."""
    dt, adt = x.dtype, a.dtype
    y = x @ w.T + (b if b is not None else 0)
    r_max = rows._rank_max(rank_ptr)
    t = torch.zeros(x.shape[0], r_max, dtype=adt)
    dx = dy @ w
    da, db = torch.zeros_like(a), torch.zeros_like(bb)
    for i in range(len(rank_ptr) - 1):
        lo, hi = rank_ptr[i], rank_ptr[i + 1]
        sel = (row_ids == i).to(adt)[:, None]
        ti = (_drop(x, seed, dropout_p[i], i).to(adt) @ a[lo:hi].T) * scale[lo:hi].to(adt) * sel
        t[:, : hi - lo] += ti
        y = y + (ti @ bb[:, lo:hi].T).to(dt)
        db[:, lo:hi] = (dy.to(adt) * sel).T @ ti
        ds = (dy.to(adt) @ bb[:, lo:hi]) * scale[lo:hi].to(adt) * sel
        da[lo:hi] = ds.T @ _drop(x, seed, dropout_p[i], i).to(adt)
        dx = dx + _drop((ds @ a[lo:hi]).to(dt), seed, dropout_p[i], i)
    return y, t.float(), dx, da, db


def _check(
    M, K, N, ranks, dtype, adapter_dtype, dropout_p, bias=True, none_rows=True, need_dx=True, device=torch.device("cpu")
):
    x, w, b, a, bb, scale, row_ids, dy, seed = _inputs(M, K, N, ranks, dtype, adapter_dtype, bias, none_rows)
    rank_ptr = _rank_ptr(ranks)
    f64 = lambda v: None if v is None else v.to(torch.float64)  # noqa: E731
    xd, wd, bd, ad, bbd, scaled, idsd, dyd, seedd = (
        move(v, device) for v in (x, w, b, a, bb, scale, row_ids, dy, seed)
    )

    y, t = rows.lora_rows_fwd(xd, wd, bd, ad, bbd, scaled, rank_ptr, idsd, dropout_p, seedd)
    td = t
    y, t = cpu(y), cpu(t)
    y64, t64 = ref.lora_rows_fwd(f64(x), f64(w), f64(b), f64(a), f64(bb), scale, rank_ptr, row_ids, dropout_p, seed)
    ty, tt, tdx, tda, tdb = _torch_same_dtype(x, w, b, a, bb, scale, rank_ptr, row_ids, dropout_p, seed, dy)
    assert y.dtype == dtype and t.dtype == torch.float32 and t.shape == (M, rows._rank_max(rank_ptr))
    atol = ATOL[dtype]
    assert_close_vs_reference(y, y64, ty, atol=atol, name="y")
    assert_close_vs_reference(t, t64, tt, atol=atol, name="t")

    dx, da, db = (
        cpu(g) for g in rows.lora_rows_bwd(dyd, xd, wd, ad, bbd, scaled, td, rank_ptr, idsd, dropout_p, seedd, need_dx)
    )
    dx64, da64, db64 = ref.lora_rows_bwd(
        f64(dy), f64(x), f64(w), f64(a), f64(bb), scale, t64, rank_ptr, row_ids, dropout_p, seed, need_dx
    )
    assert da.dtype == adapter_dtype and db.dtype == adapter_dtype
    assert_close_vs_reference(da, da64, tda, atol=atol, name="dA")
    assert_close_vs_reference(db, db64, tdb, atol=atol, name="dB")
    if need_dx:
        assert dx.dtype == dtype
        assert_close_vs_reference(dx, dx64, tdx, atol=atol, name="dx")
    else:
        assert dx is None


CASES = [
    # M, K, N, ranks, dtype, adapter dtype, dropout per adapter, bias
    (37, 45, 29, [3, 7, 1], torch.float32, torch.float32, [0.0, 0.3, 0.5], True),
    (41, 48, 40, [1, 64, 8, 16, 33], torch.float16, torch.float16, [0.1, 0.0, 0.25, 0.0, 0.5], False),
    (29, 36, 23, [7, 2], torch.float16, torch.float32, [0.2, 0.0], True),
    (53, 20, 24, [5, 1, 9, 2, 17, 3, 12, 64], torch.float32, torch.float32, [0.0] * 7 + [0.3], True),
    (100, 24, 17, [16], torch.float16, torch.float16, [0.0], True),  # 64-row tiles
    (300, 12, 20, [4], torch.float32, torch.float32, [0.4], False),  # 128-row tiles
    # bf16 (GPU only): a decode-like batch over many adapters with dropout, 64-row tiles with fp32 adapters,
    # and an aligned shape (multiples of 16, as real layers are)
    (41, 48, 40, [1, 64, 8, 16, 33], torch.bfloat16, torch.bfloat16, [0.1, 0.0, 0.25, 0.0, 0.5], False),
    (100, 24, 17, [16], torch.bfloat16, torch.float32, [0.0], True),
    (16, 256, 128, [16, 16, 8, 16], torch.bfloat16, torch.bfloat16, [0.0, 0.0, 0.0, 0.1], False),
]
GPU_CASES = {1, 3, 5} | set(range(6, len(CASES)))  # each tile height and dtype once on --device cuda


def _case_id(case):
    M, K, N, ranks, dt, adt, ps, bias = case
    return (
        f"M{M}K{K}N{N}-r{'_'.join(map(str, ranks))}-{str(dt)[6:]}-{str(adt)[6:]}-"
        f"p{'_'.join(str(p) for p in ps)}-{'bias' if bias else 'nobias'}"
    )


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        metafunc.parametrize(
            "case",
            device_params(
                metafunc.config,
                CASES,
                [_case_id(c) for c in CASES],
                [i in GPU_CASES for i in range(len(CASES))],
                lambda c: c[4],
            ),
        )


def test_rows_matches_reference(poisoned_empty, case, device):
    M, K, N, ranks, dtype, adapter_dtype, dropout_p, bias = case
    _check(M, K, N, ranks, dtype, adapter_dtype, dropout_p, bias, device=device)


def test_rows_all_none_and_no_dx(poisoned_empty, device):
    x, w, b, a, bb, scale, _, dy, seed = (
        move(v, device) for v in _inputs(19, 21, 13, [3, 5], torch.float32, torch.float32, True)
    )
    row_ids = torch.full((19,), -1, dtype=torch.int64, device=device)
    y, t = rows.lora_rows_fwd(x, w, b, a, bb, scale, [0, 3, 8], row_ids, [0.5, 0.0], seed)
    torch.testing.assert_close(cpu(y), cpu(x) @ cpu(w).T + cpu(b), rtol=1e-5, atol=1e-5)
    assert torch.equal(cpu(t), torch.zeros(19, 5))
    dx, da, db = rows.lora_rows_bwd(dy, x, w, a, bb, scale, t, [0, 3, 8], row_ids, [0.5, 0.0], seed, False)
    assert dx is None
    assert torch.equal(cpu(da), torch.zeros_like(cpu(a))) and torch.equal(cpu(db), torch.zeros_like(cpu(bb)))


def test_rows_single_adapter_every_row(poisoned_empty, device):
    _check(
        33, 17, 19, [6], torch.float16, torch.float16, [0.0], bias=True, none_rows=False, need_dx=False, device=device
    )


def test_rows_m_zero(poisoned_empty, device):
    x, w, b, a, bb, scale, _, _, seed = (
        move(v, device) for v in _inputs(4, 8, 6, [2, 3], torch.float32, torch.float32, True)
    )
    x0 = x[:0]
    ids = torch.zeros(0, dtype=torch.int64, device=device)
    y, t = rows.lora_rows_fwd(x0, w, b, a, bb, scale, [0, 2, 5], ids, [0.0, 0.1], seed)
    assert y.shape == (0, 6) and t.shape == (0, 3)
    dx, da, db = rows.lora_rows_bwd(
        torch.zeros(0, 6, device=device), x0, w, a, bb, scale, t, [0, 2, 5], ids, [0.0, 0.1], seed, True
    )
    assert dx.shape == (0, 8)
    assert torch.equal(cpu(da), torch.zeros_like(cpu(a))) and torch.equal(cpu(db), torch.zeros_like(cpu(bb)))
