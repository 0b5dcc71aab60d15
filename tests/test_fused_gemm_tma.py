"""The Hopper fused GEMM (kernels/fused_gemm_tma.py) under the Triton interpreter, which runs TMA descriptors.

Judged against the float64 result relative to PyTorch's own fp16 error (tests/checks.py), with NaN-poisoned
outputs. Small tiles and a machine of 2 "SMs" make the persistent loop visit several tiles per program and the
descriptors zero-fill ragged M, N and K edges. bf16 is skipped (the interpreter corrupts it); the codegen test
compiles the bf16 variants for sm_90 and requires their TMA loads.
"""

import pytest
import torch

pytest.importorskip("triton")

from fused_lora.kernels import config, fused_gemm, fused_gemm_tma  # noqa: E402
from fused_lora.kernels.philox import adapter_table, segment_table  # noqa: E402
from tests.checks import assert_close_vs_reference  # noqa: E402

SMALL = dict(
    core="tma",
    BLOCK_M=16,
    BLOCK_N=32,
    BLOCK_K=16,
    GROUP_M=2,
    num_warps=4,
    num_stages=2,
    CTAS_PER_SM=1,
    WARP_SPECIALIZE=False,
)
ATOL = 2e-3


@pytest.fixture
def two_sms(monkeypatch):
    monkeypatch.setattr(config, "sm_count", lambda device: 2)


def _forward_case(M, K, N, R, has_bias, gen):
    x = torch.randn(M, K, generator=gen).half()
    w = (torch.randn(N, K, generator=gen) / K**0.5).half()
    t = torch.randn(M, R, generator=gen)
    b = (torch.randn(N, R, generator=gen) * 0.3).half()
    bias = torch.randn(N, generator=gen).half() if has_bias else None
    return x, w, t, b, bias


def _table(R, device="cpu"):
    return segment_table([0, R], [0.0], 16 if R <= 16 else 64, device)


@pytest.mark.parametrize(
    "M, K, N, R, has_bias", [(37, 40, 45, 5, True), (64, 64, 64, 16, False), (5, 24, 70, 20, True)]
)
def test_forward_matches_reference_and_visits_every_tile(M, K, N, R, has_bias, two_sms, monkeypatch):
    gen = torch.Generator().manual_seed(M + K + N)
    x, w, t, b, bias = _forward_case(M, K, N, R, has_bias, gen)
    table, n_segs = _table(R)
    out = torch.full((M, N), float("nan"), dtype=torch.float16)
    launched = []
    real = fused_gemm_tma.fused_gemm_tma_kernel

    class Spy:
        def __getitem__(self, grid):
            launched.append(grid)
            return real[grid]

    monkeypatch.setattr(fused_gemm_tma, "fused_gemm_tma_kernel", Spy())
    fused_gemm_tma.launch_fused_gemm_tma(
        x,
        w,
        (w.stride(1), w.stride(0)),
        bias,
        t,
        b,
        (b.stride(0), b.stride(1)),
        R,
        table,
        n_segs,
        torch.zeros(1, dtype=torch.int64),
        out,
        16,
        False,
        "ieee",
        cfg=SMALL,
    )
    assert launched == [(2,)]  # persistent: two programs loop over all the tiles
    ref = x.double() @ w.double().T + t.double() @ b.double().T + (bias.double() if has_bias else 0)
    same = x @ w.T + (t.half() @ b.T) + (bias if has_bias else 0)
    assert_close_vs_reference(out, ref, same, atol=ATOL, name="y")


def test_dx_with_row_major_w_matches_reference(two_sms):
    gen = torch.Generator().manual_seed(3)
    M, N, K, R = 29, 48, 56, 7  # dX = dY [M, N] @ W [N, K] + dS [M, R] @ A [R, K]
    dy = torch.randn(M, N, generator=gen).half()
    w = (torch.randn(N, K, generator=gen) / N**0.5).half()
    ds = torch.randn(M, R, generator=gen)
    a = (torch.randn(R, K, generator=gen) * 0.3).half()
    table, n_segs = _table(R)
    out = torch.full((M, K), float("nan"), dtype=torch.float16)
    fused_gemm_tma.launch_fused_gemm_tma(
        dy,
        w,
        (w.stride(0), w.stride(1)),
        None,
        ds,
        a,
        (a.stride(1), a.stride(0)),
        R,
        table,
        n_segs,
        torch.zeros(1, dtype=torch.int64),
        out,
        16,
        False,
        "ieee",
        cfg=SMALL,
    )
    ref = dy.double() @ w.double() + ds.double() @ a.double()
    assert_close_vs_reference(out, ref, dy @ w + ds.half() @ a, atol=ATOL, name="dX")


