"""Peak memory of `fused-lora merge` on a synthetic multi-GB sharded checkpoint (not a test: minutes, GBs).

    python -m fused_lora.merge_cli.measure_memory [--shards 3] [--shard-gib 1.0] [--workdir /tmp/...]

Builds shards of 4096x4096 float16 tensors plus an index, a rank-16 adapter on half of the tensors, runs the
merge (verification on) in a child process and reports the child's peak RSS (getrusage of the children)
next to the largest shard and next to the RSS of a child that only imports the same modules.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

SIDE = 4096


def build(workdir: str, shards: int, shard_gib: float, rank: int) -> tuple[str, str, int]:
    import torch
    from safetensors.torch import save_file

    base, adapter = os.path.join(workdir, "base"), os.path.join(workdir, "adapter")
    os.makedirs(base)
    os.makedirs(adapter)
    per_shard = max(1, int(shard_gib * 2**30) // (SIDE * SIDE * 2))
    weight_map, lora, largest = {}, {}, 0
    gen = torch.Generator().manual_seed(0)
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {}
        for i in range(per_shard):
            name = f"model.layers.{s}.proj{i}.weight"
            tensors[name] = torch.randn(SIDE, SIDE, generator=gen).to(torch.float16)
            weight_map[name] = fname
            if i % 2 == 0:
                path = f"base_model.model.model.layers.{s}.proj{i}"
                lora[f"{path}.lora_A.weight"] = torch.randn(rank, SIDE, generator=gen) * 0.01
                lora[f"{path}.lora_B.weight"] = torch.randn(SIDE, rank, generator=gen) * 0.01
        save_file(tensors, os.path.join(base, fname), metadata={"format": "pt"})
        largest = max(largest, os.path.getsize(os.path.join(base, fname)))
        del tensors
    with open(os.path.join(base, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(base, "config.json"), "w") as f:
        json.dump({"model_type": "synthetic"}, f)
    save_file(lora, os.path.join(adapter, "adapter_model.safetensors"))
    with open(os.path.join(adapter, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank}, f)
    return base, adapter, largest


def child_peak_kib(code: str) -> tuple[int, float, int]:
    """Run `code` in a fresh interpreter; (its own peak RSS in KiB, wall seconds, exit status). wait4 gives
    the rusage of that one child, not the max over every child this process ever had."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code])
    _pid, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_maxrss, time.perf_counter() - start, proc.returncode


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fused_lora.merge_cli.measure_memory")
    parser.add_argument("--shards", type=int, default=3)
    parser.add_argument("--shard-gib", type=float, default=1.0)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args(argv)
    workdir = args.workdir or tempfile.mkdtemp(prefix="fused_lora_merge_mem-")
    os.makedirs(workdir, exist_ok=True)
    try:
        t0 = time.perf_counter()
        # build in a child too, so its memory does not count as ours
        subprocess.run(
            [
                sys.executable,
                "-c",
                f"from fused_lora.merge_cli.measure_memory import build; "
                f"build({workdir!r}, {args.shards}, {args.shard_gib}, {args.rank})",
            ],
            check=True,
        )
        base, adapter = os.path.join(workdir, "base"), os.path.join(workdir, "adapter")
        largest = max(os.path.getsize(os.path.join(base, n)) for n in os.listdir(base) if n.endswith(".safetensors"))
        print(f"built {args.shards} shards, largest {largest / 2**30:.2f} GiB, in {time.perf_counter() - t0:.0f} s")
        idle_kib, _w, _s = child_peak_kib(
            "import torch, tqdm, safetensors.torch; import fused_lora.merge_cli.cli, fused_lora.merge_cli.execute"
        )
        out = os.path.join(workdir, "merged")
        peak_kib, wall, status = child_peak_kib(
            "import sys; from fused_lora.merge_cli.cli import main; "
            f"sys.exit(main(['--base', {base!r}, '--adapter', {adapter!r}, '--out', {out!r}]))"
        )
        if status != 0:
            print(f"merge failed with status {status}")
            return 1
        from fused_lora.ops.backends import backend_info

        result = {
            "largest_shard_gib": largest / 2**30,
            "peak_rss_gib": peak_kib / 2**20,
            "import_only_rss_gib": idle_kib / 2**20,
            "peak_over_largest_shard": peak_kib * 1024 / largest,
            "peak_minus_imports_over_largest_shard": (peak_kib - idle_kib) * 1024 / largest,
            "merge_wall_s": wall,
            "backend": backend_info().splitlines()[0],
        }
        print(json.dumps(result, indent=2))
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
