"""Dense Triton launchers (kernels/dense.py) against the float64 reference, on --device (tests/devices.py).

CPU: the interpreter, fp32 and fp16 (bf16 skipped: the interpreter corrupts it). CUDA: compiled kernels, bf16
included, on the GPU-marked cases. Outputs are preallocated and poisoned with NaN so an element the kernels never
write fails the finiteness check. The reference and PyTorch's same-dtype result are computed on the CPU.
"""

import zlib

import pytest
import torch

pytest.importorskip("triton")

from fused_lora import reference  # noqa: E402
from fused_lora.kernels import dense  # noqa: E402
from tests.checks import assert_close_vs_reference  # noqa: E402
from tests.devices import cpu, device_params, move  # noqa: E402

SEED = 0x1234_5678_9ABC  # key words differ in both halves


def _rank_ptr(ranks):
    ptr = [0]
    for r in ranks:
        ptr.append(ptr[-1] + r)
    return ptr


def _dropped(x, seed, p, salt):
    """PEFT-style dropout in x's own dtype (the same-dtype torch baseline)."""
    if p <= 0.0:
        return x
    keep = reference.dropout_keep(seed, x.shape[0], x.shape[1], p, salt)
    inv_keep = (torch.tensor(1.0) / (1.0 - torch.tensor(p, dtype=torch.float32))).to(x.dtype)
    return x * keep.to(x.dtype) * inv_keep


def torch_fwd_same_dtype(x, w, bias, a, b, scale, rank_ptr, dropout_p, seed):
    """What PEFT computes: each op rounds to its inputs' dtype, the LoRA term in the adapter dtype."""
    y = torch.nn.functional.linear(x, w, bias)
    t = torch.empty(x.shape[0], a.shape[0], dtype=a.dtype)
    for i in range(len(rank_ptr) - 1):
        lo, hi = rank_ptr[i], rank_ptr[i + 1]
        t[:, lo:hi] = (_dropped(x, seed, dropout_p[i], i).to(a.dtype) @ a[lo:hi].T) * scale[lo:hi].to(a.dtype)
    return y + (t @ b.T).to(y.dtype), t


def torch_bwd_same_dtype(dy, x, w, a, b, scale, t, rank_ptr, dropout_p, seed):
    dya = dy.to(a.dtype)
    db = dya.T @ t.to(a.dtype)
    ds = (dya @ b) * scale.to(a.dtype)
    da = torch.empty_like(a)
    dx = dy @ w
    for i in range(len(rank_ptr) - 1):
        lo, hi = rank_ptr[i], rank_ptr[i + 1]
        da[lo:hi] = ds[:, lo:hi].T @ _dropped(x, seed, dropout_p[i], i).to(a.dtype)
        dx = dx + _dropped(ds[:, lo:hi] @ a[lo:hi], seed, dropout_p[i], i).to(dx.dtype)
    return dx, da, db


def _make(M, K, N, ranks, dtype, adapter_dtype, has_bias, x_layout, gen):
    rank_ptr = _rank_ptr(ranks)
    R = rank_ptr[-1]

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen) * scale

    if x_layout == "row_stride":  # rows of a wider buffer: stride(0) != K
        x = rnd(M, K + 5)[:, :K]
    elif x_layout == "col_stride":  # every other column: stride(1) == 2
        x = rnd(M, 2 * K)[:, ::2]
    else:
        x = rnd(M, K)
    x = x.to(dtype)
    w = rnd(N, K, scale=K**-0.5).to(dtype)
    bias = rnd(N).to(dtype) if has_bias else None
    a = rnd(R, K, scale=K**-0.5).to(adapter_dtype)
    b = rnd(N, R).to(adapter_dtype)
    scale = torch.rand(R, generator=gen) + 0.5
    return rank_ptr, x, w, bias, a, b, scale


def _f64(t):
    return None if t is None else t.detach().to(torch.float64)


# bf16 keeps 8 significant bits to fp16's 11: the same absolute slack, scaled by the ulp ratio
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}

