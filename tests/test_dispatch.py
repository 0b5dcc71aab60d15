"""The CUDA dispatch (fused_lora/ops/cuda_dispatch.py) and its cuBLAS composition (fused_lora/ops/cublas_backend.py).

Both paths of every decision (forward, backward, mixed forward, mixed backward) run here on CPU tensors: the
composition with plain torch ops, the fused path with the Triton kernels under the interpreter (bf16 skipped
there). Each is judged against the float64 reference relative to PyTorch's own same-dtype error
(tests/checks.py). The decision rules are tested without a GPU by calling the decision with a CUDA device's
name and a tuned file named through FUSED_LORA_TUNED_GPU / FUSED_LORA_TUNED_DIR.
"""

import json

import pytest
import torch

from fused_lora import reference as ref
from fused_lora.ops import cublas_backend, cuda_dispatch
from tests.checks import assert_close_vs_reference

ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
SEED = torch.tensor([0x1234_5678_9ABC_DEF], dtype=torch.int64)


def _rank_ptr(ranks):
    ptr = [0]
    for r in ranks:
        ptr.append(ptr[-1] + r)
    return ptr


def _inputs(M, K, N, ranks, dtype, adapter_dtype, bias, layout, seed):
    gen = torch.Generator().manual_seed(seed)
    R = sum(ranks)
    if layout == "row_stride":
        x = torch.randn(M, K + 5, generator=gen)[:, :K]
    elif layout == "col_stride":
        x = torch.randn(M, 2 * K, generator=gen)[:, ::2]
    else:
        x = torch.randn(M, K, generator=gen)
    x = x.to(dtype)
    w = (torch.randn(N, K, generator=gen) / K**0.5).to(dtype)
    b = torch.randn(N, generator=gen).to(dtype) if bias else None
    a = (torch.randn(R, K, generator=gen) / K**0.5).to(adapter_dtype)
    bb = (torch.randn(N, R, generator=gen) * 0.5).to(adapter_dtype)
    scale = (torch.rand(R, generator=gen) + 0.5).to(torch.float32)
    dy = torch.randn(M, N, generator=gen).to(dtype)
    row_ids = torch.randint(-1, len(ranks) + 1, (M,), generator=gen)  # includes -1 and an out-of-range id
    return x, w, b, a, bb, scale, dy, row_ids


def _drop(x, p, salt):
    if p <= 0:
        return x
    keep = ref.dropout_keep(SEED, x.shape[0], x.shape[1], p, salt)
    return x * keep.to(x.dtype) * (torch.tensor(1.0) / (1.0 - torch.tensor(p, dtype=torch.float32))).to(x.dtype)


def _torch_same_dtype(x, w, b, a, bb, scale, rank_ptr, dropout_p, dy, row_ids=None):
    """What plain PyTorch computes at the inputs' dtypes (PEFT-like): the error bar of every comparison."""
    dt, adt = x.dtype, a.dtype
    y = torch.nn.functional.linear(x, w, b)
    dx = dy @ w
    da, db = torch.zeros_like(a), torch.zeros_like(bb)
    t_parts = []
    for i in range(len(rank_ptr) - 1):
        lo, hi = rank_ptr[i], rank_ptr[i + 1]
        sel = torch.ones(x.shape[0], 1, dtype=adt) if row_ids is None else (row_ids == i).to(adt)[:, None]
        ti = (_drop(x, dropout_p[i], i).to(adt) @ a[lo:hi].T) * scale[lo:hi].to(adt) * sel
        t_parts.append(ti)
        y = y + (ti @ bb[:, lo:hi].T).to(dt)
        db[:, lo:hi] = (dy.to(adt) * sel).T @ ti
        ds = (dy.to(adt) @ bb[:, lo:hi]) * scale[lo:hi].to(adt) * sel
        da[lo:hi] = ds.T @ _drop(x, dropout_p[i], i).to(adt)
        dx = dx + _drop((ds @ a[lo:hi]).to(dt), dropout_p[i], i)
    if row_ids is None:
        t = torch.cat(t_parts, 1) if t_parts else torch.zeros(x.shape[0], 0, dtype=adt)
    else:
        r_max = max([1] + [rank_ptr[i + 1] - rank_ptr[i] for i in range(len(rank_ptr) - 1)])
        t = torch.zeros(x.shape[0], r_max, dtype=adt)
        for ti in t_parts:
            t[:, : ti.shape[1]] += ti
    return y, t, dx, da, db


def _f64(t):
    return None if t is None else t.detach().to(torch.float64)


