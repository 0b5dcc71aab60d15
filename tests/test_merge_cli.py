"""`fused-lora merge` on small synthetic checkpoints written with safetensors (no transformers): math, layout,
metadata, atomic output and every kind of bad input (exit code 2, one line on stderr, nothing left behind)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fused_lora.merge_cli.cli import main

P = "base_model.model."


def write_base(folder, tensors, shards=None, extra_files=("config.json", "tokenizer.json")):
    """tensors: name -> tensor. shards: list of name lists (sharded with an index) or None (one file)."""
    os.makedirs(folder, exist_ok=True)
    for name in extra_files:
        with open(os.path.join(folder, name), "w") as f:
            json.dump({"file": name}, f)
    if shards is None:
        save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, names in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n] for n in names}, os.path.join(folder, fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in names})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)


def write_adapter(folder, tensors, **config):
    os.makedirs(folder, exist_ok=True)
    cfg = {
        "peft_type": "LORA",
        "r": 4,
        "lora_alpha": 8,
        "use_rslora": False,
        "fan_in_fan_out": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "init_lora_weights": True,
        "modules_to_save": None,
    }
    cfg.update(config)
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(cfg, f)
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))


def lora_pair(module, n_out, k_in, r, dtype=torch.float32):
    return {
        f"{P}{module}.lora_A.weight": torch.randn(r, k_in, dtype=dtype),
        f"{P}{module}.lora_B.weight": torch.randn(n_out, r, dtype=dtype),
    }


def base_tensors(dtype=torch.float16):
    """Awkward sizes: 37x29 linear, a square 24x24 (fan_in_fan_out decides), an int buffer, a scalar."""
    return {
        "model.layers.0.q_proj.weight": torch.randn(37, 29).to(dtype),
        "model.layers.0.q_proj.bias": torch.randn(37).to(dtype),
        "model.layers.0.o_proj.weight": torch.randn(24, 24).to(dtype),
        "model.layers.1.up.weight": torch.randn(29, 37).to(dtype),
        "model.norm.weight": torch.randn(29).to(dtype),
        "model.position_ids": torch.arange(7, dtype=torch.int64),
        "model.scalar": torch.tensor(3.5, dtype=torch.float32),
    }


def merged_reference(weight, terms, transpose=False):
    """float64 W + sum s B A, rounded once to W's dtype (what one-rounding merge must produce, up to fp32 acc)."""
    total = weight.double()
    for a, b, s in terms:
        d = s * (b.double() @ a.double())
        total = total + (d.T if transpose else d)
    return total


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(code, err, out_dir, *needles):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    parent = os.path.dirname(str(out_dir))
    assert not os.path.exists(out_dir) or os.listdir(out_dir) == ["keep"], "output written despite the error"
    assert not [n for n in os.listdir(parent) if ".tmp-" in n or ".old-" in n], os.listdir(parent)


@pytest.fixture
def simple(tmp_path):
    torch.manual_seed(0)
    base = base_tensors()
    write_base(tmp_path / "base", base)
    ad = lora_pair("model.layers.0.q_proj", 37, 29, 4)
    ad.update(lora_pair("model.layers.1.up", 29, 37, 4))
    write_adapter(tmp_path / "ad", ad)
    return tmp_path, base, ad


def test_merge_single_file_math_dtype_and_bit_exact_copies(simple, capsys):
    tmp, base, ad = simple
    code, out, err = run(["--base", tmp / "base", "--adapter", tmp / "ad", "--out", tmp / "out"], capsys)
    assert code == 0, err
    assert "verified 2 tensor(s)" in out and "max relative error" in out
    got = load_file(tmp / "out" / "model.safetensors")
    assert set(got) == set(base)
    for name, t in base.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape
    for name in (
        "model.layers.0.q_proj.bias",
        "model.layers.0.o_proj.weight",
        "model.norm.weight",
        "model.position_ids",
        "model.scalar",
    ):
        assert torch.equal(
            got[name].view(torch.uint8) if got[name].dim() else got[name],
            base[name].view(torch.uint8) if base[name].dim() else base[name],
        ), name
    for module, w in (
        ("model.layers.0.q_proj", "model.layers.0.q_proj.weight"),
        ("model.layers.1.up", "model.layers.1.up.weight"),
    ):
        ref = merged_reference(base[w], [(ad[f"{P}{module}.lora_A.weight"], ad[f"{P}{module}.lora_B.weight"], 2.0)])
        # one rounding of the exact value (fp32 accumulation may flip a tie): at most 1 ulp of fp16 away
        assert (got[w].double() - ref).abs().max() <= (ref.abs() * 2**-11).max() + 2**-24
        assert torch.equal(got[w], ref.to(torch.float16)) or (got[w] != ref.to(torch.float16)).float().mean() < 0.01
    assert sorted(os.listdir(tmp / "out")) == ["config.json", "model.safetensors", "tokenizer.json"]
    with open(tmp / "out" / "config.json") as f:
        assert json.load(f) == {"file": "config.json"}


