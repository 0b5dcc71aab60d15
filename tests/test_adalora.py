"""AdaLoRA SVDLinear layers run fused: per-rank scale lora_E * scaling / ranknum, lora_E still trains."""

from __future__ import annotations

import copy

import pytest
import torch
from checks import assert_close_vs_reference
from peft import AdaLoraConfig, get_peft_model
from peft.tuners.adalora.layer import SVDLinear
from torch import nn

import fused_lora
from fused_lora.integrations.peft import ADALORA_API, FusedSVDLinear, patch_model, register, unpatch_model


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(13, 21)
        self.down = nn.Linear(21, 6, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def adalora_models(dropout=0.0):
    config = AdaLoraConfig(
        init_r=5,
        target_r=2,
        total_step=20,
        tinit=2,
        tfinal=5,
        target_modules=["up", "down"],
        lora_alpha=3,
        lora_dropout=dropout,
    )
    model = get_peft_model(Mlp(), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_E" in name:  # AdaLoRA starts E at zero: give the adapters something to add
                p.copy_(torch.randn_like(p))
                p[1] = 0.0  # a rank the allocator masked
    twin, twin64 = copy.deepcopy(model), copy.deepcopy(model).double()
    assert patch_model(model) == 2
    return model, twin, twin64


def test_every_relied_on_adalora_attribute_exists():
    model, _, _ = adalora_models()
    layer = model.base_model.model.up
    assert type(layer) is FusedSVDLinear
    missing = [name for name in ADALORA_API if not hasattr(layer, name)]
    assert not missing, f"PEFT's AdaLoRA SVDLinear no longer has {missing}"


def test_forward_matches_peft_with_one_fused_call_per_layer(monkeypatch):
    model, twin, twin64 = adalora_models()
    calls = []
    original = fused_lora.lora_linear
    monkeypatch.setattr(fused_lora, "lora_linear", lambda *a, **k: calls.append(a) or original(*a, **k))
    x = torch.randn(3, 4, 13)
    ours = model(x)
    assert len(calls) == 2 and isinstance(calls[0][5], torch.Tensor) and calls[0][5].shape == (5,)
    with torch.no_grad():
        assert_close_vs_reference(ours.detach(), twin64(x.double()), twin(x), atol=1e-6)


def test_gradients_reach_lora_e():
    model, twin, _ = adalora_models()
    model.train(), twin.train()
    x = torch.randn(7, 13)
    model(x).square().sum().backward()
    twin(x).square().sum().backward()
    ref = dict(twin.named_parameters())
    checked = 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
            torch.testing.assert_close(p.grad, ref[name].grad, rtol=1e-4, atol=1e-5)
            checked += "lora_E" in name
    assert checked == 2


def test_dropout_rate_passed_in_training(monkeypatch):
    model, _, _ = adalora_models(dropout=0.3)
    seen = []
    original = fused_lora.lora_linear
    monkeypatch.setattr(fused_lora, "lora_linear", lambda *a, **k: seen.append(k) or original(*a, **k))
    model.train()
    model(torch.randn(2, 13))
    assert seen[0]["dropout_p"] == [0.3] and seen[0]["training"] is True


def test_merge_unmerge_in_place():
    model, twin, twin64 = adalora_models()
    layer = model.base_model.model.up
    w0 = layer.base_layer.weight.detach().clone()
    expected = twin64.base_model.model.up.base_layer.weight + twin64.base_model.model.up.get_delta_weight("default")
    model.base_model.merge_adapter()
    twin.base_model.merge_adapter()
    assert_close_vs_reference(
        layer.base_layer.weight.detach(),
        expected.detach(),
        twin.base_model.model.up.base_layer.weight.detach(),
        atol=1e-7,
    )
    x = torch.randn(4, 13)
    torch.testing.assert_close(model(x), twin(x), rtol=1e-5, atol=1e-5)
    model.base_model.unmerge_adapter()
    torch.testing.assert_close(layer.base_layer.weight.detach(), w0, rtol=0, atol=1e-6)
    assert unpatch_model(model) == 2 and type(layer) is SVDLinear


def test_setting_r_on_adalora_warns_toward_init_r():
    with pytest.warns(UserWarning, match="init_r"):
        AdaLoraConfig(r=16, total_step=10, target_modules=["up"])
    with pytest.raises(TypeError, match="patch_model"):
        register(AdaLoraConfig(total_step=10, target_modules=["up"]))


def _fresh(model, x):
    twin = copy.deepcopy(model)  # a copy builds its plans from the current state
    with torch.no_grad():
        return twin(x)


@pytest.mark.parametrize("change", ["mask a rank in place", "lora_E replaced", "ranknum", "scaling"])
def test_eval_plan_follows_lora_e_ranknum_and_scaling(change):
    """In eval the per-rank scale lora_E * scaling / ranknum is cached between calls; the RankAllocator masks
    ranks of lora_E in place under no_grad, and every such change must reach the next call."""
    model, _, _ = adalora_models()
    model.eval()
    layer = model.base_model.model.up
    x = torch.randn(5, 13)
    with torch.no_grad():
        before = model(x)
        model(x)
        if change == "mask a rank in place":
            layer.lora_E["default"][0] = 0.0
        elif change == "lora_E replaced":
            layer.lora_E["default"] = nn.Parameter(torch.randn_like(layer.lora_E["default"]))
        elif change == "ranknum":
            layer.ranknum["default"].fill_(2.0)
        else:
            layer.scaling["default"] = 0.25
        after = model(x)
    torch.testing.assert_close(after, _fresh(model, x), rtol=0, atol=0)
    assert (after - before).abs().max() > 1e-4
