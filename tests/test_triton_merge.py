"""In-place Triton merge under the interpreter: one rounding, fan_in_fan_out, safe mode, unmerge."""
import hashlib
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere in this process

import pytest  # noqa: E402
import torch  # noqa: E402

from fused_lora.kernels.merge import lora_merge_  # noqa: E402


def _inputs(N, K, R, w_dtype, adapter_dtype, fan_in_fan_out, seed=0):
    gen = torch.Generator().manual_seed(seed + N * 7 + K + R)
    w = torch.randn((K, N) if fan_in_fan_out else (N, K), generator=gen).to(w_dtype)
    a = (torch.randn(R, K, generator=gen) * 0.3).to(adapter_dtype)
    b = (torch.randn(N, R, generator=gen) * 0.3).to(adapter_dtype)
    scale = (torch.rand(R, generator=gen) + 0.25).to(torch.float32)
    return w, a, b, scale


def _delta64(a, b, scale, fan_in_fan_out):
    d = (b.double() * scale.double()) @ a.double()
    return d.T if fan_in_fan_out else d


def _ulp_fp16(v: torch.Tensor) -> torch.Tensor:
    exp = torch.floor(torch.log2(v.abs().clamp_min(2.0 ** -14)))
    return torch.pow(2.0, exp - 10)


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("adapter_dtype", [torch.float16, torch.float32])
def test_merge_fp16_rounds_once(fan_in_fan_out, sign, adapter_dtype):
    w, a, b, scale = _inputs(70, 150, 37, torch.float16, adapter_dtype, fan_in_fan_out)
    delta = _delta64(a, b, scale, fan_in_fan_out)
    exact = w.double() + sign * delta
    ok = lora_merge_(w, a, b, scale, sign, fan_in_fan_out, False)
    assert ok.dtype == torch.bool and ok.dim() == 0 and bool(ok)
    once = exact.to(torch.float16)
    assert (w == once).double().mean().item() >= 0.99
    well_conditioned = exact.abs() >= 2.0 ** -8 * (w.double().abs() + delta.abs())
    err = (w.double() - exact).abs()
    assert torch.all(err[well_conditioned] <= _ulp_fp16(exact)[well_conditioned])


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_merge_fp32_within_accumulation_error(fan_in_fan_out):
    R = 21
    w, a, b, scale = _inputs(45, 67, R, torch.float32, torch.float32, fan_in_fan_out)
    w0 = w.clone()
    lora_merge_(w, a, b, scale, 1.0, fan_in_fan_out, False)
    exact = w0.double() + _delta64(a, b, scale, fan_in_fan_out)
    magnitude = (b.double().abs() * scale.double()) @ a.double().abs()
    magnitude = magnitude.T if fan_in_fan_out else magnitude
    bound = 2.0 ** -24 * ((R + 2) * magnitude + 2 * w0.double().abs())
    assert torch.all((w.double() - exact).abs() <= bound)


def test_merge_rank_one_and_unmerge_restores_closely():
    w, a, b, scale = _inputs(33, 19, 1, torch.float16, torch.float16, False)
    w0 = w.clone()
    lora_merge_(w, a, b, scale, 1.0, False, False)
    merged = w.double()
    assert not torch.equal(w, w0)
    lora_merge_(w, a, b, scale, -1.0, False, False)
    # Two roundings, half an ulp each, of the larger of the two binades involved.
    ulp = _ulp_fp16(torch.maximum(w0.double().abs(), merged.abs()))
    assert torch.all((w.double() - w0.double()).abs() <= ulp)
    assert (w == w0).double().mean().item() >= 0.5


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy warns about the inf it is asked to propagate
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_safe_merge_with_inf_leaves_weight_untouched(fan_in_fan_out):
    w, a, b, scale = _inputs(40, 36, 5, torch.float16, torch.float16, fan_in_fan_out)
    b[7, 2] = float("inf")
    before = _digest(w)
    ok = lora_merge_(w, a, b, scale, 1.0, fan_in_fan_out, True)
    assert ok.dtype == torch.bool and ok.dim() == 0 and not bool(ok)
    assert _digest(w) == before


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_safe_merge_overflow_after_rounding_is_refused():
    w, a, b, scale = _inputs(20, 24, 3, torch.float16, torch.float32, False)
    w[5, 5] = 65504.0  # largest fp16: adding a delta of a few hundred rounds to inf
    a[:, 5] = 30.0
    b[5, :] = 30.0
    before = _digest(w)
    assert not bool(lora_merge_(w, a, b, scale, 1.0, False, True))
    assert _digest(w) == before


def test_safe_merge_clean_matches_unsafe():
    w, a, b, scale = _inputs(50, 30, 9, torch.float16, torch.float16, True)
    w_unsafe = w.clone()
    assert bool(lora_merge_(w, a, b, scale, 1.0, True, True))
    lora_merge_(w_unsafe, a, b, scale, 1.0, True, False)
    assert torch.equal(w, w_unsafe)