# (M, K, N, ranks, dropout_p, dtype, adapter dtype, bias, fwd path, x layout)
CASES = [
    (5, 37, 19, [7], [0.0], torch.float32, torch.float32, True, "small_m", "contiguous"),
    (5, 37, 19, [7], [0.0], torch.float32, torch.float32, True, "large_m", "contiguous"),
    (5, 37, 19, [1], [0.25], torch.float16, torch.float16, False, "small_m", "row_stride"),
    (5, 37, 19, [1], [0.25], torch.float16, torch.float16, False, "large_m", "col_stride"),
    (70, 40, 33, [1, 7, 3], [0.0, 0.3, 0.5], torch.float32, torch.float32, True, None, "contiguous"),
    (70, 40, 33, [1, 7, 3], [0.0, 0.3, 0.5], torch.float16, torch.float16, True, "small_m", "row_stride"),
    (33, 64, 48, [20], [0.1], torch.float16, torch.float32, True, "large_m", "row_stride"),
    (9, 24, 17, [8, 0, 8, 8], [0.0, 0.0, 0.0, 0.0], torch.float16, torch.float16, False, None, "contiguous"),
    (3, 16, 20, [4, 2], [0.6, 0.0], torch.float32, torch.float32, False, "large_m", "col_stride"),
    # the swapped (y^T = W x^T) small-M kernel: several column slices of W, a K loop with a ragged last step,
    # both row-tile heights (M <= 16 and 16 < M <= 64), packed and per-element dropout masks, mixed dtypes
    (3, 300, 131, [5, 9], [0.0, 0.2], torch.float16, torch.float16, True, "small_m", "row_stride"),
    (23, 203, 70, [20], [0.15], torch.float32, torch.float32, False, "small_m", "col_stride"),
    (40, 130, 65, [16], [0.0], torch.float16, torch.float32, True, "small_m", "contiguous"),
    # bf16 (GPU only): both paths, dropout, fp32 adapters over bf16, and aligned shapes, where the compiler
    # specializes on multiples of 16 and vectorizes as it does for real model shapes
    (5, 37, 19, [7], [0.0], torch.bfloat16, torch.bfloat16, True, "small_m", "contiguous"),
    (70, 40, 33, [1, 7, 3], [0.0, 0.3, 0.5], torch.bfloat16, torch.bfloat16, True, None, "contiguous"),
    (33, 64, 48, [20], [0.1], torch.bfloat16, torch.float32, True, "large_m", "row_stride"),
    (3, 300, 131, [5, 9], [0.0, 0.2], torch.bfloat16, torch.bfloat16, True, "small_m", "row_stride"),
    (16, 512, 384, [16], [0.0], torch.bfloat16, torch.bfloat16, False, None, "contiguous"),
    (320, 512, 256, [16, 64], [0.0, 0.1], torch.bfloat16, torch.bfloat16, False, None, "contiguous"),
]
# the cases run with --device cuda: every path and mask variant once, in each dtype (a few dozen specializations)
GPU_CASES = {1, 3, 5, 10} | set(range(12, len(CASES)))


def _case_id(case):
    M, K, N, ranks, ps, dt, adt, bias, path, layout = case
    return (
        f"M{M}K{K}N{N}-r{'_'.join(map(str, ranks))}-p{'_'.join(str(p) for p in ps)}-"
        f"{str(dt)[6:]}-{str(adt)[6:]}-{'bias' if bias else 'nobias'}-{path}-{layout}"
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
                lambda c: c[5],
            ),
        )


def test_forward_and_backward_match_reference(case, device):
    M, K, N, ranks, dropout_p, dtype, adapter_dtype, has_bias, path, layout = case
    gen = torch.Generator().manual_seed(zlib.crc32(_case_id(case).encode()))
    rank_ptr, x, w, bias, a, b, scale = _make(M, K, N, ranks, dtype, adapter_dtype, has_bias, layout, gen)
    seed = torch.tensor([SEED], dtype=torch.int64)
    R = rank_ptr[-1]
    atol = ATOL[dtype]
    on = lambda *ts: [move(t, device) for t in ts]  # noqa: E731
    xd, wd, biasd, ad, bd, scaled, seedd = on(x, w, bias, a, b, scale, seed)

    y_out = torch.full((M, N), float("nan"), dtype=dtype, device=device)
    t_out = torch.full((M, R), float("nan"), dtype=torch.float32, device=device)
    y, t = dense.lora_fwd(
        xd, wd, biasd, ad, bd, scaled, rank_ptr, dropout_p, seedd, path=path, y_out=y_out, t_out=t_out
    )
    assert y.data_ptr() == y_out.data_ptr() and t.data_ptr() == t_out.data_ptr()
    y, t = cpu(y), cpu(t)
    y64, t64 = reference.lora_fwd(
        _f64(x), _f64(w), _f64(bias), _f64(a), _f64(b), scale.double(), rank_ptr, dropout_p, seed
    )
    y_torch, t_torch = torch_fwd_same_dtype(x, w, bias, a, b, scale, rank_ptr, dropout_p, seed)
    assert y.dtype == dtype and t.dtype == torch.float32
    assert_close_vs_reference(t, t64, t_torch, atol=atol, name="t")
    assert_close_vs_reference(y, y64, y_torch, atol=atol, name="y")

    dy = torch.randn(M, N, generator=gen).to(dtype)
    t_in = t64.to(torch.float32)  # the same t for every backend isolates the backward's own error
    dx_out = torch.full((M, K), float("nan"), dtype=dtype, device=device)
    da_out = torch.full((R, K), float("nan"), dtype=adapter_dtype, device=device)
    db_out = torch.full((N, R), float("nan"), dtype=adapter_dtype, device=device)
    dyd, t_ind = on(dy, t_in)
    dx, da, db = (
        cpu(g)
        for g in dense.lora_bwd(
            dyd,
            xd,
            wd,
            ad,
            bd,
            scaled,
            t_ind,
            rank_ptr,
            dropout_p,
            seedd,
            True,
            dx_out=dx_out,
            da_out=da_out,
            db_out=db_out,
        )
    )
    dx64, da64, db64 = reference.lora_bwd(
        _f64(dy), _f64(x), _f64(w), _f64(a), _f64(b), scale.double(), t64, rank_ptr, dropout_p, seed, True
    )
    dx_t, da_t, db_t = torch_bwd_same_dtype(dy, x, w, a, b, scale, t_in, rank_ptr, dropout_p, seed)
    assert dx.dtype == dtype and da.dtype == adapter_dtype and db.dtype == adapter_dtype
    assert_close_vs_reference(db, db64, db_t, atol=atol, name="dB")
    assert_close_vs_reference(da, da64, da_t, atol=atol, name="dA")
    assert_close_vs_reference(dx, dx64, dx_t, atol=atol, name="dX")


