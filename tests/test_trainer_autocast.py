"""Mixed-precision training of a patched PEFT Llama on the CPU: transformers.Trainer(bf16=True), and float16
autocast with a GradScaler (accelerate runs Trainer(fp16=True) on the CPU without autocast, so that case is a
plain training loop doing what Trainer(fp16=True) does on a GPU).

The model keeps float32 master weights; under autocast the attention output reaching o_proj (and every layer
after an autocast op) is already bfloat16/float16, so the fused layers see low-precision x over float32 weights,
as in every mixed-precision fine-tune.

Two judgements:
- first step (deterministic): loss and every LoRA gradient against float64 PEFT, within twice PEFT's own
  mixed-precision error (the project's yardstick), plus half a rounding unit of the loss for the loss;
- training curve: the fused and the PEFT losses round at different places, and AdamW turns tiny gradient
  differences into full-size steps on near-zero entries, so the curves drift apart by amounts unrelated to either
  one's accuracy. Allowed gap per step: twice PEFT's own distance from its float32 curve plus two rounding units
  of the loss in the autocast dtype (bfloat16 2^-8, float16 2^-11, relative). Measured here: bfloat16 gap 3.5e-3
  against a 4.1e-2 bound, float16 2.3e-3 against 5.5e-3; a missing or mis-scaled LoRA term or gradient moves the
  first-step check by orders of magnitude more.
"""

from __future__ import annotations

import copy

import pytest
import torch

import fused_lora

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from fused_lora.integrations.peft import patch_model  # noqa: E402

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
STEPS = 6


def _peft_llama():
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
    torch.manual_seed(0)
    lora = peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=PROJECTIONS, init_lora_weights=False
    )  # random B: the adapters matter from step one
    return peft.get_peft_model(transformers.LlamaForCausalLM(config), lora)


class _Batches(torch.utils.data.Dataset):
    """Four random sequences, one batch of four: every step sees the same batch, so the loss must fall."""

    def __init__(self):
        generator = torch.Generator().manual_seed(1)
        self.ids = torch.randint(3, 128, (4, 12), generator=generator)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _train_with_trainer(model, precision: str, tmp_path) -> list[float]:
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / precision),
        use_cpu=True,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        per_device_train_batch_size=4,
        max_steps=STEPS,
        learning_rate=1e-2,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Batches())
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == STEPS
    return losses


def _train_with_autocast_loop(model, dtype) -> list[float]:
    """Trainer(fp16=True)'s recipe by hand: forward under autocast, loss scaled by a GradScaler, AdamW."""
    batch = _Batches().ids
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, enabled=dtype is not None)
    model.train()
    losses = []
    for _ in range(STEPS):
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())
    return losses


def _train(model, precision: str, tmp_path) -> list[float]:
    if precision == "fp16":
        return _train_with_autocast_loop(model, torch.float16)
    if precision == "fp16_baseline":
        return _train_with_autocast_loop(model, None)
    return _train_with_trainer(model, precision, tmp_path)


@pytest.fixture(scope="module")
def peft_model():
    return _peft_llama()


@pytest.fixture(scope="module")
def float32_losses(peft_model, tmp_path_factory):
    """PEFT without autocast, per recipe: {"bf16": Trainer in float32, "fp16": the loop in float32}."""
    return {
        "bf16": _train(copy.deepcopy(peft_model), "fp32", tmp_path_factory.mktemp("fp32")),
        "fp16": _train(copy.deepcopy(peft_model), "fp16_baseline", None),
    }


UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
MIXED = [("bf16", torch.bfloat16), ("fp16", torch.float16)]


def _skip_without_cpu_autocast():
    if not torch.amp.autocast_mode.is_autocast_available("cpu"):
        pytest.skip("this torch has no CPU autocast")


def _loss_and_lora_grads(model, autocast):
    batch = _Batches().ids
    with torch.autocast("cpu", dtype=autocast or torch.float32, enabled=autocast is not None):
        loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    return loss.item(), {n: p.grad.double() for n, p in model.named_parameters() if p.requires_grad}


def _relative_error(grads, grads64):
    num = sum(float((grads[n] - grads64[n]).square().sum()) for n in grads64)
    return (num / sum(float(g.square().sum()) for g in grads64.values())) ** 0.5


@pytest.mark.parametrize("precision,low", MIXED)
def test_first_step_loss_and_gradients_against_float64(monkeypatch, peft_model, precision, low):
    _skip_without_cpu_autocast()
    fused = copy.deepcopy(peft_model)
    patch_model(fused)
    calls = []
    original = fused_lora.lora_linear
    monkeypatch.setattr(fused_lora, "lora_linear", lambda *a, **k: calls.append(1) or original(*a, **k))
    loss, grads = _loss_and_lora_grads(fused, low)
    monkeypatch.undo()
    assert len(calls) == 2 * len(PROJECTIONS)
    peft_loss, peft_grads = _loss_and_lora_grads(copy.deepcopy(peft_model), low)
    loss64, grads64 = _loss_and_lora_grads(copy.deepcopy(peft_model).double(), None)
    assert abs(loss - loss64) <= 2 * abs(peft_loss - loss64) + 0.5 * UNIT_ROUNDOFF[low] * abs(loss64), (
        f"loss {loss} vs float64 {loss64} (PEFT {precision}: {peft_loss})"
    )
    ours_err, peft_err = _relative_error(grads, grads64), _relative_error(peft_grads, grads64)
    assert ours_err <= 2 * peft_err + 1e-6, f"LoRA gradients: relative error {ours_err:.3e} > 2 x PEFT's {peft_err:.3e}"


@pytest.mark.parametrize("precision,low", MIXED)
def test_mixed_precision_training_losses_follow_peft(monkeypatch, tmp_path, peft_model, float32_losses, precision, low):
    _skip_without_cpu_autocast()
    fused = copy.deepcopy(peft_model)
    assert patch_model(fused) == 2 * len(PROJECTIONS)
    seen = []
    original = fused_lora.lora_linear
    monkeypatch.setattr(
        fused_lora, "lora_linear", lambda x, w, *a, **k: seen.append((x.dtype, w.dtype)) or original(x, w, *a, **k)
    )
    fused_losses = _train(fused, precision, tmp_path)
    monkeypatch.undo()
    peft_losses = _train(copy.deepcopy(peft_model), precision, tmp_path)

    assert len(seen) >= STEPS * 2 * len(PROJECTIONS), "the fused path did not run for every projection"
    assert (low, torch.float32) in set(seen), f"no low-precision x over float32 weights among {set(seen)}"
    assert fused_losses[-1] < fused_losses[0] - 0.05, f"training did not reduce the loss: {fused_losses}"
    float32_losses = float32_losses[precision]
    noise = max(abs(p - f) for p, f in zip(peft_losses, float32_losses))
    for step, (ours, peft_loss) in enumerate(zip(fused_losses, peft_losses)):
        bound = 2 * noise + 2 * UNIT_ROUNDOFF[low] * abs(peft_loss)
        assert abs(ours - peft_loss) <= bound, (
            f"step {step}: fused {fused_losses} vs PEFT {peft_losses}: gap {abs(ours - peft_loss):.4g} > {bound:.4g} "
            f"(PEFT's own {precision}-vs-float32 distance {noise:.4g}; float32 curve {float32_losses})"
        )
