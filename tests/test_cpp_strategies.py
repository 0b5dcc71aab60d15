"""The base-GEMM strategies of the C++ backend (csrc/gemm_choice.h): each one, forced, gives the contract's results
on every ISA level, for few rows (lora_small.cpp) and many (the row-block loops), dense and per-row; each rounds the
number of times CONTRACT.md says; the rule picks what this machine's CPU and torch build call for; the switches are
honoured and refused by name when malformed.

AVX-512/AMX machines take the vendor GEMM where the rule says so; the strategies themselves are all exercised here.
"""

from __future__ import annotations

import pytest
import torch

from fused_lora import reference as ref

try:
    from tests.checks import assert_close_vs_reference
except ImportError:  # pytest run with tests/ (not the repo root) on sys.path
    from checks import assert_close_vs_reference

from test_cpp_backend import (
    GEMM_SWITCHES,
    _atol,
    _case,
    _d64,
    _noncontig_rows,
    _rank_ptr,
    _seed,
    _torch_bwd,
    _torch_fwd,
    cb,
)

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32
STRATEGIES = {  # name: (x dtype, adapter dtype, FUSED_LORA_CPU_GEMM)
    "fp32_vendor": (F32, F32, "vendor"),
    "fp32_direct": (F32, F32, "direct"),
    "fp16_vendor": (F16, F16, "vendor"),
    "fp16_mixed": (F16, F16, "mixed"),
    "fp16_direct": (F16, F32, "direct"),
    "bf16_vendor": (BF16, BF16, "vendor"),
    "bf16_mixed": (BF16, F32, "mixed"),
    "bf16_direct": (BF16, BF16, "direct"),
}


@pytest.fixture(autouse=True, params=cb.isa_paths())
def isa_level(request, monkeypatch):
    """Every case once per ISA level the CPU supports, with no base-GEMM switch left over from the environment."""
    for name in GEMM_SWITCHES:
        monkeypatch.delenv(name, raising=False)
    with cb.use_isa(request.param) as level:
        yield level


def _use(monkeypatch, strategy):
    dtype, adapter_dtype, gemm = STRATEGIES[strategy]
    monkeypatch.setenv("FUSED_LORA_CPU_GEMM", gemm)
    return dtype, adapter_dtype, gemm


def _expected_gemm(dtype, gemm):
    """What a forced strategy runs: mixed exists for 16-bit inputs only (fp32 takes the vendor GEMM)."""
    return "vendor" if gemm == "mixed" and dtype == F32 else gemm


# M: a decode row, a small batch (the skinny path up to 64 rows), a batch past it (row blocks of 64)
@pytest.mark.parametrize("M", [1, 37, 70])
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_each_strategy_matches_the_reference(monkeypatch, strategy, M):
    dtype, adapter_dtype, gemm = _use(monkeypatch, strategy)
    K, N, ranks, dps = 131, 75, [1, 7, 4], [0.0, 0.3, 0.0]
    x, w, b, a, bb, scale = _case(M, K, N, ranks, dtype, adapter_dtype=adapter_dtype)
    x = _noncontig_rows(x, "pad")  # NaN after each row: nothing past a row's end may be read
    dy = _noncontig_rows(torch.randn(M, N).to(dtype), "pad")
    rp, seed = _rank_ptr(ranks), _seed(5)
    x64, w64, b64, a64, bb64, dy64 = _d64(x), _d64(w), _d64(b), _d64(a), _d64(bb), _d64(dy)
    for drop in ([0.0, 0.0, 0.0], dps):
        with cb.trace_base_gemms() as counts:
            y, t = cb.lora_fwd(x, w, b, a, bb, scale, rp, drop, seed)
            dx, da, db = cb.lora_bwd(dy, x, w, a, bb, scale, t, rp, drop, seed, True)
        assert counts == {g: (2 if g == _expected_gemm(dtype, gemm) else 0) for g in cb.BASE_GEMMS}, counts
        y64, t64 = ref.lora_fwd(x64, w64, b64, a64, bb64, scale, rp, drop, seed)
        assert y.dtype == dtype and t.dtype == F32
        assert_close_vs_reference(
            y, y64, _torch_fwd(x, w, b, a, bb, scale, rp, drop, seed), atol=_atol(y64), name=f"y {drop}"
        )
        t_fp32 = ref.lora_fwd(x.float(), w.float(), None, a.float(), bb.float(), scale, rp, drop, seed)[1]
        assert_close_vs_reference(t, t64, t_fp32, atol=_atol(t64), name=f"t {drop}")
        ref_g = ref.lora_bwd(dy64, x64, w64, a64, bb64, scale, _d64(t), rp, drop, seed, True)
        for name, ours, r64, same in zip(
            ("dx", "dA", "dB"), (dx, da, db), ref_g, _torch_bwd(dy, x, w, a, bb, scale, t, rp, drop, seed)
        ):
            assert ours.dtype == same.dtype, name
            assert_close_vs_reference(ours, r64, same, atol=_atol(r64), name=f"{name} {drop}")
        none_dx, da2, db2 = cb.lora_bwd(dy, x, w, a, bb, scale, t, rp, drop, seed, False)
        assert none_dx is None and torch.equal(da2, da) and torch.equal(db2, db)

    row_ids = torch.randint(-1, len(ranks), (M,))
    row_ids[: min(M, 4)] = torch.tensor([-1, 0, 1, 2])[: min(M, 4)]
    y, t = cb.lora_rows_fwd(x, w, b, a, bb, scale, rp, row_ids, dps, seed)
    y64, _ = ref.lora_rows_fwd(x64, w64, b64, a64, bb64, scale, rp, row_ids, dps, seed)
    assert_close_vs_reference(
        y, y64, _torch_fwd(x, w, b, a, bb, scale, rp, dps, seed, row_ids), atol=_atol(y64), name="rows y"
    )
    grads = cb.lora_rows_bwd(dy, x, w, a, bb, scale, t, rp, row_ids, dps, seed, True)
    ref_g = ref.lora_rows_bwd(dy64, x64, w64, a64, bb64, scale, _d64(t), rp, row_ids, dps, seed, True)
    for name, ours, r64, same in zip(
        ("dx", "dA", "dB"), grads, ref_g, _torch_bwd(dy, x, w, a, bb, scale, t, rp, dps, seed, row_ids)
    ):
        assert_close_vs_reference(ours, r64, same, atol=_atol(r64), name=f"rows {name}")


