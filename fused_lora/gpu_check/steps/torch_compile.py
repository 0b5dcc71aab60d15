"""Step `compile`: torch.compile(fullgraph=True) of a tiny Llama whose PEFT LoRA layers are patched to fused_lora,
equal to the same patched model run eagerly (tests/test_compile.py is the CPU version).

GPU: inductor, float32 (so "equal" can be tight: the fused ops are opaque to inductor, which only fuses the
model's own pointwise work around them); the full run adds a training step and compares every LoRA gradient.
fullgraph=True makes any graph break an error. Dry run: the CPU with the aot_eager backend (no C++ toolchain
needed), forward only.
"""

from __future__ import annotations

import copy
import time

import torch

from fused_lora.gpu_check.context import FAILED, OK, Context, result

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RTOL, ATOL = 1e-4, 1e-5


def build(device: torch.device, dtype: torch.dtype, layers: int):
    import transformers
    from peft import LoraConfig, get_peft_model

    from fused_lora.integrations.peft import patch_model

    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config).to(device=device, dtype=dtype)
    model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, init_lora_weights=False)
    )
    eager = copy.deepcopy(model)
    patched = patch_model(model)
    if patched != patch_model(eager) or patched != layers * len(TARGETS):
        raise RuntimeError(f"patch_model switched {patched} layers, expected {layers * len(TARGETS)}")
    return model, eager


def _close(name: str, got: torch.Tensor, want: torch.Tensor) -> str:
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")
    return f"{name} max diff {(got - want).abs().max().item():.2e}"


def run(ctx: Context) -> dict:
    from torch._dynamo.testing import CompileCounterWithBackend

    device = torch.device(ctx.device)
    backend = "inductor" if device.type == "cuda" else "aot_eager"
    torch._dynamo.reset()
    layers = 1 if ctx.dry_run else 2
    model, eager = build(device, torch.float32, layers)
    counter = CompileCounterWithBackend(backend)
    fast = torch.compile(model, backend=counter, fullgraph=True)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1)).to(device)
    notes = []
    model.eval()
    eager.eval()
    began = time.time()
    with torch.no_grad():
        got = fast(input_ids=ids).logits
        want = eager(input_ids=ids).logits
    notes.append(_close("eval logits", got, want) + f" (compile + run {time.time() - began:.0f}s)")
    if not ctx.quick:
        model.train()
        eager.train()
        began = time.time()
        fast(input_ids=ids, labels=ids).loss.backward()
        eager(input_ids=ids, labels=ids).loss.backward()
        reference = dict(eager.named_parameters())
        worst, count = 0.0, 0
        for name, p in model.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(
                    p.grad, reference[name].grad, rtol=RTOL, atol=ATOL, msg=lambda m, n=name: f"grad {n}: {m}"
                )
                worst = max(worst, (p.grad - reference[name].grad).abs().max().item())
                count += 1
        notes.append(f"training step: {count} LoRA gradients, max diff {worst:.2e} ({time.time() - began:.0f}s)")
    if counter.frame_count < 1:
        return result(FAILED, f"nothing was compiled (frame_count {counter.frame_count})")
    detail = (
        f"torch.compile(fullgraph=True, backend={backend}) of a patched {layers}-layer Llama on {device.type}, "
        f"float32, {counter.frame_count} graph(s), equal to eager: " + "; ".join(notes)
    )
    return result(OK, detail, data={"backend": backend, "frames": counter.frame_count, "notes": notes})