def test_backward_without_dx_and_dropout_masks_differ_per_adapter(device):
    gen = torch.Generator().manual_seed(7)
    rank_ptr, x, w, bias, a, b, scale = _make(
        12, 20, 10, [3, 3], torch.float32, torch.float32, False, "contiguous", gen
    )
    seed = torch.tensor([-3], dtype=torch.int64)  # negative seeds are read as uint64
    dropout_p = [0.5, 0.5]  # same p, different salt: the two adapters must see different masks
    on = lambda *ts: [move(t, device) for t in ts]  # noqa: E731
    xd, wd, ad, bd, scaled, seedd = on(x, w, a, b, scale, seed)
    y, t = dense.lora_fwd(xd, wd, None, ad, bd, scaled, rank_ptr, dropout_p, seedd)
    y64, t64 = reference.lora_fwd(_f64(x), _f64(w), None, _f64(a), _f64(b), scale.double(), rank_ptr, dropout_p, seed)
    torch.testing.assert_close(cpu(t).double(), t64, rtol=1e-5, atol=1e-5)
    dy = torch.randn(12, 10, generator=gen)
    dx, da, db = dense.lora_bwd(move(dy, device), xd, wd, ad, bd, scaled, t, rank_ptr, dropout_p, seedd, False)
    assert dx is None
    t, da, db = cpu(t), cpu(da), cpu(db)
    _, da64, db64 = reference.lora_bwd(
        _f64(dy), _f64(x), _f64(w), _f64(a), _f64(b), scale.double(), t64, rank_ptr, dropout_p, seed, False
    )
    torch.testing.assert_close(da.double(), da64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(db.double(), db64, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", ["small_m", "large_m"])
def test_empty_batch_launches_nothing_and_returns_shapes(path, device):
    made = _make(0, 8, 6, [2], torch.float32, torch.float32, True, "contiguous", torch.Generator().manual_seed(1))
    rank_ptr, (x, w, bias, a, b, scale) = made[0], [move(t, device) for t in made[1:]]
    seed = torch.tensor([1], dtype=torch.int64, device=device)
    y, t = dense.lora_fwd(x, w, bias, a, b, scale, rank_ptr, [0.1], seed, path=path)
    assert y.shape == (0, 6) and t.shape == (0, 2)
    dx, da, db = dense.lora_bwd(torch.empty(0, 6, device=device), x, w, a, b, scale, t, rank_ptr, [0.1], seed, True)
    assert dx.shape == (0, 8)
    assert torch.equal(cpu(da), torch.zeros(2, 8)) and torch.equal(cpu(db), torch.zeros(6, 2))


@pytest.mark.parametrize(
    "M,K,p,salt,seed",
    [
        (5, 37, 0.3, 0, 0),  # rows straddle Philox groups of 4
        (7, 40, 0.9, 3, -1),  # all-ones seed
        (3, 12, 0.05, 1, 2**40 + 17),  # key high word in use
        (4, 9, 1.0, 2, 5),  # p == 1 drops everything
        (2, 3, 0.0, 0, 5),  # p == 0 keeps everything, generates nothing
    ],
)
def test_dropout_keep_is_bit_identical_to_reference(M, K, p, salt, seed, device):
    seed_t = torch.tensor([seed], dtype=torch.int64)
    out = torch.full((M, K), 7, dtype=torch.uint8, device=device)  # poison: neither 0 nor 1
    keep = dense.dropout_keep(move(seed_t, device), M, K, p, salt, out=out if p > 0 else None)
    assert keep.dtype == torch.bool and keep.shape == (M, K) and keep.device.type == device.type
    if p > 0:
        assert int(out.max()) <= 1
    assert torch.equal(cpu(keep), reference.dropout_keep(seed_t, M, K, p, salt))


def test_preallocated_output_of_wrong_shape_is_rejected(device):
    made = _make(2, 8, 6, [2], torch.float32, torch.float32, False, "contiguous", torch.Generator().manual_seed(2))
    rank_ptr, (x, w, _, a, b, scale) = made[0], [move(t, device) for t in made[1:]]
    with pytest.raises(ValueError, match="preallocated"):
        dense.lora_fwd(
            x,
            w,
            None,
            a,
            b,
            scale,
            rank_ptr,
            [0.0],
            torch.tensor([0], device=device),
            y_out=torch.empty(2, 5, device=device),
        )
