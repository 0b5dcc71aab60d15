"""The split decode kernel and mixed-adapter tiles (issue 13) against the float64 reference, on --device.

Covers what tests/test_triton_dense.py and tests/test_triton_rows.py do not: every rank mode of decode_kernel (the
shrink in the K loop with several dropout segments, t from a split shrink launch for R > 32, per-row t), K split
into many uneven shares, row tiles mixing many adapters (16 rows x 16 adapters; ranks 1 and 5; 64-wide stacks;
rows without an adapter), and the backward of those batches. Judged as the other kernel tests are
(tests/checks.py: err <= 2 * err(torch, same dtype) + atol); outputs and internal buffers NaN-poisoned; bf16 skipped
under the interpreter (it corrupts bf16), run with --device cuda.
"""

import zlib

import pytest
import torch

pytest.importorskip("triton")

from fused_lora import reference  # noqa: E402
from fused_lora.kernels import dense, launch_plan, rows  # noqa: E402
from fused_lora.kernels.decode import DENSE_T, IN_PASS, ROWS_T  # noqa: E402
from tests.checks import assert_close_vs_reference, poisoned_empty  # noqa: E402
from tests.devices import cpu, device_params, move  # noqa: E402

SEED = 0x0F1E_2D3C_4B5A
ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _rank_ptr(ranks):
    ptr = [0]
    for r in ranks:
        ptr.append(ptr[-1] + r)
    return ptr


def _dropped(x, seed, p, salt):
    """PEFT's dropout in x's own dtype, with the contract's mask."""
    if p <= 0.0:
        return x
    keep = reference.dropout_keep(seed, x.shape[0], x.shape[1], p, salt)
    inv_keep = (torch.tensor(1.0) / (1.0 - torch.tensor(p, dtype=torch.float32))).to(x.dtype)
    return x * keep.to(x.dtype) * inv_keep


def _torch_same_dtype(x, w, bias, a, b, scale, rank_ptr, dropout_p, seed, dy, row_ids):
    """Plain PyTorch at the inputs' dtypes (the error yardstick): y, t, dx, dA, dB. row_ids None: dense."""
    dt, adt = x.dtype, a.dtype
    M = x.shape[0]
    n = len(rank_ptr) - 1
    y = torch.nn.functional.linear(x, w, bias)
    dx = dy @ w
    width = max([1] + [rank_ptr[i + 1] - rank_ptr[i] for i in range(n)]) if row_ids is not None else rank_ptr[-1]
    t = torch.zeros(M, width, dtype=adt)
    da, db = torch.zeros_like(a), torch.zeros_like(b)
    for i in range(n):
        lo, hi = rank_ptr[i], rank_ptr[i + 1]
        sel = torch.ones(M, 1, dtype=adt) if row_ids is None else (row_ids == i).to(adt)[:, None]
        ti = (_dropped(x, seed, dropout_p[i], i).to(adt) @ a[lo:hi].T) * scale[lo:hi].to(adt) * sel
        cols = slice(lo, hi) if row_ids is None else slice(0, hi - lo)
        t[:, cols] += ti
        y = y + (ti @ b[:, lo:hi].T).to(dt)
        db[:, lo:hi] = (dy.to(adt) * sel).T @ ti
        ds = (dy.to(adt) @ b[:, lo:hi]) * scale[lo:hi].to(adt) * sel
        da[lo:hi] = ds.T @ _dropped(x, seed, dropout_p[i], i).to(adt)
        dx = dx + _dropped((ds @ a[lo:hi]).to(dt), seed, dropout_p[i], i)
    return y, t.float(), dx, da, db


def _inputs(M, K, N, ranks, dtype, adapter_dtype, has_bias, gen):
    R = sum(ranks)
    x = torch.randn(M, K + 3, generator=gen).to(dtype)[:, :K]  # rows of a wider buffer
    w = (torch.randn(N, K, generator=gen) / K**0.5).to(dtype)
    bias = torch.randn(N, generator=gen).to(dtype) if has_bias else None
    a = (torch.randn(R, K, generator=gen) / K**0.5).to(adapter_dtype)
    b = (torch.randn(N, R, generator=gen) * 0.5).to(adapter_dtype)
    scale = torch.rand(R, generator=gen) + 0.5
    dy = torch.randn(M, N, generator=gen).to(dtype)
    return x, w, bias, a, b, scale, dy


def _check(case_id, M, K, N, ranks, dropout_p, dtype, adapter_dtype, has_bias, row_ids, device):
    """Every buffer the launchers allocate (outputs, split partials, dS) starts as NaN: an output element never
    written, or a masked-off cell read as data, shows as a non-finite or wrong result."""
    with poisoned_empty():
        _check_poisoned(case_id, M, K, N, ranks, dropout_p, dtype, adapter_dtype, has_bias, row_ids, device)