# (M, K, N, ranks, dropout_p, dtype, adapter dtype, bias, x layout)
CASES = [
    (5, 37, 19, [7], [0.0], torch.float32, torch.float32, True, "contiguous"),
    (70, 40, 33, [1, 7, 3], [0.0, 0.3, 0.5], torch.float32, torch.float32, True, "row_stride"),
    (9, 24, 17, [8, 0, 8], [0.0, 0.0, 0.0], torch.float16, torch.float16, False, "contiguous"),
    (33, 64, 48, [20], [0.1], torch.float16, torch.float32, True, "row_stride"),
    (3, 16, 20, [4, 2], [0.6, 0.0], torch.float32, torch.float32, False, "col_stride"),
    (40, 130, 65, [16], [0.0], torch.bfloat16, torch.bfloat16, True, "contiguous"),
    (17, 48, 32, [1], [0.0], torch.bfloat16, torch.float32, False, "row_stride"),
    (0, 16, 8, [2], [0.2], torch.float32, torch.float32, True, "contiguous"),
]


def _case_id(c):
    M, K, N, ranks, ps, dt, adt, bias, layout = c
    return (
        f"M{M}K{K}N{N}-r{'_'.join(map(str, ranks))}-p{'_'.join(map(str, ps))}-{str(dt)[6:]}-{str(adt)[6:]}-"
        f"{'bias' if bias else 'nobias'}-{layout}"
    )


def _skip_interpreter_bf16(path, dtype, adapter_dtype):
    if path == "fused" and torch.bfloat16 in (dtype, adapter_dtype):
        pytest.skip("the Triton interpreter corrupts bfloat16 silently (triton-lang/triton#11584)")


@pytest.fixture
def force(monkeypatch):
    def set_path(path):
        monkeypatch.setenv("FUSED_LORA_DISPATCH", path)
        cuda_dispatch.clear_cache()

    yield set_path
    cuda_dispatch.clear_cache()


@pytest.mark.parametrize("path", ["cublas", "fused"])
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_dense_forward_and_backward_on_both_paths(case, path, force):
    M, K, N, ranks, dropout_p, dtype, adapter_dtype, bias, layout = case
    _skip_interpreter_bf16(path, dtype, adapter_dtype)
    force(path)
    rank_ptr = _rank_ptr(ranks)
    x, w, b, a, bb, scale, dy, _ = _inputs(M, K, N, ranks, dtype, adapter_dtype, bias, layout, M * 7 + K)
    atol = ATOL[dtype]
    y, t = cuda_dispatch.lora_fwd(x, w, b, a, bb, scale, rank_ptr, dropout_p, SEED)
    y64, t64 = ref.lora_fwd(_f64(x), _f64(w), _f64(b), _f64(a), _f64(bb), scale.double(), rank_ptr, dropout_p, SEED)
    y_t, t_t, dx_t, da_t, db_t = _torch_same_dtype(x, w, b, a, bb, scale, rank_ptr, dropout_p, dy)
    assert y.dtype == dtype and t.dtype == torch.float32 and t.shape == (M, sum(ranks))
    assert_close_vs_reference(t, t64, t_t, atol=atol, name="t")
    assert_close_vs_reference(y, y64, y_t, atol=atol, name="y")

    t_in = t64.to(torch.float32)
    for need_dx in (True, False):
        dx, da, db = cuda_dispatch.lora_bwd(dy, x, w, a, bb, scale, t_in, rank_ptr, dropout_p, SEED, need_dx)
        dx64, da64, db64 = ref.lora_bwd(
            _f64(dy), _f64(x), _f64(w), _f64(a), _f64(bb), scale.double(), t64, rank_ptr, dropout_p, SEED, True
        )
        assert da.dtype == adapter_dtype and db.dtype == adapter_dtype
        assert_close_vs_reference(db, db64, db_t, atol=atol, name="dB")
        assert_close_vs_reference(da, da64, da_t, atol=atol, name="dA")
        if need_dx:
            assert dx.dtype == dtype
            assert_close_vs_reference(dx, dx64, dx_t, atol=atol, name="dX")
        else:
            assert dx is None


ROW_CASES = [
    (23, 40, 33, [3, 8], [0.0, 0.0], torch.float32, torch.float32, True, "row_stride"),
    (12, 24, 20, [1, 4, 2], [0.0, 0.25, 0.0], torch.float16, torch.float16, False, "contiguous"),
    (9, 32, 16, [16, 5], [0.0, 0.0], torch.bfloat16, torch.float32, True, "contiguous"),
    (0, 16, 8, [2, 2], [0.0, 0.0], torch.float32, torch.float32, False, "contiguous"),
    (10, 16, 12, [3, 0, 2], [0.0, 0.0, 0.5], torch.float32, torch.float32, True, "col_stride"),
]


