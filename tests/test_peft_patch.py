"""PEFT integration: a patched PEFT model behaves as PEFT's, with every LoRA Linear call fused.

Outputs are judged against the same PEFT model in float64 (unpatched), relative to PEFT's own float32/bf16 error.
Spies on fused_lora's entry points prove the fused path ran (one call per layer) with the adapters' current
scalings and dropout rates.
"""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
from checks import assert_close_vs_reference
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import Embedding as PeftLoraEmbedding
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from torch import nn

import fused_lora
from fused_lora.integrations.peft import LORA_LINEAR_API, FusedPeftLoraLinear, patch_model, register, unpatch_model

TARGETS = ["up", "down", "head"]


class TinyNet(nn.Module):
    """Odd widths (13 -> 17 -> 11 -> 5); `head` has no bias; an embedding and a conv that LoRA may also target."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 13)
        self.conv = nn.Conv1d(13, 13, 1)
        self.up = nn.Linear(13, 17)
        self.down = nn.Linear(17, 11)
        self.head = nn.Linear(11, 5, bias=False)

    def forward(self, x):
        h = self.conv(x.transpose(1, 2)).transpose(1, 2) if x.dim() == 3 else x
        return self.head(torch.tanh(self.down(torch.relu(self.up(h)))))


def lora_config(**kw):
    kw.setdefault("r", 3)
    kw.setdefault("lora_alpha", 5)
    kw.setdefault("target_modules", TARGETS)
    kw.setdefault("init_lora_weights", False)  # random B: the adapters change the output
    return LoraConfig(**kw)


def peft_pair(config=None, extra=(), dtype=torch.float32, n_layers=3):
    """(patched model, unpatched float-`dtype` twin, unpatched float64 twin) with the same weights."""
    base = TinyNet().to(dtype)
    model = get_peft_model(base, config or lora_config())
    for name, cfg in extra:
        model.add_adapter(name, cfg)
    twin = copy.deepcopy(model)
    twin64 = copy.deepcopy(model).double()
    assert patch_model(model) == n_layers
    return model, twin, twin64


class CallSpy:
    """Wraps a fused_lora entry point, recording its keyword arguments."""

    def __init__(self, monkeypatch, name):
        self.calls = []
        original = getattr(fused_lora, name)

        def spy(*args, **kwargs):
            self.calls.append((args, kwargs))
            return original(*args, **kwargs)

        monkeypatch.setattr(fused_lora, name, spy)


class OpSpy:
    """Wraps the op boundary's eager entry (fused_lora.ops.forward or rows_forward), which every fused layer call
    reaches, recording its arguments: (x, weight, bias, lora_a, lora_b, scale, rank_ptr, dropout_p, seed, ...)."""

    def __init__(self, monkeypatch, name):
        self.calls = []
        original = getattr(fused_lora.ops, name)

        def spy(*args, **kwargs):
            self.calls.append(args)
            return original(*args, **kwargs)

        monkeypatch.setattr(fused_lora.ops, name, spy)

    def scale(self, i=0):
        return self.calls[i][5].tolist()


def per_rank(scalings, ranks):
    return pytest.approx([s for s, r in zip(scalings, ranks) for _ in range(r)])


def set_active(models, names):
    for m in models:
        m.base_model.set_adapter(names)


def check_matches(model, twin, twin64, x, atol=1e-6, **kw):
    ours = model(x, **kw)
    with torch.no_grad():
        ref = twin(x, **kw)
        ref64 = twin64(x.double(), **kw)
    assert_close_vs_reference(ours.detach().float(), ref64, ref.float(), atol=atol)
    return ours


def test_every_relied_on_lora_attribute_exists():
    layer = PeftLoraLinear(nn.Linear(4, 3), "default", config=lora_config(), r=2, lora_alpha=4)
    missing = [name for name in LORA_LINEAR_API if not hasattr(layer, name)]
    assert not missing, f"PEFT's LoRA Linear no longer has {missing}: update fused_lora.integrations.peft"
    from peft.tuners import tuners_utils

    assert callable(getattr(tuners_utils, "check_adapters_to_merge", None))
    assert callable(getattr(LoraConfig, "_register_custom_module", None))


def test_patch_swaps_only_lora_linear_and_keeps_parameters():
    model = get_peft_model(TinyNet(), lora_config(target_modules=TARGETS + ["emb", "conv"]))
    params = {n: p.data_ptr() for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    assert patch_model(model) == 3
    assert patch_model(model) == 0  # already fused
    assert type(model.base_model.model.up) is FusedPeftLoraLinear
    assert type(model.base_model.model.emb) is PeftLoraEmbedding
    assert type(model.base_model.model.conv) is not FusedPeftLoraLinear
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == params
    assert list(model.state_dict()) == keys
    assert unpatch_model(model) == 3
    assert type(model.base_model.model.up) is PeftLoraLinear


@pytest.mark.parametrize("shape", [(7, 13), (2, 5, 13), (0, 13)])
def test_forward_one_and_two_adapters_one_call_per_layer(monkeypatch, shape):
    second = lora_config(r=2, lora_alpha=7, use_rslora=True)
    model, twin, twin64 = peft_pair(extra=[("two", second)])
    spy = OpSpy(monkeypatch, "forward")
    x = torch.randn(*shape)
    check_matches(model, twin, twin64, x)
    assert len(spy.calls) == 3
    set_active([model, twin, twin64], ["default", "two"])
    spy.calls.clear()
    check_matches(model, twin, twin64, x)
    assert len(spy.calls) == 3, "two active adapters must go through one fused call per layer"
    assert spy.calls[0][6] == [0, 3, 5]


def test_non_contiguous_input():
    model, twin, twin64 = peft_pair()
    x = torch.randn(5, 26)[:, ::2]
    check_matches(model, twin, twin64, x)


def test_training_gradients_match_peft():
    model, twin, _ = peft_pair(extra=[("two", lora_config(r=7, lora_alpha=3))])
    set_active([model, twin], ["default", "two"])
    model.train(), twin.train()
    x = torch.randn(6, 13)
    model(x).square().sum().backward()
    twin(x).square().sum().backward()
    grads = {n: p.grad for n, p in twin.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    for name, p in model.named_parameters():
        if name in grads:
            torch.testing.assert_close(p.grad, grads[name], rtol=1e-4, atol=1e-5)


def test_scaling_and_dropout_read_at_every_call(monkeypatch):
    config = lora_config(lora_dropout=0.25)
    model, twin, twin64 = peft_pair(config, extra=[("two", lora_config(r=2))])
    set_active([model, twin, twin64], ["default", "two"])
    spy = OpSpy(monkeypatch, "forward")
    model.train()
    x = torch.randn(4, 13)
    model(x)
    assert spy.calls[0][7] == [0.25, 0.0]  # dropout rates, training
    assert spy.scale() == per_rank([5 / 3, 5 / 2], [3, 2])
    for m in (model, twin, twin64):
        m.eval()
        m.base_model.model.up.set_scale("two", 0.5)
    spy.calls.clear()
    check_matches(model, twin, twin64, x)
    assert spy.scale() == per_rank([5 / 3, 0.5 * 5 / 2], [3, 2]) and spy.calls[0][7] == [0.0, 0.0]
    # PEFT code (and users) assign scaling entries directly: the next call sees it
    for m in (model, twin, twin64):
        m.base_model.model.up.scaling["default"] = 0.25
    spy.calls.clear()
    check_matches(model, twin, twin64, x)
    assert spy.scale() == per_rank([0.25, 0.5 * 5 / 2], [3, 2])


def test_dropout_changes_training_output_only():
    model, _, _ = peft_pair(lora_config(lora_dropout=0.5))
    x = torch.randn(8, 13)
    model.eval()
    a, b = model(x), model(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    model.train()
    c = model(x)
    assert (c - a).abs().max() > 1e-3


def test_mixed_batch_adapter_names_one_rows_call_per_layer(monkeypatch):
    model, twin, twin64 = peft_pair(extra=[("two", lora_config(r=7, lora_alpha=2))])
    for m in (model, twin, twin64):
        m.eval()
    spy = OpSpy(monkeypatch, "rows_forward")
    names = ["two", "__base__", "default", "two", "default"]
    x = torch.randn(5, 3, 13)
    check_matches(model, twin, twin64, x, adapter_names=names)
    assert len(spy.calls) == 3
    with pytest.raises(ValueError, match="adapter_names"):
        model(x, adapter_names=names[:4])


def test_disable_adapter_gives_base_output():
    model, twin, twin64 = peft_pair()
    x = torch.randn(4, 13)
    with model.disable_adapter(), twin.disable_adapter(), twin64.disable_adapter():
        check_matches(model, twin, twin64, x)
    check_matches(model, twin, twin64, x)


def delta64(layer, names):
    total = 0
    for n in names:
        a = layer.lora_A[n].weight.double()
        b = layer.lora_B[n].weight.double()
        total = total + layer.scaling[n] * (b @ a)
    return total


def test_merge_unmerge_in_place_one_rounding(monkeypatch):
    model, twin, twin64 = peft_pair(extra=[("two", lora_config(r=2, lora_alpha=9))])
    set_active([model, twin, twin64], ["default", "two"])
    spy = CallSpy(monkeypatch, "merge_")
    layer = model.base_model.model.up
    w0 = layer.base_layer.weight.detach().clone()
    ptr = layer.base_layer.weight.data_ptr()
    expected = w0.double() + delta64(layer, ["default", "two"])
    x = torch.randn(4, 13)
    unmerged = model(x).detach()
    model.merge_adapter()
    twin.merge_adapter()
    assert len(spy.calls) == 6 and layer.merged_adapters == ["default", "two"]
    assert layer.base_layer.weight.data_ptr() == ptr, "merge must write the weight in place"
    # two merge_ calls round twice; PEFT's merge (two deltas added in float32) is the yardstick
    assert_close_vs_reference(
        layer.base_layer.weight.detach(), expected, twin.base_model.model.up.base_layer.weight.detach(), atol=1e-7
    )
    torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    assert not layer.merged
    torch.testing.assert_close(layer.base_layer.weight.detach(), w0, rtol=0, atol=1e-6)
    check_matches(model, twin.unmerge_adapter() or twin, twin64, x)


def test_merge_and_unload_and_safe_merge():
    model, twin, twin64 = peft_pair()
    x = torch.randn(4, 13)
    expected = twin64(x.double())
    merged = model.merge_and_unload(safe_merge=True)
    assert type(merged.up) is nn.Linear
    assert_close_vs_reference(merged(x).detach(), expected, twin.merge_and_unload()(x).detach(), atol=1e-6)


def test_safe_merge_of_broken_adapter_raises_and_leaves_weight():
    model, _, _ = peft_pair()
    layer = model.base_model.model.down
    with torch.no_grad():
        layer.lora_B["default"].weight[2, 1] = float("inf")
    w0 = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="NaNs detected"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, w0) and not layer.merged


def test_delete_and_add_weighted_adapter():
    second = lora_config(r=2, lora_alpha=4)
    model, twin, twin64 = peft_pair(extra=[("two", second)])
    for m in (model, twin, twin64):
        m.add_weighted_adapter(["default", "two"], [0.7, -1.3], "mix", combination_type="cat")
        m.base_model.set_adapter("mix")
        m.delete_adapter("default")
    assert "default" not in model.base_model.model.up.lora_A
    check_matches(model, twin, twin64, torch.randn(3, 13))


def test_rescale_adapter_scale():
    from peft.helpers import rescale_adapter_scale

    model, twin, twin64 = peft_pair()
    x = torch.randn(3, 13)
    with rescale_adapter_scale(model, 0.3), rescale_adapter_scale(twin, 0.3), rescale_adapter_scale(twin64, 0.3):
        check_matches(model, twin, twin64, x)
    check_matches(model, twin, twin64, x)


@pytest.mark.skipif(
    os.environ.get("FUSED_LORA_BACKEND") == "triton",
    reason="the Triton interpreter corrupts bfloat16 (triton-lang/triton#11584)",
)
def test_fp32_adapters_over_bf16_base():
    model, twin, twin64 = peft_pair(dtype=torch.bfloat16)
    layer = model.base_model.model.up
    assert layer.base_layer.weight.dtype == torch.bfloat16 and layer.lora_A["default"].weight.dtype == torch.float32
    x = torch.randn(6, 13).to(torch.bfloat16)
    out = check_matches(model, twin, twin64, x, atol=1e-2)
    assert out.dtype == torch.bfloat16
    # merge: one rounding of W + s B A (ours) vs PEFT's delta rounded to bf16 then added
    expected = layer.base_layer.weight.double() + delta64(layer, ["default"])
    model.merge_adapter()
    twin.merge_adapter()
    assert_close_vs_reference(
        layer.base_layer.weight.detach(), expected, twin.base_model.model.up.base_layer.weight.detach(), atol=1e-7
    )


def test_lora_bias_forward_grad_and_merge():
    model, twin, twin64 = peft_pair(lora_config(lora_bias=True, target_modules=["up", "down"]), n_layers=2)
    for m in (model, twin, twin64):
        for name, p in m.named_parameters():
            if "lora_B" in name and name.endswith("bias"):
                with torch.no_grad():
                    p.copy_(torch.linspace(-1, 1, p.numel()))
    x = torch.randn(4, 13)
    check_matches(model, twin, twin64, x).sum().backward()
    twin(x).sum().backward()
    bias_grad = model.base_model.model.up.lora_B["default"].bias.grad
    torch.testing.assert_close(bias_grad, twin.base_model.model.up.lora_B["default"].bias.grad)
    model.merge_adapter()
    twin.merge_adapter()
    torch.testing.assert_close(model(x), twin(x), rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(
        model.base_model.model.up.base_layer.bias, twin64.base_model.model.up.base_layer.bias.float(), rtol=0, atol=1e-6
    )


def test_dora_adapter_runs_peft_code_with_one_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, twin, twin64 = peft_pair(extra=[("dora", lora_config(r=2, use_dora=True))])
    messages = [str(w.message) for w in caught if "not fused" in str(w.message)]
    assert len(messages) == 1 and "dora" in messages[0]
    layer = model.base_model.model.up
    assert layer.fused_unsupported_adapters == ["dora"]
    x = torch.randn(4, 13)
    set_active([model, twin, twin64], ["default", "dora"])
    check_matches(model, twin, twin64, x)
    set_active([model, twin, twin64], ["dora"])
    check_matches(model, twin, twin64, x)
    model.merge_adapter()
    twin.merge_adapter()
    torch.testing.assert_close(model(x), twin(x), rtol=1e-5, atol=1e-5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(x)
    assert not [w for w in caught if "not fused" in str(w.message)]


def test_register_builds_fused_layers_and_save_load_roundtrip(tmp_path):
    config = lora_config()
    register(config)
    base = TinyNet()
    base_state = copy.deepcopy(base.state_dict())
    model = get_peft_model(base, config)
    assert type(model.base_model.model.up) is FusedPeftLoraLinear
    x = torch.randn(3, 13)
    out = model(x)
    model.save_pretrained(tmp_path)
    plain = get_peft_model(TinyNet(), lora_config())
    assert set(plain.state_dict()) == set(model.state_dict())
    fresh = TinyNet()
    fresh.load_state_dict(base_state)
    loaded = PeftModel.from_pretrained(fresh, tmp_path)
    assert type(loaded.base_model.model.up) is PeftLoraLinear
    assert patch_model(loaded) == 3
    torch.testing.assert_close(loaded(x), out, rtol=1e-6, atol=1e-6)


def test_register_rejects_non_lora_config():
    with pytest.raises(TypeError, match="LoraConfig"):
        register({"r": 8})
