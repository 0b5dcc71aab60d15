"""torch.autocast: lora_linear, lora_linear_rows, FusedLoRALinear and the PEFT layers follow nn.Linear's rules.

nn.Linear under autocast (CPU or CUDA) casts every float32/float16/bfloat16 operand to the autocast dtype and
leaves float64 alone; its output has the autocast dtype, and gradients come back in each leaf's own dtype
(float32 master adapters get float32 gradients, x gets x's dtype). The yardstick for values is PEFT's order of
operations (nn.Linear calls) under the same autocast, judged against float64 math on the autocast-rounded inputs.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from checks import assert_close_vs_reference

import fused_lora
from fused_lora import ops

ALL_BACKENDS = ["cpp", "reference", "triton"]
LOW = [torch.bfloat16, torch.float16]
ATOL = {torch.bfloat16: 1e-2, torch.float16: 1e-3}


def _skip_interpreter_bf16(backend, *dtypes):
    if backend == "triton" and torch.bfloat16 in dtypes:
        pytest.skip("the Triton interpreter corrupts bfloat16 (triton-lang/triton#11584)")


def _linear_lora(x, w, b, a, bb, s):
    """PEFT's LoRA Linear as plain nn.Linear calls: under autocast each F.linear runs in the autocast dtype."""
    return F.linear(x, w, b) + F.linear(F.linear(x.to(a.dtype), a), bb) * s


def _inputs(x_dtype, adapter_dtype, shape=(3, 5, 24), n=18, r=6):
    k = shape[-1]
    x = torch.randn(*shape).to(x_dtype)
    w = torch.randn(n, k) / k**0.5  # float32 master weights
    b = torch.randn(n)
    a = (torch.randn(r, k) / k**0.5).to(adapter_dtype)
    bb = (torch.randn(n, r) / r**0.5).to(adapter_dtype)
    return x, w, b, a, bb


def _rounded64(t, dtype):
    """What autocast hands the GEMM, exactly, in float64."""
    return t.detach().to(dtype).double()


@pytest.mark.parametrize("cpu_backend", ALL_BACKENDS, indirect=True)
@pytest.mark.parametrize("autocast_dtype", LOW)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("adapters", ["float32", "low"])
def test_lora_linear_follows_nn_linear_under_autocast(cpu_backend, autocast_dtype, x_dtype, adapters):
    _skip_interpreter_bf16(cpu_backend, autocast_dtype)
    adapter_dtype = torch.float32 if adapters == "float32" else autocast_dtype
    x, w, b, a, bb = _inputs(x_dtype, adapter_dtype)
    leaves = [t.requires_grad_() for t in (x, a, bb)]
    twins = [t.detach().clone().requires_grad_() for t in leaves]
    with torch.autocast("cpu", dtype=autocast_dtype):
        ours = fused_lora.lora_linear(x, w, b, a, bb, 0.75)
        expected = _linear_lora(twins[0], w, b, twins[1], twins[2], 0.75)
    assert ours.dtype == expected.dtype == autocast_dtype
    leaves64 = [_rounded64(t, autocast_dtype).requires_grad_() for t in leaves]
    ref64 = _linear_lora(
        leaves64[0], _rounded64(w, autocast_dtype), _rounded64(b, autocast_dtype), leaves64[1], leaves64[2], 0.75
    )
    assert_close_vs_reference(ours, ref64, expected, atol=ATOL[autocast_dtype])

    g = torch.randn_like(expected)
    ours.backward(g)  # outside autocast, as Trainer/accelerate do
    expected.backward(g)
    ref64.backward(g.double())
    for name, leaf, twin, leaf64 in zip(("x", "lora_a", "lora_b"), leaves, twins, leaves64):
        assert leaf.grad.dtype == twin.grad.dtype == leaf.dtype, f"d{name}: {leaf.grad.dtype}"
        assert_close_vs_reference(leaf.grad, leaf64.grad, twin.grad, atol=10 * ATOL[autocast_dtype], name=f"d{name}")


