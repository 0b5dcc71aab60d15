"""End to end: tiny transformers models + PEFT adapters trained two steps, merged by `fused-lora merge`,
loaded back by transformers; logits must match PEFT's own merge_and_unload of the saved adapters."""

from __future__ import annotations

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from fused_lora.merge_cli.cli import main  # noqa: E402

TOKENS = torch.tensor([[3, 17, 99, 5, 64, 2, 127, 40, 8], [1, 2, 3, 4, 5, 6, 7, 8, 9]])


def llama_config():
    return transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        attention_bias=True,
        max_position_embeddings=32,
    )


def gpt2_config():
    return transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=32)


def load(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def logits(model):
    with torch.no_grad():
        return model(TOKENS).logits.double()


def train_two_steps(model):
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    for _ in range(2):
        loss = model(TOKENS, labels=TOKENS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def make_adapter(base_dir, config, out_dir, seed):
    torch.manual_seed(seed)
    model = peft.get_peft_model(load(base_dir), config)
    train_two_steps(model)
    model.save_pretrained(out_dir)
    return out_dir


def peft_merged(base_dir, adapters):
    """PEFT's merge of the saved adapters (adapter dir, weight): scaling multiplied by the weight."""
    model = load(base_dir)
    first, w0 = adapters[0]
    model = peft.PeftModel.from_pretrained(model, first, adapter_name="a0")
    for i, (folder, _w) in enumerate(adapters[1:], 1):
        model.load_adapter(folder, adapter_name=f"a{i}")
    for module in model.modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            for i, (_f, w) in enumerate(adapters):
                if f"a{i}" in module.scaling:
                    module.scaling[f"a{i}"] *= w
    return model.merge_and_unload(adapter_names=[f"a{i}" for i in range(len(adapters))])


def merge(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def assert_same_logits(ours, theirs, tol=2e-5):
    diff = (ours - theirs).abs().max().item()
    assert diff <= tol * max(1.0, theirs.abs().max().item()), diff


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(llama_config())
    model.save_pretrained(root / "base")
    model.save_pretrained(root / "sharded", max_shard_size="60KB")
    assert os.path.exists(root / "sharded" / "model.safetensors.index.json")
    a1 = make_adapter(
        root / "base",
        peft.LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "up_proj"],
            lora_bias=False,
            rank_pattern={"up_proj": 2},
            alpha_pattern={"v_proj": 3},
        ),
        root / "a1",
        1,
    )
    a2 = make_adapter(
        root / "base",
        peft.LoraConfig(r=3, lora_alpha=5, target_modules=["q_proj", "o_proj"], lora_bias=True, use_rslora=True),
        root / "a2",
        2,
    )
    return root, a1, a2


def test_llama_single_file(llama, capsys):
    root, a1, _a2 = llama
    out = merge(["--base", root / "base", "--adapter", a1, "--out", root / "m1"], capsys)
    assert "verified" in out
    assert_same_logits(logits(load(root / "m1")), logits(peft_merged(root / "base", [(a1, 1.0)])))
    assert sorted(os.listdir(root / "m1")) == sorted(os.listdir(root / "base"))


def test_llama_sharded_two_weighted_adapters_with_lora_bias_rslora(llama, capsys):
    root, a1, a2 = llama
    merge(
        [
            "--base",
            root / "sharded",
            "--adapter",
            f"{a1}:0.7",
            "--adapter",
            f"{a2}:1.3",
            "--out",
            root / "m2",
            "--quiet",
        ],
        capsys,
    )
    assert sorted(os.listdir(root / "m2")) == sorted(os.listdir(root / "sharded"))
    with (
        open(root / "m2" / "model.safetensors.index.json") as f,
        open(root / "sharded" / "model.safetensors.index.json") as g,
    ):
        assert json.load(f)["weight_map"] == json.load(g)["weight_map"]
    reference = logits(peft_merged(root / "base", [(a1, 0.7), (a2, 1.3)]))
    assert_same_logits(logits(load(root / "m2")), reference)
    assert (reference - logits(load(root / "base"))).abs().max() > 1e-3  # the adapters do change the output


def test_llama_adalora_with_rank_pattern(llama, capsys):
    root, _a1, _a2 = llama
    torch.manual_seed(3)
    config = peft.AdaLoraConfig(init_r=6, target_r=3, total_step=10, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    model = peft.get_peft_model(load(root / "base"), config)
    train_two_steps(model)
    with torch.no_grad():  # two steps from lora_E = 0 barely move the output: make the delta visible
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.mul_(20.0 if "lora_E" in name else 4.0)
    # what AdaLoRA's budget allocation leaves behind: a mask per module; saving trims the tensors to it
    model.peft_config["default"].rank_pattern = {
        "model.layers.0.self_attn.q_proj.lora_E.default": [True, False, True, True, False, True],
        "model.layers.1.self_attn.v_proj.lora_E.default": [False, True, False, False, False, True],
    }
    model.save_pretrained(root / "ada")
    merge(["--base", root / "base", "--adapter", root / "ada", "--out", root / "m3"], capsys)
    reference = logits(peft.PeftModel.from_pretrained(load(root / "base"), root / "ada").merge_and_unload())
    assert_same_logits(logits(load(root / "m3")), reference)
    assert (reference - logits(load(root / "base"))).abs().max() > 1e-2


def test_llama_pissa_initial_adapter(llama, capsys):
    root, _a1, _a2 = llama
    torch.manual_seed(4)
    model = peft.get_peft_model(
        load(root / "base"),
        peft.LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "down_proj"], init_lora_weights="pissa"),
    )
    model.peft_config["default"].init_lora_weights = True  # PEFT's recipe: the saved init loads as plain LoRA
    model.save_pretrained(root / "pissa_init")
    train_two_steps(model)
    model.save_pretrained(root / "pissa")
    model.save_pretrained(root / "pissa_converted", path_initial_model_for_weight_conversion=root / "pissa_init")
    merge(
        [
            "--base",
            root / "base",
            "--adapter",
            root / "pissa",
            "--initial-adapter",
            root / "pissa_init",
            "--out",
            root / "m4",
        ],
        capsys,
    )
    reference = peft.PeftModel.from_pretrained(load(root / "base"), root / "pissa_converted").merge_and_unload()
    assert_same_logits(logits(load(root / "m4")), logits(reference))
    assert_same_logits(logits(load(root / "m4")), logits(model.merge_and_unload()))
    assert (logits(reference) - logits(load(root / "base"))).abs().max() > 1e-3


def test_gpt2_fan_in_fan_out_lora_bias_rslora(tmp_path, capsys):
    torch.manual_seed(5)
    transformers.GPT2LMHeadModel(gpt2_config()).save_pretrained(tmp_path / "base")
    adapter = make_adapter(
        tmp_path / "base",
        peft.LoraConfig(
            r=4,
            lora_alpha=6,
            target_modules=["c_attn", "c_proj", "c_fc"],
            fan_in_fan_out=True,
            lora_bias=True,
            use_rslora=True,
        ),
        tmp_path / "ad",
        6,
    )
    merge(["--base", tmp_path / "base", "--adapter", adapter, "--out", tmp_path / "out"], capsys)
    reference = logits(peft_merged(tmp_path / "base", [(adapter, 1.0)]))
    assert_same_logits(logits(load(tmp_path / "out")), reference)
    assert (reference - logits(load(tmp_path / "base"))).abs().max() > 1e-3
