"""A small Llama-style transformers model with LoRA on every projection: patched == unpatched (logits, 20 training
steps of losses, generate with mixed-batch adapter_names). Built from a LlamaConfig; nothing is downloaded."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

import fused_lora
from fused_lora.integrations.peft import patch_model

transformers = pytest.importorskip("transformers")

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama():
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return transformers.LlamaForCausalLM(config)


def lora(r=4, alpha=8):
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=PROJECTIONS, init_lora_weights=False)


def patched_and_plain(extra_adapter=False):
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), lora())
    if extra_adapter:
        model.add_adapter("other", lora(r=3, alpha=5))
    plain = copy.deepcopy(model)
    assert patch_model(model) == 2 * len(PROJECTIONS)
    return model, plain


def test_logits_and_twenty_training_steps_match(monkeypatch):
    model, plain = patched_and_plain()
    calls = []  # every fused layer call reaches the op boundary's eager entry (fused_lora/plan.py -> ops.forward)
    original = fused_lora.ops.forward
    monkeypatch.setattr(fused_lora.ops, "forward", lambda *a, **k: calls.append(1) or original(*a, **k))
    ids = torch.randint(3, 128, (2, 11))
    model.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    assert len(calls) == 2 * len(PROJECTIONS)

    losses = {}
    batch = torch.randint(3, 128, (2, 9))  # one batch, memorised: the loss must fall
    for name, m in (("fused", model), ("peft", plain)):
        m.train()
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=2e-3)
        losses[name] = []
        for _ in range(20):
            loss = m(input_ids=batch, labels=batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[name].append(loss.item())
    assert losses["fused"][-1] < losses["fused"][0], "training did not reduce the loss"
    torch.testing.assert_close(torch.tensor(losses["fused"]), torch.tensor(losses["peft"]), rtol=1e-4, atol=1e-4)


def test_generate_with_mixed_batch_adapter_names(monkeypatch):
    model, plain = patched_and_plain(extra_adapter=True)
    model.eval(), plain.eval()
    calls = []
    original = fused_lora.ops.rows_forward
    monkeypatch.setattr(fused_lora.ops, "rows_forward", lambda *a, **k: calls.append(1) or original(*a, **k))
    ids = torch.randint(3, 128, (3, 6))
    names = ["default", "other", "__base__"]
    kwargs = dict(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, adapter_names=names
    )
    out = model.generate(**kwargs)
    assert calls, "mixed-batch generation did not use the fused rows path"
    assert torch.equal(out, plain.generate(**kwargs))
    # each row equals generating that row alone with its adapter (or the base model)
    with model.disable_adapter():
        alone = model.generate(
            input_ids=ids[2:], attention_mask=torch.ones_like(ids[2:]), max_new_tokens=6, do_sample=False
        )
    assert torch.equal(out[2:], alone)