@pytest.mark.parametrize("cpu_backend", ALL_BACKENDS, indirect=True)
@pytest.mark.parametrize("autocast_dtype", LOW)
def test_rows_follow_nn_linear_under_autocast(cpu_backend, autocast_dtype):
    _skip_interpreter_bf16(cpu_backend, autocast_dtype)
    ranks, scalings = [3, 5], [0.5, 2.0]
    x, w, b, _, _ = _inputs(autocast_dtype, torch.float32, shape=(4, 3, 20), n=11)
    a = torch.randn(sum(ranks), 20, requires_grad=True)
    bb = torch.randn(11, sum(ranks), requires_grad=True)
    ids = torch.tensor([1, -1, 0, 1])
    with torch.autocast("cpu", dtype=autocast_dtype):
        ours = fused_lora.lora_linear_rows(x, w, b, a, bb, scalings, ranks, ids)
        expected = F.linear(x, w, b)
        for i, sample in enumerate(ids.tolist()):
            if sample >= 0:
                lo, hi = sum(ranks[:sample]), sum(ranks[: sample + 1])
                term = F.linear(F.linear(x[i].float(), a[lo:hi]), bb[:, lo:hi]) * scalings[sample]
                expected = expected.index_add(0, torch.tensor([i]), term[None])
    assert ours.dtype == expected.dtype == autocast_dtype
    ref64 = x.double() @ _rounded64(w, autocast_dtype).T + _rounded64(b, autocast_dtype)
    for i, sample in enumerate(ids.tolist()):
        if sample >= 0:
            lo, hi = sum(ranks[:sample]), sum(ranks[: sample + 1])
            a64, b64 = _rounded64(a[lo:hi], autocast_dtype), _rounded64(bb[:, lo:hi], autocast_dtype)
            ref64[i] += scalings[sample] * (x[i].double() @ a64.T) @ b64.T
    assert_close_vs_reference(ours, ref64, expected, atol=ATOL[autocast_dtype])
    ours.float().sum().backward()
    assert a.grad.dtype == bb.grad.dtype == torch.float32


@pytest.mark.parametrize("cpu_backend", ALL_BACKENDS, indirect=True)
@pytest.mark.parametrize("autocast_dtype", LOW)
def test_float64_is_not_cast_by_autocast(cpu_backend, autocast_dtype):
    """All-float64 operands are left alone (F.linear computes them in float64 under autocast too)."""
    x, w, b, a, bb = (t.double() for t in _inputs(torch.float32, torch.float32))
    with torch.autocast("cpu", dtype=autocast_dtype):
        ours = fused_lora.lora_linear(x, w, b, a, bb, 0.75)
        expected = _linear_lora(x, w, b, a, bb, 0.75)
    assert ours.dtype == expected.dtype == torch.float64
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("autocast_dtype", LOW)
def test_float64_x_over_float32_weights_is_refused_as_nn_linear_does(autocast_dtype):
    x, w, b, a, bb = _inputs(torch.float32, torch.float32)
    x = x.double()
    with torch.autocast("cpu", dtype=autocast_dtype):
        with pytest.raises(RuntimeError):
            F.linear(x, w, b)  # autocast casts w but not the float64 x
        with pytest.raises(TypeError, match=rf"x \(.*torch.float64.*weight \(.*{autocast_dtype}.*autocast"):
            fused_lora.lora_linear(x, w, b, a, bb, 0.75)


@pytest.mark.parametrize("cpu_backend", ALL_BACKENDS, indirect=True)
@pytest.mark.parametrize("autocast_dtype", LOW)
def test_ops_compute_in_their_contract_dtypes_whatever_the_callers_autocast(cpu_backend, autocast_dtype):
    """The ops are called with their final dtypes: autocast still on around them must not re-cast their inside
    (a float32 shrink t computed in bfloat16, say). Same bits with and without autocast."""
    x, w, b, a, bb = (t.detach() for t in _inputs(torch.float32, torch.float32, shape=(7, 24)))
    scale = torch.full((6,), 0.75)
    seed = torch.zeros(1, dtype=torch.int64)
    args = (x, w, b, a, bb, scale, [0, 6], [0.0], seed)
    y0, t0 = ops.lora_fwd(*args)
    dy = torch.randn_like(y0)
    bwd0 = ops.lora_bwd(dy, x, w, a, bb, scale, t0, [0, 6], [0.0], seed, True)
    with torch.autocast("cpu", dtype=autocast_dtype):
        y1, t1 = ops.lora_fwd(*args)
        bwd1 = ops.lora_bwd(dy, x, w, a, bb, scale, t0, [0, 6], [0.0], seed, True)
    assert y1.dtype == t1.dtype == torch.float32
    assert torch.equal(y0, y1) and torch.equal(t0, t1)
    for before, after in zip(bwd0, bwd1):
        assert after.dtype == torch.float32 and torch.equal(before, after)


