"""Corrupted and truncated safetensors inputs (seeded byte flips and cuts in headers and data, base shard and
adapter): the merge either refuses (exit 2, one line on stderr, nothing left behind) or succeeds verified."""

from __future__ import annotations

import os
import random
import shutil
import struct

import pytest
import torch
from safetensors import safe_open
from test_merge_cli import base_tensors, lora_pair, write_adapter, write_base

from fused_lora.merge_cli.cli import main

CASES = 50


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    torch.manual_seed(7)
    base = base_tensors(torch.float16)
    names = list(base)
    write_base(root / "base", base, shards=[names[:3], names[3:]])
    ad = lora_pair("model.layers.0.q_proj", 37, 29, 3)
    ad.update(lora_pair("model.layers.1.up", 29, 37, 2))
    ad["base_model.model.model.layers.0.q_proj.lora_B.bias"] = torch.randn(37)
    write_adapter(root / "ad", ad, r=3, rank_pattern={"up": 2}, lora_bias=True)
    return root


def corrupt(path, rng: random.Random) -> str:
    data = bytearray(path.read_bytes())
    header_end = 8 + struct.unpack("<Q", bytes(data[:8]))[0]
    region = rng.choice(["header", "data"])
    lo, hi = (0, min(header_end, len(data))) if region == "header" else (min(header_end, len(data) - 1), len(data))
    if rng.random() < 0.3:
        cut = rng.randrange(lo, hi)
        path.write_bytes(bytes(data[:cut]))
        return f"truncate {path.name} at {cut} ({region})"
    flips = []
    for _ in range(rng.randint(1, 3)):
        at = rng.randrange(lo, hi)
        data[at] ^= 1 << rng.randrange(8)
        flips.append(at)
    path.write_bytes(bytes(data))
    return f"flip {path.name} bytes {flips} ({region})"


@pytest.mark.parametrize("seed", range(CASES))
def test_corrupted_inputs_refused_cleanly_or_merged_verified(pristine, tmp_path, capsys, seed):
    rng = random.Random(seed)
    shutil.copytree(pristine / "base", tmp_path / "base")
    shutil.copytree(pristine / "ad", tmp_path / "ad")
    victim = rng.choice(
        [
            tmp_path / "base" / "model-00001-of-00002.safetensors",
            tmp_path / "base" / "model-00002-of-00002.safetensors",
            tmp_path / "ad" / "adapter_model.safetensors",
        ]
    )
    what = corrupt(victim, rng)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    out = tmp_path / "out"
    code = main(["--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "ad"), "--out", str(out), "--quiet"])
    stdout, stderr = capsys.readouterr()
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and out not in p.parents} == before
    leftovers = [n for n in os.listdir(tmp_path) if ".tmp-" in n or ".old-" in n]
    assert not leftovers, (what, leftovers)
    assert "Traceback" not in stderr
    if code == 2:
        assert len(stderr.strip().splitlines()) == 1, (what, stderr)
        assert not out.exists(), what
        return
    assert code == 0, (what, code, stderr)
    for shard in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        with safe_open(out / shard, "pt") as f:
            assert len(list(f.keys())) > 0
