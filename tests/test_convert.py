"""OLoRA/PiSSA-trained adapters become plain LoRA adapters for the original base with identical outputs."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

from fused_lora.convert import (
    converted_alpha,
    converted_config,
    mutated_to_lora,
    mutated_to_lora_dir,
    mutated_to_lora_tensors,
)


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(19, 23)
        self.down = nn.Linear(23, 7, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def mutated_config(init, rslora):
    return LoraConfig(
        r=3,
        lora_alpha=6,
        target_modules=["up", "down"],
        init_lora_weights=init,
        use_rslora=rslora,
        rank_pattern={"down": 5},
        alpha_pattern={"down": 4},
    )


def clone_sd(sd):
    return {k: v.detach().clone() for k, v in sd.items()}


def train_mutated(init, rslora, save_initial=None):
    """(original base state, PEFT model after one SGD step, initial adapter state, trained adapter state)."""
    base = Mlp()
    original = copy.deepcopy(base.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns its own conversion does not support rslora/patterns
        model = get_peft_model(base, mutated_config(init, rslora))
    assert not torch.equal(model.base_model.model.up.base_layer.weight, original["up.weight"]), "base not mutated"
    initial = clone_sd(get_peft_model_state_dict(model))
    if save_initial is not None:
        model.save_pretrained(save_initial)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x = torch.randn(16, 19)
    (model(x) - torch.randn(16, 7)).square().mean().backward()
    opt.step()
    trained = clone_sd(get_peft_model_state_dict(model))
    assert not torch.equal(trained["base_model.model.up.lora_B.weight"], initial["base_model.model.up.lora_B.weight"])
    return original, model, initial, trained


def lora_config_from(cfg: dict) -> LoraConfig:
    names = {f.name for f in dataclasses.fields(LoraConfig)}
    return LoraConfig(**{k: v for k, v in cfg.items() if k in names})


@pytest.mark.parametrize("init,rslora", [("pissa", False), ("olora", True)])
def test_converted_adapter_reproduces_trained_model_on_original_base(init, rslora):
    original, model, initial, trained = train_mutated(init, rslora)
    x = torch.randn(9, 19)
    with torch.no_grad():
        expected = model(x)
    state_dict, cfg = mutated_to_lora(trained, initial, model.peft_config["default"])
    assert cfg["r"] == 6 and cfg["rank_pattern"] == {"down": 10} and cfg["init_lora_weights"] is True
    factor = math.sqrt(2) if rslora else 2
    assert cfg["lora_alpha"] == pytest.approx(6 * factor) and cfg["alpha_pattern"]["down"] == pytest.approx(4 * factor)
    json.dumps(cfg)  # savable as adapter_config.json
    base = Mlp()
    base.load_state_dict(original)
    plain = get_peft_model(base, lora_config_from(cfg))
    assert plain.base_model.model.down.r["default"] == 10
    result = set_peft_model_state_dict(plain, state_dict)
    assert not result.unexpected_keys
    torch.testing.assert_close(plain(x), expected, rtol=1e-5, atol=1e-5)


def test_folder_conversion_roundtrip(tmp_path):
    init_dir, trained_dir, out_dir = tmp_path / "init", tmp_path / "trained", tmp_path / "out"
    original, model, _, _ = train_mutated("pissa", False, save_initial=init_dir)
    model.save_pretrained(trained_dir)
    x = torch.randn(5, 19)
    with torch.no_grad():
        expected = model(x)
    assert mutated_to_lora_dir(trained_dir, init_dir, out_dir) == out_dir
    saved = json.loads((out_dir / "adapter_config.json").read_text())
    assert saved["r"] == 6 and saved["lora_alpha"] == 12 and saved["init_lora_weights"] is True
    base = Mlp()
    base.load_state_dict(original)
    loaded = PeftModel.from_pretrained(base, out_dir)
    torch.testing.assert_close(loaded(x), expected, rtol=1e-5, atol=1e-5)
    # the state-dict entry point on folders gives the same tensors
    sd, cfg = mutated_to_lora(str(trained_dir), str(init_dir))
    assert cfg == saved
    assert set(sd) == set(get_peft_model_state_dict(loaded))


def test_tensor_math_is_exact_concatenation():
    a, b, a0, b0 = torch.randn(3, 11), torch.randn(7, 3), torch.randn(3, 11), torch.randn(7, 3)
    a2, b2 = mutated_to_lora_tensors(a, b, a0, b0)
    assert a2.shape == (6, 11) and b2.shape == (7, 6)
    torch.testing.assert_close((b2.double() @ a2.double()), b.double() @ a.double() - b0.double() @ a0.double())
    assert converted_alpha(8, False) == 16 and converted_alpha(8, True) == pytest.approx(8 * math.sqrt(2))


def test_bad_inputs_are_named():
    sd = {"m.lora_A.weight": torch.randn(2, 5), "m.lora_B.weight": torch.randn(4, 2)}
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4}
    with pytest.raises(ValueError, match="initial state dict has no 'm.lora_A.weight'"):
        mutated_to_lora(sd, {}, cfg)
    with pytest.raises(ValueError, match="same shapes"):
        mutated_to_lora(sd, {"m.lora_A.weight": torch.randn(3, 5), "m.lora_B.weight": torch.randn(4, 3)}, cfg)
    with pytest.raises(ValueError, match="config is required"):
        mutated_to_lora(sd, sd)
    with pytest.raises(ValueError, match="use_dora"):
        converted_config({**cfg, "use_dora": True})
    with pytest.raises(ValueError, match="without their lora_A"):
        mutated_to_lora({**sd, "n.lora_B.weight": torch.randn(4, 2)}, sd, cfg)
    with pytest.raises(ValueError, match="adapter_config.json: missing"):
        mutated_to_lora_dir("/nonexistent-folder", "/nonexistent-folder", "/tmp/unused")
