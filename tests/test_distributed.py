"""DDP and FSDP2 training of a fused PEFT model across 2 CPU processes (gloo) gives one process's losses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

WORKER = Path(__file__).with_name("_dist_worker.py")


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_ddp_and_fsdp2_match_single_process(tmp_path):
    out = tmp_path / "losses.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(WORKER), str(out)], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    steps = len(result["single"])
    # 5 LoRA layers, one fused call each per step; rank 0 counts its DDP and its FSDP2 run
    assert result["single_fused_calls"] == 5 * steps
    assert result["fused_calls"] == 2 * 5 * steps, "a distributed run bypassed the fused layers"
    assert result["single"][-1] < result["single"][0]
    for mode in ("ddp", "fsdp2"):
        for step, (ours, ref) in enumerate(zip(result[mode], result["single"])):
            assert abs(ours - ref) <= 1e-5 * max(1.0, abs(ref)), f"{mode} step {step}: {ours} != {ref}"