def test_per_row_rank_term_takes_each_rows_adapter(two_sms):
    gen = torch.Generator().manual_seed(4)
    M, K, N, ranks = 33, 32, 40, [3, 8]
    R, r_max = sum(ranks), max(ranks)
    x, w, _, b, bias = _forward_case(M, K, N, R, True, gen)
    row_ids = torch.randint(-1, 3, (M,), generator=gen)  # -1 and the out-of-range 2 take no adapter
    t = torch.randn(M, r_max, generator=gen)
    table = adapter_table([0, 3, 11], [0.0, 0.0], "cpu")
    out = torch.full((M, N), float("nan"), dtype=torch.float16)
    fused_gemm_tma.launch_fused_gemm_tma(
        x,
        w,
        (w.stride(1), w.stride(0)),
        bias,
        t,
        b,
        (b.stride(0), b.stride(1)),
        R,
        table,
        0,
        torch.zeros(1, dtype=torch.int64),
        out,
        16,
        False,
        "ieee",
        row_ids=row_ids,
        n_adapters=2,
        cfg=SMALL,
    )
    ref = x.double() @ w.double().T + bias.double()
    same = x @ w.T + bias
    for m in range(M):
        a = int(row_ids[m])
        if 0 <= a < 2:
            lo, hi = (0, 3) if a == 0 else (3, 11)
            ref[m] += t[m, : hi - lo].double() @ b[:, lo:hi].double().T
            same[m] += t[m, : hi - lo].half() @ b[:, lo:hi].T
    assert_close_vs_reference(out, ref, same, atol=ATOL, name="y per row")


def test_matches_the_tutorial_core_on_the_same_inputs(two_sms):
    gen = torch.Generator().manual_seed(5)
    M, K, N, R = 70, 48, 36, 16
    x, w, t, b, bias = _forward_case(M, K, N, R, True, gen)
    table, n_segs = _table(R)
    args = (
        x,
        w,
        (w.stride(1), w.stride(0)),
        bias,
        t,
        b,
        (b.stride(0), b.stride(1)),
        R,
        table,
        n_segs,
        torch.zeros(1, dtype=torch.int64),
    )
    ours = torch.full((M, N), float("nan"), dtype=torch.float16)
    theirs = torch.full((M, N), float("nan"), dtype=torch.float16)
    fused_gemm_tma.launch_fused_gemm_tma(*args, ours, 16, False, "ieee", cfg=SMALL)
    fused_gemm.launch_fused_gemm(*args, theirs, 16, False, "ieee")
    torch.testing.assert_close(ours, theirs, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("why", ["unaligned K", "strided columns", "dropout", "fp32"])
def test_falls_back_to_the_tutorial_core_where_tma_does_not_apply(why, monkeypatch):
    gen = torch.Generator().manual_seed(6)
    K = 37 if why == "unaligned K" else 40
    x, w, t, b, _ = _forward_case(9, K, 20, 4, False, gen)
    if why == "strided columns":
        x = torch.randn(9, 2 * K, generator=gen).half()[:, ::2]
    if why == "fp32":
        x, w, b = x.float(), w.float(), b.float()
    calls = []
    monkeypatch.setattr(fused_gemm_tma, "launch_fused_gemm", lambda *a, **k: calls.append("tutorial"))
    table, n_segs = _table(4)
    out = torch.empty(9, 20, dtype=x.dtype)
    fused_gemm_tma.launch_fused_gemm_tma(
        x,
        w,
        (w.stride(1), w.stride(0)),
        None,
        t,
        b,
        (b.stride(0), b.stride(1)),
        4,
        table,
        n_segs,
        torch.zeros(1, dtype=torch.int64),
        out,
        16,
        why == "dropout",
        "ieee",
        cfg=SMALL,
    )
    assert calls == ["tutorial"]


def test_selection_needs_sm90_or_the_interpreter_and_a_reason(monkeypatch):
    monkeypatch.delenv(fused_gemm_tma.ENV, raising=False)
    assert fused_gemm_tma.selected_core("cpu", torch.float16, 4096) == "tutorial"  # neither tuned nor forced
    monkeypatch.setenv(fused_gemm_tma.ENV, "tma")
    assert fused_gemm_tma.selected_core("cpu", torch.float16, 4096) == "tma"
    assert fused_gemm_tma.selected_core("cpu", torch.float32, 4096) == "tutorial"  # descriptors: 16-bit only here
    monkeypatch.setenv(fused_gemm_tma.ENV, "hopper")
    with pytest.raises(ValueError, match="FUSED_LORA_GEMM_CORE='hopper'"):
        fused_gemm_tma.selected_core("cpu", torch.float16, 4096)


def test_selected_launcher_routes_by_core(monkeypatch):
    calls = []
    monkeypatch.setattr(fused_gemm_tma, "launch_fused_gemm_tma", lambda *a, **k: calls.append("tma"))
    monkeypatch.setattr(fused_gemm_tma, "launch_fused_gemm", lambda *a, **k: calls.append("tutorial"))
    x = torch.zeros(4, 8, dtype=torch.float16)
    for core in ("tma", "tutorial"):
        monkeypatch.setenv(fused_gemm_tma.ENV, core)
        fused_gemm_tma.launch_fused_gemm_selected(
            x, None, None, None, None, None, None, 0, None, 0, None, None, 16, False, "ieee"
        )
    assert calls == ["tma", "tutorial"]


def test_tuned_entry_selects_the_hopper_core_only_on_sm90(monkeypatch):
    monkeypatch.delenv(fused_gemm_tma.ENV, raising=False)
    monkeypatch.setattr(fused_gemm_tma, "tma_config", lambda M, device=None: dict(SMALL, core="tma"))
    monkeypatch.setattr(fused_gemm_tma, "_is_sm90", lambda device: True)
    assert fused_gemm_tma.selected_core("cpu", torch.bfloat16, 4096) == "tma"
    monkeypatch.setattr(fused_gemm_tma, "_is_sm90", lambda device: False)
    assert fused_gemm_tma.selected_core("cpu", torch.bfloat16, 4096) == "tutorial"


# ---- the codegen gate's TMA count (benchmarks/codegen.py) ----------------------------------------------------------
def _codegen_module():
    import importlib.util
    import os
    from pathlib import Path

    saved = os.environ.get("TRITON_INTERPRET")
    spec = importlib.util.spec_from_file_location(
        "codegen_tool", Path(__file__).resolve().parents[1] / "benchmarks" / "codegen.py"
    )
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)  # it drops TRITON_INTERPRET for its own compiles: put it back
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved
    return module


