"""The skinny kernels of the C++ backend (csrc/skinny.h) on their own, through the extension's test hooks, on every
ISA level: every tile shape and tail (rows 1..7 and past a task's 48, columns off every vector and panel width,
reductions shorter and longer than a row block), every element type, strided and transposed coefficients, against
float64; operands whose rows are followed by NaN show that nothing past a row's last element is read.
"""

from __future__ import annotations

import pytest
import torch
from test_cpp_backend import cb

_C = cb._C
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ROWS = (1, 2, 3, 4, 5, 7, 16, 49)
SHAPES = ((1, 1), (5, 7), (23, 37), (24, 64), (50, 130), (97, 9), (70, 300))  # (N, K)


@pytest.fixture(autouse=True, params=cb.isa_paths())
def isa_level(request):
    with cb.use_isa(request.param) as level:
        yield level


def _padded(t: torch.Tensor) -> torch.Tensor:
    """t with NaN after every row (row stride = columns + 3)."""
    wide = torch.full((t.shape[0], t.shape[1] + 3), float("nan"), dtype=t.dtype)
    wide[:, : t.shape[1]] = t
    return wide[:, : t.shape[1]]


def _check(out, ref64, out_dtype, name):
    assert out.dtype == out_dtype and out.shape == ref64.shape, name
    assert torch.isfinite(out).all(), f"{name}: non-finite values (a read past a row's end?)"
    # fp32 accumulation of up to a few hundred terms, then at most one rounding into out_dtype
    eps = {torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[out_dtype]
    err = (out.double() - ref64).abs().max().item() if out.numel() else 0.0
    assert err <= eps * (1.0 + ref64.abs().max().item()), f"{name}: max error {err:.3e}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", ROWS)
def test_skinny_nt(dtype, M):
    torch.manual_seed(M)
    for N, K in SHAPES:
        x, w, cs = _padded(torch.randn(M, K)), _padded(torch.randn(N, K).to(dtype)), torch.rand(N) + 0.5
        _check(_C.skinny_nt(x, w, cs), (x.double() @ w.double().T) * cs.double(), torch.float32, f"nt {N}x{K}")
        e, E = _padded(torch.randn(M, 5)), _padded(torch.randn(N, 5).to(dtype))
        bias, base = torch.randn(N).to(dtype), _padded(torch.randn(M, N).to(dtype))
        for out_dtype in (torch.float32, dtype):
            want = base.double() + x.double() @ w.double().T + e.double() @ E.double().T + bias.double()
            _check(_C.skinny_nt_fused(x, w, e, E, bias, base, out_dtype), want, out_dtype, f"fused {N}x{K}")
            want = base.double() + e.double() @ E.double().T  # the epilogue form: no x W^T, no bias
            _check(_C.skinny_nt_fused(x, None, e, E, None, base, out_dtype), want, out_dtype, f"epilogue {N}x{K}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", ROWS)
def test_skinny_nn(dtype, M):
    torch.manual_seed(100 + M)
    for N, K in SHAPES + ((150, 64),):  # 150: more rows of w than one block
        g, w = _padded(torch.randn(M, N)), _padded(torch.randn(N, K).to(dtype))
        e = torch.randn(3, M).T  # column-strided coefficients
        E, base = _padded(torch.randn(3, K).to(dtype)), _padded(torch.randn(M, K).to(dtype))
        cs = torch.rand(K) + 0.5
        for out_dtype in (torch.float32, dtype):
            want = base.double() + g.double() @ w.double() + e.double() @ E.double()
            _check(_C.skinny_nn(g, w, None, e, E, base, out_dtype), want, out_dtype, f"nn {N}x{K}")
            want = cs.double() * (g.double() @ w.double())
            _check(_C.skinny_nn(g, w, cs, None, None, None, out_dtype), want, out_dtype, f"colscale {N}x{K}")
            want = base.double() + e.double() @ E.double()  # no w term
            _check(_C.skinny_nn(g[:, :0], None, None, e, E, base, out_dtype), want, out_dtype, f"E only {N}x{K}")
        gt = torch.randn(N, M).T  # transposed coefficients, as dB = dy^T t reads dy
        _check(_C.skinny_nn(gt, w), gt.double() @ w.double(), torch.float32, f"transposed g {N}x{K}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_transpose_to_f32(dtype):
    for N, R in ((1, 1), (7, 3), (8, 8), (29, 16), (64, 5), (130, 17)):
        src = _padded(torch.randn(N, R).to(dtype))
        out = _C.transpose_to_f32(src)
        assert out.dtype == torch.float32 and torch.equal(out, src.float().T)


def test_avx2_tiles_run_from_the_avx2_level_up(isa_level):
    x, w = torch.randn(5, 40), torch.randn(30, 40).bfloat16()
    with cb.trace_isa_kernels() as counts:
        _C.skinny_nt(x, w)
        _C.skinny_nn(torch.randn(5, 30), w)
        _C.transpose_to_f32(w)
    expected = "baseline" if isa_level == "baseline" else "avx2"
    assert counts["skinny"][expected] >= 3, counts["skinny"]
    assert sum(counts["skinny"].values()) == counts["skinny"][expected], counts["skinny"]


def test_one_row_long_reduction_split_over_threads():
    """One output row over >1M multiply-adds: w's rows are split into chunks summed by whichever thread takes them,
    then added in chunk order: right, and the same bits on every call however the threads were scheduled."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(3)
        for dtype in DTYPES:
            g, w = torch.randn(1, 1100), _padded(torch.randn(1100, 1001).to(dtype))
            e, E, base = torch.randn(1, 3), torch.randn(3, 1001).to(dtype), torch.randn(1, 1001).to(dtype)
            want = base.double() + g.double() @ w.double() + e.double() @ E.double()
            first = _C.skinny_nn(g, w, None, e, E, base, torch.float32)
            _check(first, want, torch.float32, f"split {dtype}")
            for _ in range(5):
                assert torch.equal(_C.skinny_nn(g, w, None, e, E, base, torch.float32), first)
            cs = torch.rand(1001) + 0.5
            _check(
                _C.skinny_nn(g, w, cs, None, None, None, dtype),
                cs.double() * (g.double() @ w.double()),
                dtype,
                f"split colscale {dtype}",
            )
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("M", [1, 2, 5])
def test_one_thread_reads_whole_rows_of_w(isa_level, M):
    """On one thread skinny_nn runs as one task per row block over every column: split into column ranges run one
    after another, w would be read as short pieces of every row, range after range, at about half the speed of
    whole rows (fp32 dx of one decode token: 7.7 ms against MKL's 4.1 ms on an AMD EPYC, 4096x4096)."""
    if isa_level == "baseline":
        pytest.skip("the task split is counted through the avx2 tiles' trace")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g, w = torch.randn(M, 1200), torch.randn(1200, 1000)  # > 1M multiply-adds: the parallel split applies
        with cb.trace_isa_kernels() as one_task:  # 64 columns: one column range whatever the split
            _C.skinny_nn(g, w[:, :64])
        with cb.trace_isa_kernels() as counts:
            out = _C.skinny_nn(g, w)
        _check(out, g.double() @ w.double(), torch.float32, f"one thread M={M}")
        assert counts["skinny"]["avx2"] == one_task["skinny"]["avx2"], (counts["skinny"], one_task["skinny"])
    finally:
        torch.set_num_threads(previous)
