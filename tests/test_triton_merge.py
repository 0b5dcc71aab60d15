"""In-place Triton merge on --device (tests/devices.py): one rounding, fan_in_fan_out, safe mode, unmerge.

CPU: the interpreter (bf16 skipped: it corrupts it); CUDA: the compiled kernel, bf16 included. W is read back to
the CPU for every comparison; inputs are drawn on the CPU so every device sees the same numbers.
"""

import hashlib

import pytest
import torch

from fused_lora.kernels.merge import lora_merge_
from tests.devices import cpu, dtypes_for, move

# significand bits after the leading one, and the smallest normal exponent
_FORMATS = {torch.float16: (10, -14), torch.bfloat16: (7, -126)}


def pytest_generate_tests(metafunc):
    if "w_dtype" in metafunc.fixturenames:
        metafunc.parametrize("w_dtype", dtypes_for(metafunc.config, [torch.float16, torch.bfloat16]))


def _inputs(N, K, R, w_dtype, adapter_dtype, fan_in_fan_out, seed=0, device=torch.device("cpu")):
    gen = torch.Generator().manual_seed(seed + N * 7 + K + R)
    w = torch.randn((K, N) if fan_in_fan_out else (N, K), generator=gen).to(w_dtype)
    a = (torch.randn(R, K, generator=gen) * 0.3).to(adapter_dtype)
    b = (torch.randn(N, R, generator=gen) * 0.3).to(adapter_dtype)
    scale = (torch.rand(R, generator=gen) + 0.25).to(torch.float32)
    return tuple(move(t, device) for t in (w, a, b, scale))


def _delta64(a, b, scale, fan_in_fan_out):
    d = (cpu(b).double() * cpu(scale).double()) @ cpu(a).double()
    return d.T if fan_in_fan_out else d


def _ulp(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    mantissa_bits, min_exp = _FORMATS[dtype]
    exp = torch.floor(torch.log2(v.abs().clamp_min(2.0**min_exp)))
    return torch.pow(2.0, exp - mantissa_bits)


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(cpu(t).contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("adapter_dtype", ["weight", torch.float32])
def test_merge_16bit_rounds_once(fan_in_fan_out, sign, adapter_dtype, w_dtype, device):
    adapter_dtype = w_dtype if adapter_dtype == "weight" else adapter_dtype
    w, a, b, scale = _inputs(70, 150, 37, w_dtype, adapter_dtype, fan_in_fan_out, device=device)
    delta = _delta64(a, b, scale, fan_in_fan_out)
    exact = cpu(w).double() + sign * delta
    ok = lora_merge_(w, a, b, scale, sign, fan_in_fan_out, False)
    assert ok.dtype == torch.bool and ok.dim() == 0 and bool(ok) and ok.device == w.device
    w = cpu(w)
    once = exact.to(w_dtype)
    assert (w == once).double().mean().item() >= 0.99
    well_conditioned = exact.abs() >= 2.0**-8 * (w.double().abs() + delta.abs())
    err = (w.double() - exact).abs()
    assert torch.all(err[well_conditioned] <= _ulp(exact, w_dtype)[well_conditioned])


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_merge_fp32_within_accumulation_error(fan_in_fan_out, device):
    R = 21
    w, a, b, scale = _inputs(45, 67, R, torch.float32, torch.float32, fan_in_fan_out, device=device)
    w0 = cpu(w).clone()
    lora_merge_(w, a, b, scale, 1.0, fan_in_fan_out, False)
    exact = w0.double() + _delta64(a, b, scale, fan_in_fan_out)
    magnitude = (cpu(b).double().abs() * cpu(scale).double()) @ cpu(a).double().abs()
    magnitude = magnitude.T if fan_in_fan_out else magnitude
    bound = 2.0**-24 * ((R + 2) * magnitude + 2 * w0.double().abs())
    assert torch.all((cpu(w).double() - exact).abs() <= bound)


def test_merge_rank_one_and_unmerge_restores_closely(w_dtype, device):
    w, a, b, scale = _inputs(33, 19, 1, w_dtype, w_dtype, False, device=device)
    w0 = cpu(w).clone()
    lora_merge_(w, a, b, scale, 1.0, False, False)
    merged = cpu(w).double()
    assert not torch.equal(cpu(w), w0)
    lora_merge_(w, a, b, scale, -1.0, False, False)
    w = cpu(w)
    # Two roundings, half an ulp each, of the larger of the two binades involved.
    ulp = _ulp(torch.maximum(w0.double().abs(), merged.abs()), w_dtype)
    assert torch.all((w.double() - w0.double()).abs() <= ulp)
    assert (w == w0).double().mean().item() >= 0.5


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy warns about the inf it is asked to propagate
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_safe_merge_with_inf_leaves_weight_untouched(fan_in_fan_out, w_dtype, device):
    w, a, b, scale = _inputs(40, 36, 5, w_dtype, w_dtype, fan_in_fan_out, device=device)
    b[7, 2] = float("inf")
    before = _digest(w)
    ok = lora_merge_(w, a, b, scale, 1.0, fan_in_fan_out, True)
    assert ok.dtype == torch.bool and ok.dim() == 0 and not bool(ok)
    assert _digest(w) == before


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_safe_merge_overflow_after_rounding_is_refused(w_dtype, device):
    w, a, b, scale = _inputs(20, 24, 3, w_dtype, torch.float32, False, device=device)
    # the largest finite value: adding a delta of a few hundred (fp16) or 2^120 (bf16) rounds to inf
    w[5, 5] = torch.finfo(w_dtype).max
    big = 30.0 if w_dtype == torch.float16 else 2.0**60
    a[:, 5] = big
    b[5, :] = big
    before = _digest(w)
    assert not bool(lora_merge_(w, a, b, scale, 1.0, False, True))
    assert _digest(w) == before


def test_safe_merge_clean_matches_unsafe(w_dtype, device):
    w, a, b, scale = _inputs(50, 30, 9, w_dtype, w_dtype, True, device=device)
    w_unsafe = w.clone()
    assert bool(lora_merge_(w, a, b, scale, 1.0, True, True))
    lora_merge_(w_unsafe, a, b, scale, 1.0, True, False)
    assert torch.equal(cpu(w), cpu(w_unsafe))