def _check_poisoned(case_id, M, K, N, ranks, dropout_p, dtype, adapter_dtype, has_bias, row_ids, device):
    gen = torch.Generator().manual_seed(zlib.crc32(case_id.encode()))
    x, w, bias, a, b, scale, dy = _inputs(M, K, N, ranks, dtype, adapter_dtype, has_bias, gen)
    rank_ptr = _rank_ptr(ranks)
    seed = torch.tensor([SEED], dtype=torch.int64)
    on = lambda *ts: [move(v, device) for v in ts]  # noqa: E731
    xd, wd, biasd, ad, bd, scaled, dyd, seedd = on(x, w, bias, a, b, scale, dy, seed)
    f64 = lambda v: None if v is None else v.detach().to(torch.float64)  # noqa: E731
    atol = ATOL[dtype]
    ty, tt, tdx, tda, tdb = _torch_same_dtype(x, w, bias, a, b, scale, rank_ptr, dropout_p, seed, dy, row_ids)

    if row_ids is None:
        R = rank_ptr[-1]
        y_out = torch.full((M, N), float("nan"), dtype=dtype, device=device)
        t_out = torch.full((M, R), float("nan"), dtype=torch.float32, device=device)
        y, t = dense.lora_fwd(
            xd, wd, biasd, ad, bd, scaled, rank_ptr, dropout_p, seedd, path="small_m", y_out=y_out, t_out=t_out
        )
        y64, t64 = reference.lora_fwd(
            f64(x), f64(w), f64(bias), f64(a), f64(b), scale.double(), rank_ptr, dropout_p, seed
        )
        grads = dense.lora_bwd(
            dyd,
            xd,
            wd,
            ad,
            bd,
            scaled,
            move(t64.float(), device),
            rank_ptr,
            dropout_p,
            seedd,
            True,
            dx_out=torch.full((M, K), float("nan"), dtype=dtype, device=device),
            da_out=torch.full((R, K), float("nan"), dtype=adapter_dtype, device=device),
            db_out=torch.full((N, R), float("nan"), dtype=adapter_dtype, device=device),
        )
        ref_grads = reference.lora_bwd(
            f64(dy), f64(x), f64(w), f64(a), f64(b), scale.double(), t64, rank_ptr, dropout_p, seed, True
        )
    else:
        idsd = move(row_ids, device)
        y, t = rows.lora_rows_fwd(xd, wd, biasd, ad, bd, scaled, rank_ptr, idsd, dropout_p, seedd)
        y64, t64 = reference.lora_rows_fwd(
            f64(x), f64(w), f64(bias), f64(a), f64(b), scale, rank_ptr, row_ids, dropout_p, seed
        )
        grads = rows.lora_rows_bwd(
            dyd, xd, wd, ad, bd, scaled, move(t64.float(), device), rank_ptr, idsd, dropout_p, seedd, True
        )
        ref_grads = reference.lora_rows_bwd(
            f64(dy), f64(x), f64(w), f64(a), f64(b), scale, t64, rank_ptr, row_ids, dropout_p, seed, True
        )
    assert_close_vs_reference(cpu(t), t64, tt, atol=atol, name="t")
    assert_close_vs_reference(cpu(y), y64, ty, atol=atol, name="y")
    for name, ours, ref, same in zip(("dx", "dA", "dB"), grads, ref_grads, (tdx, tda, tdb)):
        assert_close_vs_reference(cpu(ours), ref, same, atol=atol, name=name)


F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# (M, K, N, ranks, dropout, dtype, adapter dtype, bias, decode rank mode)
DENSE_CASES = [
    (6, 520, 40, [3, 5], [0.25, 0.0], F16, F16, True, IN_PASS),  # 9 splits of K, two segments
    (64, 98, 33, [32], [0.3], F16, F16, False, IN_PASS),  # 64-row tile, 32-rank tile, per-element mask
    (1, 257, 64, [1], [0.0], F16, F32, True, IN_PASS),  # one token, fp32 adapters over fp16
    (9, 150, 70, [40], [0.1], F16, F16, False, DENSE_T),  # wide rank: split shrink first
    (17, 200, 40, [33, 1], [0.0, 0.5], F32, F32, True, DENSE_T),
    (6, 520, 40, [3, 5], [0.25, 0.0], BF16, BF16, True, IN_PASS),
    (9, 150, 70, [40], [0.1], BF16, BF16, False, DENSE_T),
]