def test_metadata_records_adapters_and_keeps_original(simple, capsys):
    tmp, _base, _ad = simple
    code, _out, err = run(
        ["--base", tmp / "base", "--adapter", f"{tmp / 'ad'}:0.5", "--out", tmp / "out", "--quiet"], capsys
    )
    assert code == 0, err
    with safe_open(tmp / "out" / "model.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt"
    history = json.loads(meta["fused_lora.merges"])
    (record,) = history
    (adapter,) = record["adapters"]
    import hashlib

    with open(tmp / "ad" / "adapter_model.safetensors", "rb") as f:
        assert adapter["sha256"] == hashlib.sha256(f.read()).hexdigest()
    assert adapter["weight"] == 0.5 and adapter["scaling"] == pytest.approx(1.0)
    assert record["merged_tensors"] == ["model.layers.0.q_proj.weight", "model.layers.1.up.weight"]
    assert "fused_lora" in record["tool"] and meta["fused_lora.version"]


def test_sharded_weighted_adapters_one_rounding_bf16(tmp_path, capsys):
    torch.manual_seed(1)
    base = base_tensors(torch.bfloat16)
    names = list(base)
    write_base(tmp_path / "base", base, shards=[names[:2], names[2:5], names[5:]])
    a1 = lora_pair("model.layers.0.q_proj", 37, 29, 1)
    a2 = lora_pair("model.layers.0.q_proj", 37, 29, 7, torch.bfloat16)
    a2.update(lora_pair("model.layers.0.o_proj", 24, 24, 3))
    write_adapter(tmp_path / "a1", a1, r=1, lora_alpha=2)
    write_adapter(
        tmp_path / "a2", a2, r=7, lora_alpha=7, use_rslora=True, rank_pattern={"o_proj": 3}, alpha_pattern={"o_proj": 6}
    )
    code, out, err = run(
        [
            "--base",
            tmp_path / "base",
            "--adapter",
            f"{tmp_path / 'a1'}:0.25",
            "--adapter",
            f"{tmp_path / 'a2'}:-1.5",
            "--out",
            tmp_path / "out",
        ],
        capsys,
    )
    assert code == 0, err
    files = sorted(os.listdir(tmp_path / "out"))
    assert files == sorted(os.listdir(tmp_path / "base"))
    with (
        open(tmp_path / "out" / "model.safetensors.index.json") as f,
        open(tmp_path / "base" / "model.safetensors.index.json") as g,
    ):
        assert json.load(f)["weight_map"] == json.load(g)["weight_map"]
    got = {}
    for name in files:
        if name.endswith(".safetensors"):
            got.update(load_file(tmp_path / "out" / name))
    q = "model.layers.0.q_proj"
    ref = merged_reference(
        base[f"{q}.weight"],
        [
            (a1[f"{P}{q}.lora_A.weight"], a1[f"{P}{q}.lora_B.weight"], 0.25 * 2.0),
            (a2[f"{P}{q}.lora_A.weight"], a2[f"{P}{q}.lora_B.weight"], -1.5 * 7 / 7**0.5),
        ],
    )
    assert got[f"{q}.weight"].dtype == torch.bfloat16
    assert (got[f"{q}.weight"].double() - ref).abs().max() <= (ref.abs() * 2**-8).max() * 1.01
    o = "model.layers.0.o_proj"
    ref_o = merged_reference(
        base[f"{o}.weight"], [(a2[f"{P}{o}.lora_A.weight"], a2[f"{P}{o}.lora_B.weight"], -1.5 * 6 / 3**0.5)]
    )
    assert (got[f"{o}.weight"].double() - ref_o).abs().max() <= (ref_o.abs() * 2**-8).max() * 1.01


def test_fan_in_fan_out_square_and_lora_bias_and_prefix_mapping(tmp_path, capsys):
    """Base saved without the 'model.' prefix the adapter's paths carry; square weight stored [in, out]."""
    torch.manual_seed(2)
    base = {
        "layers.0.c_attn.weight": torch.randn(24, 24),
        "layers.0.c_attn.bias": torch.randn(24),
        "layers.0.c_fc.weight": torch.randn(24, 40),
        "layers.0.c_fc.bias": torch.randn(40),
    }
    write_base(tmp_path / "base", base)
    ad = lora_pair("model.layers.0.c_attn", 24, 24, 2)
    ad.update(lora_pair("model.layers.0.c_fc", 40, 24, 2))
    ad[f"{P}model.layers.0.c_attn.lora_B.bias"] = torch.randn(24)
    write_adapter(tmp_path / "ad", ad, r=2, lora_alpha=3, fan_in_fan_out=True, lora_bias=True)
    code, _out, err = run(
        ["--base", tmp_path / "base", "--adapter", tmp_path / "ad", "--out", tmp_path / "out"], capsys
    )
    assert code == 0, err
    got = load_file(tmp_path / "out" / "model.safetensors")
    for mod in ("c_attn", "c_fc"):
        ref = merged_reference(
            base[f"layers.0.{mod}.weight"],
            [(ad[f"{P}model.layers.0.{mod}.lora_A.weight"], ad[f"{P}model.layers.0.{mod}.lora_B.weight"], 1.5)],
            transpose=True,
        )
        assert (got[f"layers.0.{mod}.weight"].double() - ref).abs().max() < 1e-5
    bias_ref = base["layers.0.c_attn.bias"].double() + 1.5 * ad[f"{P}model.layers.0.c_attn.lora_B.bias"].double()
    assert (got["layers.0.c_attn.bias"].double() - bias_ref).abs().max() < 1e-6
    assert torch.equal(got["layers.0.c_fc.bias"], base["layers.0.c_fc.bias"])


def test_adalora_per_rank_scale(tmp_path, capsys):
    torch.manual_seed(3)
    base = base_tensors(torch.float32)
    write_base(tmp_path / "base", base)
    m = "model.layers.0.q_proj"
    ad = {
        f"{P}{m}.lora_A": torch.randn(3, 29),
        f"{P}{m}.lora_B": torch.randn(37, 3),
        f"{P}{m}.lora_E": torch.randn(3, 1),
    }
    write_adapter(
        tmp_path / "ad",
        ad,
        peft_type="ADALORA",
        init_r=5,
        r=8,
        lora_alpha=6,
        rank_pattern={f"{m}.lora_E": [True, False, True, True, False]},
    )
    code, _out, err = run(
        ["--base", tmp_path / "base", "--adapter", tmp_path / "ad", "--out", tmp_path / "out"], capsys
    )
    assert code == 0, err
    got = load_file(tmp_path / "out" / "model.safetensors")
    a, b, e = (ad[f"{P}{m}.{k}"].double() for k in ("lora_A", "lora_B", "lora_E"))
    ref = base[f"{m}.weight"].double() + b @ (a * e) * 6 / (5 + 1e-5)
    assert (got[f"{m}.weight"].double() - ref).abs().max() < 1e-5


def test_embedding_lora_replacements_and_stale_weight_files(tmp_path, capsys):
    """lora_embedding_A/B (delta (B A)^T on [vocab, dim]), a saved embedding base layer and modules_to_save
    replace base tensors; a pickle copy of the weights beside the shards is not shipped unmerged."""
    torch.manual_seed(5)
    base = {
        "model.embed_tokens.weight": torch.randn(50, 12),
        "lm_head.weight": torch.randn(50, 12),
        "model.norm.weight": torch.randn(12),
    }
    write_base(tmp_path / "base", base)
    (tmp_path / "base" / "pytorch_model.bin").write_bytes(b"stale")
    new_embed = torch.randn(50, 12)
    ad = {
        f"{P}model.embed_tokens.lora_embedding_A": torch.randn(3, 50),
        f"{P}model.embed_tokens.lora_embedding_B": torch.randn(12, 3),
        f"{P}model.embed_tokens.base_layer.weight": new_embed,
        f"{P}lm_head.weight": torch.randn(50, 12).to(torch.float64),
    }
    write_adapter(tmp_path / "ad", ad, r=3, lora_alpha=6, modules_to_save=["lm_head"])
    code, out, err = run(["--base", tmp_path / "base", "--adapter", tmp_path / "ad", "--out", tmp_path / "out"], capsys)
    assert code == 0, err
    assert "pytorch_model.bin" in out and not (tmp_path / "out" / "pytorch_model.bin").exists()
    got = load_file(tmp_path / "out" / "model.safetensors")
    a, b = ad[f"{P}model.embed_tokens.lora_embedding_A"], ad[f"{P}model.embed_tokens.lora_embedding_B"]
    ref = new_embed.double() + 2.0 * (b.double() @ a.double()).T
    assert (got["model.embed_tokens.weight"].double() - ref).abs().max() < 1e-5
    assert torch.equal(got["lm_head.weight"], ad[f"{P}lm_head.weight"].float())
    assert torch.equal(got["model.norm.weight"], base["model.norm.weight"])


def test_force_replaces_existing_out(simple, capsys):
    tmp, _base, _ad = simple
    os.makedirs(tmp / "out")
    (tmp / "out" / "keep").write_text("old")
    args = ["--base", tmp / "base", "--adapter", tmp / "ad", "--out", tmp / "out", "--quiet"]
    code, _out, err = run(args, capsys)
    assert_refused(code, err, tmp / "out", "already exists", "--force")
    assert (tmp / "out" / "keep").read_text() == "old"
    code, out, err = run(args + ["--force"], capsys)
    assert code == 0 and out == "" and err == ""
    assert sorted(os.listdir(tmp / "out")) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert not [n for n in os.listdir(tmp) if ".old-" in n or ".tmp-" in n]


def _corrupt(path, at, value):
    data = bytearray(path.read_bytes())
    data[at] = value
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "case",
    [
        "unmatched_key",
        "shape",
        "rank",
        "config_rank",
        "nonfinite",
        "truncated",
        "bad_header",
        "missing_index_entry",
        "missing_shard_entry",
        "pickle_only",
        "no_config",
        "dora",
        "overlap",
        "pissa_without_initial",
        "bad_weight",
        "lora_bias_without_base_bias",
        "overflow",
        "initial_mismatch",
    ],
)
def test_bad_input_exit_2_one_line_nothing_written(tmp_path, capsys, case):
    torch.manual_seed(4)
    base = base_tensors()
    write_base(tmp_path / "base", base, shards=[list(base)[:3], list(base)[3:]])
    m = "model.layers.0.q_proj"
    ad = lora_pair(m, 37, 29, 4)
    cfg = {}
    needles = [m]
    out = tmp_path / "out"
    extra = []
    if case == "unmatched_key":
        ad.update(lora_pair("model.layers.7.k_proj", 37, 29, 4))
        needles = ["model.layers.7.k_proj", "matches no base tensor"]
    elif case == "shape":
        ad = lora_pair(m, 36, 29, 4)
        needles = ["shape mismatch", "lora_A"]
    elif case == "rank":
        ad[f"{P}{m}.lora_B.weight"] = torch.randn(37, 3)
        needles = ["rank mismatch"]
    elif case == "config_rank":
        cfg = {"rank_pattern": {"q_proj": 8}}
        needles = ["rank mismatch", "r = 8"]
    elif case == "nonfinite":
        ad[f"{P}{m}.lora_B.weight"][3, 1] = float("nan")
        needles = ["adapter_model.safetensors", "lora_B", "non-finite"]
    elif case == "overflow":
        ad[f"{P}{m}.lora_B.weight"] *= 1e5
        needles = ["model-00001-of-00002.safetensors", f"{m}.weight", "non-finite"]
    elif case == "bad_weight":
        extra = ["--adapter", f"{tmp_path / 'ad'}:inf"]
        needles = ["not finite"]
    write_adapter(tmp_path / "ad", ad, **cfg)
    shard1 = tmp_path / "base" / "model-00001-of-00002.safetensors"
    if case == "truncated":
        shard1.write_bytes(shard1.read_bytes()[:-10])
        needles = ["model-00001-of-00002.safetensors", "truncated"]
    elif case == "bad_header":
        _corrupt(shard1, 9, ord("}"))
        needles = ["model-00001-of-00002.safetensors", "header"]
    elif case in ("missing_index_entry", "missing_shard_entry"):
        index_path = tmp_path / "base" / "model.safetensors.index.json"
        index = json.loads(index_path.read_text())
        if case == "missing_index_entry":
            del index["weight_map"]["model.norm.weight"]
            needles = ["model.safetensors.index.json", "model.norm.weight", "missing index entry"]
        else:
            index["weight_map"]["model.ghost"] = "model-00002-of-00002.safetensors"
            needles = ["model-00002-of-00002.safetensors", "model.ghost", "missing"]
        index_path.write_text(json.dumps(index))
    elif case == "pickle_only":
        os.remove(tmp_path / "ad" / "adapter_model.safetensors")
        (tmp_path / "ad" / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
        needles = ["adapter_model.bin", "convert"]
    elif case == "no_config":
        os.remove(tmp_path / "ad" / "adapter_config.json")
        needles = ["adapter_config.json", "missing"]
    elif case == "dora":
        write_adapter(tmp_path / "ad", ad, use_dora=True)
        needles = ["use_dora", "DoRA"]
    elif case == "overlap":
        out = tmp_path / "base" / "merged"
        needles = ["overlaps"]
    elif case == "pissa_without_initial":
        write_adapter(tmp_path / "ad", ad, init_lora_weights="pissa")
        needles = ["--initial-adapter"]
    elif case == "lora_bias_without_base_bias":
        ad = lora_pair("model.layers.1.up", 29, 37, 4)
        ad[f"{P}model.layers.1.up.lora_B.bias"] = torch.randn(29)
        write_adapter(tmp_path / "ad", ad, lora_bias=True)
        needles = ["model.layers.1.up.bias", "matches no base tensor"]
    elif case == "initial_mismatch":
        write_adapter(tmp_path / "init", lora_pair(m, 37, 29, 2), r=2)
        extra = ["--initial-adapter", tmp_path / "init"]
        needles = ["same shapes"]
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    argv = ["--base", tmp_path / "base", "--out", out] + (
        extra if case == "bad_weight" else ["--adapter", tmp_path / "ad"] + extra
    )
    code, _o, err = run(argv, capsys)
    assert_refused(code, err, out, *needles)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before, "inputs modified"


def test_verification_failure_writes_nothing(simple, capsys, monkeypatch):
    """A merge that goes wrong (simulated: merge_ adds twice) is caught by the probes; no output survives."""
    tmp, _base, _ad = simple
    from fused_lora.merge_cli import execute

    real = execute.merge_

    def twice(weight, a, b, scale, **kw):
        real(weight, a, b, scale, **kw)
        return real(weight, a, b, scale, **kw)

    monkeypatch.setattr(execute, "merge_", twice)
    code, _out, err = run(["--base", tmp / "base", "--adapter", tmp / "ad", "--out", tmp / "out"], capsys)
    assert_refused(code, err, tmp / "out", "verification failed", "model.layers.0.q_proj.weight")
    code, _out, err = run(
        ["--base", tmp / "base", "--adapter", tmp / "ad", "--out", tmp / "out", "--no-verify", "--quiet"], capsys
    )
    assert code == 0, err  # the check really is what caught it


def test_ambiguous_target_is_refused(tmp_path, capsys):
    base = {"a.layers.0.q.weight": torch.randn(5, 3), "b.layers.0.q.weight": torch.randn(5, 3)}
    write_base(tmp_path / "base", base)
    write_adapter(tmp_path / "ad", lora_pair("layers.0.q", 5, 3, 4))
    code, _o, err = run(["--base", tmp_path / "base", "--adapter", tmp_path / "ad", "--out", tmp_path / "out"], capsys)
    assert_refused(code, err, tmp_path / "out", "ambiguous", "a.layers.0.q.weight", "b.layers.0.q.weight")


def test_usage_errors_are_one_line(tmp_path, capsys):
    code, _o, err = run(["--base", tmp_path], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "required" in err
    code, _o, err = run(["--initial-adapter", tmp_path, "--base", tmp_path, "--out", tmp_path / "o"], capsys)
    assert code == 2 and "must follow" in err


def test_console_entry_subprocess(simple):
    tmp, _base, _ad = simple
    env = dict(os.environ)
    script = os.path.join(os.path.dirname(sys.executable), "fused-lora")
    entry = [script] if os.path.exists(script) else [sys.executable, "-m", "fused_lora"]
    proc = subprocess.run(
        entry + ["merge", "--base", str(tmp / "base"), "--adapter", str(tmp / "ad"), "--out", str(tmp / "out")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "verified 2 tensor(s)" in proc.stdout and proc.stderr.count("Traceback") == 0
    assert (tmp / "out" / "model.safetensors").exists()