def _rounded(v64, dtype):
    return v64.to(dtype).to(torch.float64)


@pytest.mark.parametrize("M", [5, 70])
@pytest.mark.parametrize(
    "strategy", ["bf16_vendor", "bf16_mixed", "bf16_direct", "fp16_vendor", "fp16_mixed", "fp16_direct"]
)
def test_rounding_count_of_each_16bit_strategy(monkeypatch, strategy, M):
    """vendor: round(round(x W^T) + (bias + rank term)); mixed and direct: round(x W^T + bias + rank term)."""
    dtype, _, gemm = _use(monkeypatch, strategy)
    K, N, ranks = 150, 141, [5]
    x, w, b, a, bb, scale = _case(M, K, N, ranks, dtype, adapter_dtype=dtype)
    bb = bb * 0.05  # a rank term of the order of the base's last bits: where the two roundings differ
    rp, dps, seed = [0, 5], [0.0], _seed()
    y, t = cb.lora_fwd(x, w, b, a, bb, scale, rp, dps, seed)
    x64, w64, b64, a64, bb64 = _d64(x), _d64(w), _d64(b), _d64(a), _d64(bb)
    t64 = ref.lora_fwd(x64, w64, None, a64, bb64, scale, rp, dps, seed)[1]
    base64, term64 = x64 @ w64.T, t64 @ bb64.T + b64
    once, twice = (base64 + term64).to(dtype), (_rounded(base64, dtype) + term64).to(dtype)
    assert (once != twice).double().mean().item() > 0.02  # the case tells the two apart
    expected = twice if gemm == "vendor" else once
    # fp32 accumulation order may move a value that sits on a rounding boundary; nearly all are exact
    assert (y == expected).double().mean().item() >= 0.99

    dy = torch.randn(M, N).to(dtype)
    dx, _, _ = cb.lora_bwd(dy, x, w, a, bb, scale, t, rp, dps, seed, True)
    dbase64, dterm64 = _d64(dy) @ w64, ((_d64(dy) @ bb64) * scale.double()) @ a64
    d_once, d_twice = (dbase64 + dterm64).to(dtype), (_rounded(dbase64, dtype) + dterm64).to(dtype)
    assert (dx == (d_twice if gemm == "vendor" else d_once)).double().mean().item() >= 0.99


def test_fp32_direct_is_fp32_accurate_at_decode_sizes(monkeypatch):
    """A long reduction (K = N = 1024) in one pass: the fp32 sums stay within fp32 rounding of the float64 result."""
    monkeypatch.setenv("FUSED_LORA_CPU_GEMM", "direct")
    x, w, b, a, bb, scale = _case(3, 1024, 1024, [16], F32)
    rp, dps, seed = [0, 16], [0.0], _seed()
    y, t = cb.lora_fwd(x, w, b, a, bb, scale, rp, dps, seed)
    y64, _ = ref.lora_fwd(_d64(x), _d64(w), _d64(b), _d64(a), _d64(bb), scale, rp, dps, seed)
    assert_close_vs_reference(y, y64, _torch_fwd(x, w, b, a, bb, scale, rp, dps, seed), atol=_atol(y64), name="y")