@pytest.mark.parametrize("path", ["cublas", "fused"])
@pytest.mark.parametrize("case", ROW_CASES, ids=[_case_id(c) for c in ROW_CASES])
def test_mixed_batch_forward_and_backward_on_both_paths(case, path, force):
    M, K, N, ranks, dropout_p, dtype, adapter_dtype, bias, layout = case
    _skip_interpreter_bf16(path, dtype, adapter_dtype)
    force(path)
    rank_ptr = _rank_ptr(ranks)
    x, w, b, a, bb, scale, dy, row_ids = _inputs(M, K, N, ranks, dtype, adapter_dtype, bias, layout, M * 11 + N)
    atol = ATOL[dtype]
    y, t = cuda_dispatch.lora_rows_fwd(x, w, b, a, bb, scale, rank_ptr, row_ids, dropout_p, SEED)
    y64, t64 = ref.lora_rows_fwd(
        _f64(x), _f64(w), _f64(b), _f64(a), _f64(bb), scale.double(), rank_ptr, row_ids, dropout_p, SEED
    )
    y_t, t_t, dx_t, da_t, db_t = _torch_same_dtype(x, w, b, a, bb, scale, rank_ptr, dropout_p, dy, row_ids)
    assert t.shape == t64.shape and t.dtype == torch.float32
    assert_close_vs_reference(t, t64, t_t, atol=atol, name="t")
    assert_close_vs_reference(y, y64, y_t, atol=atol, name="y")
    t_in = t64.to(torch.float32)
    dx, da, db = cuda_dispatch.lora_rows_bwd(dy, x, w, a, bb, scale, t_in, rank_ptr, row_ids, dropout_p, SEED, True)
    dx64, da64, db64 = ref.lora_rows_bwd(
        _f64(dy), _f64(x), _f64(w), _f64(a), _f64(bb), scale.double(), t64, rank_ptr, row_ids, dropout_p, SEED, True
    )
    assert_close_vs_reference(db, db64, db_t, atol=atol, name="dB")
    assert_close_vs_reference(da, da64, da_t, atol=atol, name="dA")
    assert_close_vs_reference(dx, dx64, dx_t, atol=atol, name="dX")


def test_composition_float64_matches_reference_exactly_enough():
    x, w, b, a, bb, scale, dy, row_ids = _inputs(6, 10, 7, [3, 2], torch.float64, torch.float64, True, "contiguous", 3)
    rank_ptr = [0, 3, 5]
    y, t = cublas_backend.lora_fwd(x, w, b, a, bb, scale, rank_ptr, [0.0, 0.4], SEED)
    y64, t64 = ref.lora_fwd(x, w, b, a, bb, scale, rank_ptr, [0.0, 0.4], SEED)
    assert t.dtype == torch.float64
    torch.testing.assert_close(y, y64, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(t, t64, rtol=1e-12, atol=1e-12)


def test_composition_adds_the_rank_term_in_place_into_the_base_output(monkeypatch):
    """The rank term is accumulated into y with beta = 1 (addmm_), not added out of place."""
    calls = []
    real = torch.Tensor.addmm_

    def spy(self, *args, **kwargs):
        calls.append(self.data_ptr())
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "addmm_", spy)
    x, w, b, a, bb, scale, _, _ = _inputs(4, 8, 6, [2], torch.float32, torch.float32, False, "contiguous", 5)
    y, _ = cublas_backend.lora_fwd(x, w, None, a, bb, scale, [0, 2], [0.0], SEED)
    assert calls == [y.data_ptr()]


# ---- the decision rules -------------------------------------------------------------------------------------------
def test_forced_path_and_bad_value(force):
    force("cublas")
    d = cuda_dispatch.decide("forward", "cpu", torch.float16, 512, 4096, 4096, 16)
    assert (d.path, d.source) == ("cublas", "forced")
    force("sideways")
    with pytest.raises(ValueError, match="FUSED_LORA_DISPATCH='sideways'"):
        cuda_dispatch.decide("forward", "cpu", torch.float16, 512, 4096, 4096, 16)


def test_cpu_tensors_take_the_triton_kernels(force):
    force("auto")
    d = cuda_dispatch.decide("forward", "cpu", torch.float16, 8192, 4096, 4096, 16)
    assert (d.path, d.source) == ("fused", "not cuda")


def _model(op, M, N=4096, K=4096, r=16, n=1, core="tutorial", device_name="NVIDIA H100 80GB HBM3"):
    cuda_dispatch.clear_cache()
    return cuda_dispatch._decide(op, "cuda", device_name, torch.bfloat16, M, N, K, r, False, n, False, core, None, None)


def test_model_keeps_memory_bound_decode_fused():
    for M in (1, 16, 64):
        d = _model("forward", M)
        assert (d.path, d.source) == ("fused", "model"), d.reason
        assert "MODEL on H100" in d.reason


