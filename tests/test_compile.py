"""torch.compile(fullgraph=True) over a patched PEFT model: one graph, no breaks, same outputs and gradients."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from peft import LoraConfig, get_peft_model
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

from fused_lora.integrations.peft import patch_model


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(13, 19)
        self.down = nn.Linear(19, 5, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def two_adapter_model(dropout=0.0):
    model = get_peft_model(
        Mlp(),
        LoraConfig(r=3, lora_alpha=6, target_modules=["up", "down"], init_lora_weights=False, lora_dropout=dropout),
    )
    model.add_adapter("two", LoraConfig(r=2, lora_alpha=3, target_modules=["up", "down"], init_lora_weights=False))
    model.base_model.set_adapter(["default", "two"])
    eager = copy.deepcopy(model)
    assert patch_model(model) == 2 and patch_model(eager) == 2
    return model, eager


def compiled(model):
    counter = CompileCounterWithBackend("aot_eager")  # fake impls + autograd without a C++ toolchain
    return torch.compile(model, backend=counter, fullgraph=True), counter


@pytest.mark.parametrize("training", [False, True])
def test_no_graph_breaks(training):
    model, _ = two_adapter_model(dropout=0.1)
    model.train(training)
    explanation = torch._dynamo.explain(model)(torch.randn(4, 13))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_inference_and_training_step_match_eager():
    model, eager = two_adapter_model()
    fast, counter = compiled(model)
    x = torch.randn(2, 3, 13)
    model.eval(), eager.eval()
    with torch.no_grad():
        torch.testing.assert_close(fast(x), eager(x), rtol=1e-5, atol=1e-6)
    model.train(), eager.train()
    fast(x).square().sum().backward()
    eager(x).square().sum().backward()
    ref = dict(eager.named_parameters())
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, ref[name].grad, rtol=1e-5, atol=1e-6)
    assert counter.frame_count >= 1


def test_mixed_batch_adapter_names_compiles_fullgraph():
    # PeftModel.forward(adapter_names=...) registers hooks while it runs, which dynamo cannot put in one graph
    # (PEFT's design, not ours); the fused layer itself, called with adapter_names, compiles to one graph
    model, eager = two_adapter_model()
    model.eval(), eager.eval()
    layer, eager_layer = model.base_model.model.up, eager.base_model.model.up
    names = ["two", "__base__", "default", "two"]
    counter = CompileCounterWithBackend("aot_eager")
    fast = torch.compile(lambda x: layer(x, adapter_names=names), backend=counter, fullgraph=True)
    x = torch.randn(4, 3, 13)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), eager_layer(x, adapter_names=names), rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 1


def test_dropout_training_compiles_and_differs_from_eval():
    model, _ = two_adapter_model(dropout=0.5)
    fast, _ = compiled(model)
    x = torch.randn(8, 13)
    model.train()
    a = fast(x)
    model.eval()
    b = fast(x)
    assert torch.isfinite(a).all() and (a - b).abs().max() > 1e-4


def test_llama_model_compiles_fullgraph():
    transformers = pytest.importorskip("transformers")
    from peft import get_peft_model as make

    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=64,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    model = make(
        transformers.LlamaForCausalLM(config),
        LoraConfig(r=2, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False),
    )
    eager = copy.deepcopy(model)
    assert patch_model(model) == 3
    model.eval(), eager.eval()
    fast, counter = compiled(model)
    ids = torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(fast(input_ids=ids).logits, eager(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1


def _fused_layer():
    from fused_lora import FusedLoRALinear

    layer = FusedLoRALinear.from_linear(
        nn.Linear(13, 7), "a", r=3, lora_alpha=6, init_lora_weights=False, lora_dropout=0.1
    )
    layer.add_adapter("b", 2, 3, init_lora_weights=False, lora_bias=True)
    with torch.no_grad():
        for p in layer.lora_B.parameters():
            p.normal_()
    layer.set_adapter(["a", "b"])
    return layer


@pytest.mark.parametrize("call", ["one", "two", "adapter_ids", "adapter_names"])
@pytest.mark.parametrize("training", [False, True])
def test_fused_layer_compiles_fullgraph_with_its_plan(call, training):
    """FusedLoRALinear's plan is built at trace time (never stored): one graph, no breaks, eager's outputs."""
    layer = _fused_layer().train(training)
    eager = copy.deepcopy(layer)
    if call == "one":
        layer.set_adapter("b"), eager.set_adapter("b")
    ids = torch.tensor([1, -1, 0, 1])
    names = ["b", "__base__", "a", "b"]
    kwargs = (
        {"adapter_ids": ids} if call == "adapter_ids" else {"adapter_names": names} if call == "adapter_names" else {}
    )
    counter = CompileCounterWithBackend("aot_eager")
    fast = torch.compile(lambda x: layer(x, **kwargs), backend=counter, fullgraph=True)
    x = torch.randn(4, 13)
    if training:  # dropout: the same seed gives the same mask on both sides
        torch.manual_seed(3)
        y = fast(x)
        torch.manual_seed(3)
        y_eager = eager(x, **kwargs)
        y.square().sum().backward()
        y_eager.square().sum().backward()
        ref = dict(eager.named_parameters())
        for name, p in layer.named_parameters():
            if p.grad is not None or ref[name].grad is not None:
                torch.testing.assert_close(p.grad, ref[name].grad, rtol=1e-5, atol=1e-6)
    else:
        with torch.no_grad():
            y, y_eager = fast(x), eager(x, **kwargs)
    torch.testing.assert_close(y, y_eager, rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 1
    assert layer.__dict__.get("_fused_lora_plan") is None and layer.__dict__.get("_fused_lora_rows_plan") is None