# ---- FusedLoRALinear ----
@pytest.mark.parametrize("autocast_dtype", LOW)
def test_layer_with_low_precision_input_and_float32_weights(autocast_dtype):
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as PeftLinear

    base = torch.nn.Linear(24, 18)
    layer = fused_lora.FusedLoRALinear.from_linear(base, r=4, lora_alpha=8, init_lora_weights=False)
    peft_layer = PeftLinear(
        copy.deepcopy(base), "default", LoraConfig(r=4, lora_alpha=8), r=4, lora_alpha=8, init_lora_weights=False
    )
    peft_layer.load_state_dict(layer.state_dict())
    x = torch.randn(3, 5, 24).to(autocast_dtype).requires_grad_()
    x_twin = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=autocast_dtype):
        ours = layer(x)
        expected = peft_layer(x_twin)
    assert ours.dtype == expected.dtype == autocast_dtype
    a, bb = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    ref64 = _linear_lora(
        x.detach().double(),
        _rounded64(base.weight, autocast_dtype),
        _rounded64(base.bias, autocast_dtype),
        _rounded64(a, autocast_dtype),
        _rounded64(bb, autocast_dtype),
        2.0,
    )
    assert_close_vs_reference(ours, ref64, expected, atol=ATOL[autocast_dtype])
    g = torch.randn_like(expected)
    ours.backward(g)
    expected.backward(g)
    assert x.grad.dtype == autocast_dtype
    for name in ("lora_A", "lora_B"):
        ours_grad = getattr(layer, name)["default"].weight.grad
        peft_grad = getattr(peft_layer, name)["default"].weight.grad
        assert ours_grad.dtype == peft_grad.dtype == torch.float32
        scale = peft_grad.abs().max().item()
        torch.testing.assert_close(ours_grad, peft_grad, rtol=0, atol=0.05 * scale)


# ---- the PEFT integration ----
def _spy(monkeypatch, name):
    calls = []
    original = getattr(fused_lora, name)
    monkeypatch.setattr(fused_lora, name, lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


@pytest.mark.parametrize("autocast_dtype", LOW)
def test_patched_peft_lora_runs_fused_with_low_precision_input(monkeypatch, autocast_dtype):
    from peft import LoraConfig, get_peft_model

    from fused_lora.integrations.peft import patch_model

    net = torch.nn.Sequential(torch.nn.Linear(24, 18), torch.nn.Tanh(), torch.nn.Linear(18, 7))
    model = get_peft_model(net, LoraConfig(r=3, lora_alpha=5, target_modules=["0", "2"], init_lora_weights=False))
    twin = copy.deepcopy(model)
    assert patch_model(model) == 2
    calls = _spy(monkeypatch, "lora_linear")
    x = torch.randn(4, 24).to(autocast_dtype)
    with torch.autocast("cpu", dtype=autocast_dtype):
        ours = model(x)
        expected = twin(x)
    assert len(calls) == 2, "the fused path did not run"
    assert ours.dtype == expected.dtype == autocast_dtype
    torch.testing.assert_close(ours.float(), expected.float(), rtol=0.05, atol=0.05)
    ours.float().sum().backward()
    expected.float().sum().backward()
    for (name, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        if p.requires_grad:
            assert p.grad.dtype == q.grad.dtype == torch.float32, name
            torch.testing.assert_close(p.grad, q.grad, rtol=0.05, atol=0.05 * q.grad.abs().max().item())


def test_patched_peft_lora_hands_float64_input_back_to_peft_under_autocast(monkeypatch):
    """nn.Linear refuses float64 x over float32 weights under autocast (only the weights are cast): the patched
    layer must do exactly what PEFT does there, not raise an error of its own."""
    from peft import LoraConfig, get_peft_model

    from fused_lora.integrations.peft import patch_model

    model = get_peft_model(
        torch.nn.Sequential(torch.nn.Linear(24, 18)),
        LoraConfig(r=3, lora_alpha=5, target_modules=["0"], init_lora_weights=False),
    )
    twin = copy.deepcopy(model)
    patch_model(model)
    x = torch.randn(4, 24, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(RuntimeError) as peft_error:
            twin(x)
        with pytest.raises(RuntimeError) as ours_error:
            model(x)
    assert type(ours_error.value) is type(peft_error.value)


@pytest.mark.parametrize("autocast_dtype", LOW)
def test_patched_adalora_runs_fused_with_low_precision_input(monkeypatch, autocast_dtype):
    from peft import AdaLoraConfig, get_peft_model

    from fused_lora.integrations.peft import patch_model

    net = torch.nn.Sequential(torch.nn.Linear(24, 18), torch.nn.Tanh(), torch.nn.Linear(18, 7))
    config = AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["0", "2"], lora_alpha=3)
    model = get_peft_model(net, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_E" in name:
                p.copy_(torch.randn_like(p))
    twin = copy.deepcopy(model)
    assert patch_model(model) == 2
    calls = _spy(monkeypatch, "lora_linear")
    x = torch.randn(4, 24).to(autocast_dtype)
    with torch.autocast("cpu", dtype=autocast_dtype):
        ours = model(x)
        expected = twin(x)
    assert len(calls) == 2, "the fused path did not run"
    assert ours.dtype == expected.dtype == autocast_dtype
    torch.testing.assert_close(ours.float(), expected.float(), rtol=0.05, atol=0.05)
    ours.float().sum().backward()
    expected.float().sum().backward()
    for (name, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        if p.requires_grad and q.grad is not None:
            assert p.grad.dtype == q.grad.dtype == torch.float32, name
            torch.testing.assert_close(p.grad, q.grad, rtol=0.05, atol=0.05 * q.grad.abs().max().item())
