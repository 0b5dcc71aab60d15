"""Per-row adapter ids outside [-1, n_adapters): one documented behaviour on every backend.

check_ids=True (default): ValueError naming adapter_ids, the valid range and the offending min/max (one reduction;
on CUDA one host sync; skipped under CUDA graph capture and torch.compile). check_ids=False: such ids act as -1
(no adapter), forward and backward, on every backend.
"""

import pytest
import torch
from checks import assert_close_vs_reference

import fused_lora

RANKS, SCALINGS = [2, 3], [0.5, 2.0]
BAD_IDS = [0, 2, -2, 1, 7, -1]  # 2 and 7 past the end, -2 before -1


def _inputs():
    x = torch.randn(6, 20)
    w = torch.randn(9, 20) / 20**0.5
    b = torch.randn(9)
    a = torch.randn(sum(RANKS), 20, requires_grad=True)
    bb = torch.randn(9, sum(RANKS), requires_grad=True)
    return x, w, b, a, bb


@pytest.mark.parametrize("cpu_backend", ["reference", "triton", "cpp"], indirect=True)
@pytest.mark.parametrize("ids", [BAD_IDS, [[0, 1, 2], [-1, 0, 1]]], ids=["per_row", "per_sample_2d"])
def test_out_of_range_ids_raise_naming_the_range_and_values(cpu_backend, ids):
    x, w, b, a, bb = _inputs()
    ids = torch.tensor(ids)
    if ids.dim() == 2:
        x = x.reshape(2, 3, 20)
    lo, hi = int(ids.min()), int(ids.max())
    with pytest.raises(ValueError, match=rf"adapter_ids must be in \[-1, 2\).*values in \[{lo}, {hi}\]"):
        fused_lora.lora_linear_rows(x, w, b, a, bb, SCALINGS, RANKS, ids)


@pytest.mark.parametrize("cpu_backend", ["reference", "triton", "cpp"], indirect=True)
def test_unchecked_out_of_range_ids_act_as_no_adapter(cpu_backend):
    """cpp: needs the C++ backend to treat such ids as -1 (csrc, the C++ owner's change of issue 11)."""
    x, w, b, a, bb = _inputs()
    bad = torch.tensor(BAD_IDS)
    as_none = torch.where((bad >= 0) & (bad < len(RANKS)), bad, -1)
    y = fused_lora.lora_linear_rows(x, w, b, a, bb, SCALINGS, RANKS, bad, check_ids=False)
    g = torch.randn_like(y)
    y.backward(g)
    grads = [a.grad.clone(), bb.grad.clone()]
    a.grad = bb.grad = None
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FUSED_LORA_BACKEND", "reference")
        leaves = [t.detach().double().requires_grad_() for t in (a, bb)]
        y64 = fused_lora.lora_linear_rows(
            x.double(), w.double(), b.double(), leaves[0], leaves[1], SCALINGS, RANKS, as_none
        )
        y64.backward(g.double())
    assert_close_vs_reference(y, y64, y64.float(), atol=1e-5)
    for name, ours, ref in zip(("dA", "dB"), grads, leaves):
        assert_close_vs_reference(ours, ref.grad, ref.grad.float(), atol=1e-5, name=name)


def test_the_check_is_skipped_while_compiling(monkeypatch):
    """Under torch.compile the check would be a graph break and a sync in the graph: it is skipped there."""
    x, w, b, a, bb = _inputs()
    monkeypatch.setenv("FUSED_LORA_BACKEND", "reference")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    y = fused_lora.lora_linear_rows(x, w, b, a, bb, SCALINGS, RANKS, torch.tensor(BAD_IDS))
    assert y.shape == (6, 9)


def test_the_check_reduces_once_and_only_when_asked(monkeypatch):
    """One min/max reduction per call (one host sync on CUDA); none with check_ids=False."""
    x, w, b, a, bb = _inputs()
    monkeypatch.setenv("FUSED_LORA_BACKEND", "reference")
    calls = []
    original = torch.aminmax
    monkeypatch.setattr(torch, "aminmax", lambda t, *args, **kw: calls.append(t.numel()) or original(t, *args, **kw))
    ids = torch.tensor([0, 1, -1, 1, 0, 0])
    fused_lora.lora_linear_rows(x, w, b, a, bb, SCALINGS, RANKS, ids)
    assert calls == [6]
    fused_lora.lora_linear_rows(x, w, b, a, bb, SCALINGS, RANKS, ids, check_ids=False)
    assert calls == [6]


# ---- FusedLoRALinear(adapter_ids=...) ----
def _layer_with_lora_bias():
    layer = fused_lora.FusedLoRALinear(
        20, 9, adapter_name="a0", r=2, lora_alpha=1.0, init_lora_weights=False, lora_bias=True
    )
    layer.add_adapter("a1", 3, 6.0, init_lora_weights=False, lora_bias=True)
    with torch.no_grad():
        for name in ("a0", "a1"):
            layer.lora_B[name].bias.normal_()
    return layer


def test_layer_checks_ids_as_lora_linear_rows():
    layer = _layer_with_lora_bias()
    x = torch.randn(6, 20)
    with pytest.raises(ValueError, match=r"adapter_ids must be in \[-1, 2\).*values in \[-2, 7\]"):
        layer(x, adapter_ids=torch.tensor(BAD_IDS))


def test_layer_unchecked_ids_act_as_no_adapter_with_lora_bias():
    layer = _layer_with_lora_bias()
    x = torch.randn(6, 20)
    bad = torch.tensor(BAD_IDS)
    ours = layer(x, adapter_ids=bad, check_ids=False)
    expected = layer(x, adapter_ids=torch.where((bad >= 0) & (bad < 2), bad, -1))
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    with torch.no_grad():
        # no rank term and no lora_B bias (~1 each) on those rows: the base alone, to fp32 rounding (the backend's
        # own GEMM may sum in another order than nn.Linear's)
        torch.testing.assert_close(ours[[1, 2, 4, 5]], layer.base_layer(x[[1, 2, 4, 5]]), rtol=1e-5, atol=1e-5)