def test_model_gives_compute_bound_prefill_to_cublas_with_the_tutorial_core():
    # the tutorial core at 0.75-0.85x cuBLAS cannot win a compute-bound GEMM: never slower than cuBLAS
    for M in (2048, 8192):
        assert _model("forward", M).path == "cublas"


def test_margin_inside_the_uncertainty_goes_to_cublas():
    from fused_lora.perf.cost_model import compare
    from fused_lora.perf.plans import Shape

    shape = Shape("forward", 8192, 4096, 4096, 16)
    cmp = compare(shape, "H100", core="tma")
    assert cmp.fused_s < cmp.cublas_s  # the central estimate favours the Hopper core...
    assert cmp.fused_worst_s >= cmp.cublas_worst_s  # ...but not at the cuBLAS-favouring ends of the ranges
    assert cmp.choice == "cublas" and "uncertainty" in cmp.why
    assert _model("forward", 8192, core="tma").path == "cublas"


@pytest.mark.parametrize("op", ["forward", "backward", "mixed_forward", "mixed_backward"])
def test_model_picks_fused_only_when_it_wins_at_the_pessimistic_end(op):
    from fused_lora.perf.cost_model import compare
    from fused_lora.perf.plans import Shape

    for M in (1, 16, 64, 65, 512, 2048, 8192):
        for N, K in ((4096, 4096), (1024, 4096), (14336, 4096)):
            cmp = compare(Shape(op, M, K, N, 16, n_adapters=4 if op.startswith("mixed") else 1), "H100")
            assert (cmp.choice == "fused") == (cmp.fused_worst_s < cmp.cublas_worst_s), (op, M, N, K)


def test_tuned_measurement_overrides_the_model(monkeypatch, tmp_path):
    key = cuda_dispatch.shape_class("forward", torch.bfloat16, 16, 4096, 4096, 16, False, 1, False)
    assert key == "forward:bfloat16:M<=16:N4096:K4096:r<=16:p0:a1:ad16"
    data = {"schema": 1, "gpu": "Test GPU", "meta": {}, "kernels": {"dispatch": {key: {"config": {"path": "cublas"}}}}}
    (tmp_path / "test-gpu.json").write_text(json.dumps(data))
    monkeypatch.setenv("FUSED_LORA_TUNED_GPU", "Test GPU")
    monkeypatch.setenv("FUSED_LORA_TUNED_DIR", str(tmp_path))
    from fused_lora.kernels import tuned

    tuned.clear_cache()
    try:
        assert cuda_dispatch._tuned_path("cpu", key) == "cublas"
        assert cuda_dispatch._tuned_path("cpu", key.replace("M<=16", "M<=64")) is None
        cuda_dispatch.clear_cache()
        d = cuda_dispatch._decide(
            "forward",
            "cuda",
            "Test GPU",
            torch.bfloat16,
            16,
            4096,
            4096,
            16,
            False,
            1,
            False,
            "tutorial",
            None,
            "cublas",
        )
        assert (d.path, d.source) == ("cublas", "tuned") and "Test GPU" in d.reason
    finally:
        tuned.clear_cache()
        cuda_dispatch.clear_cache()


def test_decisions_are_cached():
    cuda_dispatch.clear_cache()
    _model("forward", 512)
    before = cuda_dispatch._decide.cache_info().hits
    cuda_dispatch._decide(
        "forward",
        "cuda",
        "NVIDIA H100 80GB HBM3",
        torch.bfloat16,
        512,
        4096,
        4096,
        16,
        False,
        1,
        False,
        "tutorial",
        None,
        None,
    )
    assert cuda_dispatch._decide.cache_info().hits == before + 1


def test_tune_space_measures_the_decision_under_the_key_decide_reads():
    cases = cuda_dispatch.tune_space()
    for case in cases:
        assert case.kernel == cuda_dispatch.TUNED_KERNEL
        assert case.default == {"path": "cublas"} and list(case.candidates) == [{"path": "fused"}]
    ops = {case.shape_class.split(":")[0] for case in cases}
    assert ops == {"forward", "backward", "mixed_forward"}
    for op in ops:  # a tiny dry run of each op on the CPU: both paths agree with the float64 result
        case = next(c for c in cases if c.shape_class.startswith(op + ":"))
        run = case.make(torch.device("cpu"), True)
        for config in (case.default, case.candidates[0]):
            err = (run.launch(config).double() - run.reference).abs().max().item()
            assert err < run.atol, (case.shape_class, config, err)


def test_model_decides_per_power_of_two_bucket_of_tokens():
    assert [cuda_dispatch.model_tokens(M) for M in (0, 1, 2, 3, 64, 65, 2048, 2049)] == [
        1,
        1,
        2,
        4,
        64,
        128,
        2048,
        4096,
    ]
