"""Warm the Triton cache in parallel before timing: each new kernel specialization compiles in 2-6 s, one after the
other in a single process, but side by side in several (they share TRITON_CACHE_DIR, so the timing process then
loads every kernel from disk).

    python -m fused_lora.gpu_check.warm KIND SPEC.json INDEX COUNT

KIND "bench": SPEC {"cases": [Case fields]}: run the fused implementation of cases INDEX, INDEX+COUNT, ...
KIND "tune":  SPEC {"jobs": [[kernel, shape_class, candidate index]]}: launch each candidate config once.
A worker's failure is only logged: the timing step that follows meets the same error and reports it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import traceback
from typing import List

from fused_lora.gpu_check.bootstrap import ensure_checkout
from fused_lora.gpu_check.context import Context, write_json


def spawn(ctx: Context, kind: str, spec: dict, workers: int, timeout_s: float) -> dict:
    """Run `workers` warm processes over spec; wait at most timeout_s. Returns a summary for the step's data."""
    spec_path = ctx.path("warm", f"{kind}.json")
    write_json(spec_path, spec)
    began = time.time()
    procs = []
    for i in range(workers):
        log = open(ctx.path("warm", f"{kind}{i}.log"), "w")
        procs.append(
            (
                subprocess.Popen(
                    [ctx.python, "-m", "fused_lora.gpu_check.warm", kind, spec_path, str(i), str(workers)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=ctx.root,
                ),
                log,
            )
        )
    stopped = 0
    for proc, log in procs:
        try:
            proc.wait(timeout=max(1.0, began + timeout_s - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            stopped += 1
        log.close()
    return {
        "workers": workers,
        "seconds": round(time.time() - began, 1),
        "stopped_at_timeout": stopped,
        "exit_codes": [p.returncode for p, _ in procs],
    }


def bench_worker(spec: dict, index: int, count: int) -> None:
    import torch

    from fused_lora.bench.impls import build
    from fused_lora.gpu_check.steps.bench import case_from_json

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for fields in spec["cases"][index::count]:
        case = case_from_json(fields)
        began = time.time()
        try:
            build(case, device).fns["fused"]()
            if device.type == "cuda":
                torch.cuda.synchronize()
            print(f"warm {case.label}: {time.time() - began:.1f}s", flush=True)
        except Exception:  # noqa: BLE001
            print(f"warm {case.label} failed:\n{traceback.format_exc()}", flush=True)


def tune_worker(spec: dict, index: int, count: int) -> None:
    import torch

    from fused_lora.gpu_check.steps.tune import discover

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tiny = bool(spec.get("tiny"))
    cases = {(c.kernel, c.shape_class): c for c in discover()[0]}
    runs = {}
    for kernel, shape_class, candidate in spec["jobs"][index::count]:
        case = cases.get((kernel, shape_class))
        if case is None:
            continue
        began = time.time()
        try:
            if (kernel, shape_class) not in runs:
                runs[(kernel, shape_class)] = case.make(device, tiny)
            config = case.default if candidate < 0 else case.candidates[candidate]
            runs[(kernel, shape_class)].launch(config)
            if device.type == "cuda":
                torch.cuda.synchronize()
            print(f"warm {kernel}/{shape_class} #{candidate}: {time.time() - began:.1f}s", flush=True)
        except Exception:  # noqa: BLE001
            print(f"warm {kernel}/{shape_class} #{candidate} failed:\n{traceback.format_exc()}", flush=True)


def main(argv: List[str] = None) -> int:
    kind, spec_path, index, count = (argv if argv is not None else sys.argv[1:])[:4]
    ensure_checkout()
    with open(spec_path) as f:
        spec = json.load(f)
    {"bench": bench_worker, "tune": tune_worker}[kind](spec, int(index), int(count))
    return 0


if __name__ == "__main__":
    sys.exit(main())