SASS = """
        /*0a30*/                   UTMALDG.2D [UR8], [UR14] ;
        /*0a40*/              @P0 UTMALDG.2D [UR16], [UR14] ;
        /*0b00*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT ;
        /*0b10*/                   UTMASTG.2D [UR4], [UR6] ;
"""


def test_codegen_counts_tma_loads_and_requires_them_where_asked():
    codegen = _codegen_module()
    assert codegen.count_tma_ops(SASS) == {"UTMALDG": 2, "UTMASTG": 1}
    row = {
        "arch": 90,
        "shared": 1024,
        "registers": 128,
        "spill_stores": 0,
        "spill_loads": 0,
        "uses_tensor_cores": True,
        "sm90_mma": "HGMMA",
        "mma": {"HGMMA": 1},
        "requires_tma": True,
        "tma_loads": 2,
    }
    assert codegen.gate(row) == []
    assert codegen.gate(dict(row, tma_loads=0)) == ["no UTMALDG (TMA loads)"]
    assert codegen.gate(dict(row, tma_loads=0, requires_tma=False)) == []


@pytest.mark.codegen
def test_hopper_variant_compiles_for_sm90_with_tma_loads_and_no_spills(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "cg.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [
            sys.executable,
            str(root / "benchmarks" / "codegen.py"),
            "--arch",
            "80",
            "90",
            "--only",
            "fused_gemm_tma[y,dense,BM=128",
            "--json",
            str(out),
            "--jobs",
            "1",
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    rows = json.loads(out.read_text())["results"]
    assert rows and {r["arch"] for r in rows} == {90}, proc.stdout[-2000:]  # sm_80 has no TMA: not compiled
    for r in rows:
        assert r["tma_loads"] > 0 and r["mma"].get("HGMMA", 0) > 0, r
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0 and not r["failures"], r


def test_tune_space_compares_the_hopper_core_with_the_tutorial_core():
    cases = fused_gemm_tma.tune_space()
    assert {c.shape_class for c in cases} == {"16bit:M>256", "16bit:M<=256"}
    for case in cases:
        assert case.kernel == fused_gemm_tma.TUNED_KERNEL and case.default["core"] == "tutorial"
        assert all(c["core"] == "tma" and set(c) == set(case.default) for c in case.candidates)
    run = cases[0].make(torch.device("cpu"), True)
    small = dict(cases[0].candidates[0], BLOCK_M=16, BLOCK_N=32, BLOCK_K=16)  # interpreter-sized tiles
    for cfg in (cases[0].default, small):
        assert (run.launch(cfg).double() - run.reference).abs().max().item() < run.atol