# ---- the rule and the switches ----
def _torch_bf16_on_onednn() -> bool:
    return bool(torch.backends.mkldnn.enabled and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _cpu_is_intel() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("vendor_id") and "GenuineIntel" in line for line in f)
    except OSError:
        return False


def test_rule_follows_the_machine(isa_level):
    """Direct kernels only from the avx2 level up, for 16-bit only where torch has no oneDNN bf16/fp16 GEMM, for
    fp32 only off Intel CPUs; above the limit bf16 takes oneDNN (vendor) where torch has it, else MKL's mixed GEMM."""
    text = cb.gemm_rule()
    vectors = isa_level != "baseline"
    bf16_direct = vectors and not _torch_bf16_on_onednn()
    f32_direct = vectors and not _cpu_is_intel()
    assert (cb.base_gemm_for(BF16, 1) == "direct") == bf16_direct, text
    assert (cb.base_gemm_for(BF16, 1, backward=True) == "direct") == bf16_direct, text
    assert (cb.base_gemm_for(F32, 1) == "direct") == f32_direct, text
    assert (cb.base_gemm_for(F32, 1, backward=True) == "direct") == f32_direct, text
    big = 1 << 20
    assert cb.base_gemm_for(F32, big) == "vendor"
    assert cb.base_gemm_for(BF16, big) == ("vendor" if _torch_bf16_on_onednn() else "mixed"), text
    assert "float32:" in text and "bfloat16:" in text and "float16:" in text


def test_forcing_and_limits(monkeypatch):
    for gemm in cb.BASE_GEMMS:
        monkeypatch.setenv("FUSED_LORA_CPU_GEMM", gemm)
        assert cb.base_gemm_for(BF16, 3) == gemm and cb.base_gemm_for(BF16, 10**6, backward=True) == gemm
        assert cb.base_gemm_for(F32, 3) == ("vendor" if gemm == "mixed" else gemm)
    monkeypatch.setenv("FUSED_LORA_CPU_GEMM", "auto")
    monkeypatch.setenv("FUSED_LORA_CPU_DIRECT_MAX_ROWS", "0")
    assert cb.base_gemm_for(F32, 1) == "vendor" and cb.base_gemm_for(BF16, 1) != "direct"
    monkeypatch.setenv("FUSED_LORA_CPU_DIRECT_MAX_ROWS", "100")
    assert cb.base_gemm_for(F32, 100) == "direct" and cb.base_gemm_for(F32, 101, backward=True) == "vendor"
    monkeypatch.setenv("FUSED_LORA_CPU_FP16_FAST", "1")  # torch's fp16 GEMM, whatever the rows
    assert cb.base_gemm_for(F16, 1) == "vendor"
    monkeypatch.delenv("FUSED_LORA_CPU_DIRECT_MAX_ROWS")
    monkeypatch.setenv("FUSED_LORA_CPU_BF16_EXACT", "1")  # never vendor for bf16 (where MKL has its mixed GEMM)
    if "no MKL mixed GEMM" not in cb.gemm_rule().split("bfloat16:")[1].split("\n")[0]:
        assert cb.base_gemm_for(BF16, 10**6) == "mixed"


def test_use_base_gemm_sets_and_restores(monkeypatch):
    monkeypatch.setenv("FUSED_LORA_CPU_GEMM", "mixed")
    with cb.use_base_gemm("direct"):
        assert cb.base_gemm_for(F32, 10**6) == "direct"
        with cb.use_base_gemm(None):
            assert cb.base_gemm_for(F32, 10**6) == "vendor"
    assert cb.base_gemm_for(BF16, 1) == "mixed"
    with pytest.raises(ValueError, match="not one of auto, vendor, mixed, direct"):
        with cb.use_base_gemm("amx"):
            pass


@pytest.mark.parametrize(
    "name,value,pattern",
    [
        ("FUSED_LORA_CPU_GEMM", "fastest", r"FUSED_LORA_CPU_GEMM=fastest is not a strategy; expected auto, vendor"),
        ("FUSED_LORA_CPU_DIRECT_MAX_ROWS", "-3", r"FUSED_LORA_CPU_DIRECT_MAX_ROWS=-3 is not a row count"),
        ("FUSED_LORA_CPU_DIRECT_MAX_ROWS", "12x", r"FUSED_LORA_CPU_DIRECT_MAX_ROWS=12x is not a row count"),
    ],
)
def test_malformed_switches_are_refused_by_name(monkeypatch, name, value, pattern):
    monkeypatch.setenv(name, value)
    x, w, b, a, bb, scale = _case(3, 8, 5, [2], F32)
    with pytest.raises(ValueError, match=pattern):
        cb.lora_fwd(x, w, b, a, bb, scale, [0, 2], [0.0], _seed())