def _dense_id(c):
    M, K, N, ranks, ps, dt, adt, bias, mode = c
    return f"M{M}K{K}N{N}-r{'_'.join(map(str, ranks))}-p{'_'.join(map(str, ps))}-{str(dt)[6:]}-{str(adt)[6:]}-m{mode}"


def _ids(M, pattern, n):
    if pattern == "distinct":
        return torch.arange(M) % n
    if pattern == "with_none":  # -1 and an out-of-range id act as no adapter
        ids = (torch.arange(M) * 7) % (n + 1) - 1
        ids[M // 2] = n + 3
        return ids
    return torch.zeros(M, dtype=torch.int64)


# (M, K, N, ranks, dropout, dtype, adapter dtype, bias, row pattern)
ROW_CASES = [
    (16, 72, 40, [1, 5] * 8, [0.0, 0.3] * 8, F16, F16, True, "distinct"),  # 16 adapters in one tile
    (16, 48, 40, [16] * 16, [0.0] * 16, F32, F32, False, "with_none"),  # 256 stacked ranks: 64-chunks
    (130, 40, 36, [5, 64, 3, 9], [0.2, 0.0, 0.0, 0.4], F16, F16, True, "with_none"),  # fused GEMM, mixed tiles
    (3, 260, 20, [7], [0.5], F16, F32, False, "distinct"),  # K split, fp32 adapters
    (16, 72, 40, [1, 5] * 8, [0.0, 0.3] * 8, BF16, BF16, True, "distinct"),
]


def _row_id(c):
    M, K, N, ranks, ps, dt, adt, bias, pattern = c
    return f"M{M}K{K}N{N}-n{len(ranks)}-r{max(ranks)}-{str(dt)[6:]}-{str(adt)[6:]}-{pattern}"


def pytest_generate_tests(metafunc):
    if "dense_case" in metafunc.fixturenames:
        metafunc.parametrize(
            "dense_case",
            device_params(
                metafunc.config,
                DENSE_CASES,
                [_dense_id(c) for c in DENSE_CASES],
                [True] * len(DENSE_CASES),
                lambda c: c[5],
            ),
        )
    if "row_case" in metafunc.fixturenames:
        metafunc.parametrize(
            "row_case",
            device_params(
                metafunc.config, ROW_CASES, [_row_id(c) for c in ROW_CASES], [True] * len(ROW_CASES), lambda c: c[5]
            ),
        )


def test_decode_modes_match_reference(dense_case, device):
    M, K, N, ranks, dropout_p, dtype, adapter_dtype, has_bias, mode = dense_case
    shape = launch_plan.Shape(M, N, K, ranks, "float16", dropout_p)
    planned = launch_plan.plan("forward", shape, path="small_m")
    assert planned[-1].kernel == "decode_kernel" and planned[-1].config["mode"] == mode
    _check(_dense_id(dense_case), M, K, N, ranks, dropout_p, dtype, adapter_dtype, has_bias, None, device)


def test_mixed_adapter_tiles_match_reference(row_case, device):
    M, K, N, ranks, dropout_p, dtype, adapter_dtype, has_bias, pattern = row_case
    ids = _ids(M, pattern, len(ranks))
    if M <= 64:
        shape = launch_plan.Shape(M, N, K, ranks, "float16", dropout_p, row_ids=ids.tolist())
        assert launch_plan.plan("rows_forward", shape)[-1].config["mode"] == ROWS_T
    _check(_row_id(row_case), M, K, N, ranks, dropout_p, dtype, adapter_dtype, has_bias, ids, device)


def test_decode_without_adapters_and_empty_batch(device):
    gen = torch.Generator().manual_seed(3)
    x, w, bias, a, b, scale, _ = _inputs(4, 300, 70, [0, 0], F16, F16, True, gen)
    on = lambda *ts: [move(v, device) for v in ts]  # noqa: E731
    xd, wd, biasd, ad, bd, scaled = on(x, w, bias, a, b, scale)
    seed = move(torch.tensor([1]), device)
    y, t = dense.lora_fwd(xd, wd, biasd, ad, bd, scaled, [0, 0, 0], [0.0, 0.2], seed, path="small_m")
    assert t.shape == (4, 0)
    y64 = torch.nn.functional.linear(x.double(), w.double(), bias.double())
    assert_close_vs_reference(cpu(y), y64, torch.nn.functional.linear(x, w, bias), atol=ATOL[F16], name="y")
    y0, t0 = rows.lora_rows_fwd(
        xd[:0], wd, biasd, ad, bd, scaled, [0, 0, 0], move(torch.zeros(0, dtype=torch.long), device), [0.0, 0.2], seed
    )
    assert y0.shape == (0, 70) and t0.shape == (0, 1)
