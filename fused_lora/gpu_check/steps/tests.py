"""Step `tests`: the device-aware test files with `pytest --device cuda` (compiled kernels, bf16 included), split
into shards that run side by side so their Triton compilations overlap; the contract suite too when present.

Dry run: `--device cpu` (the interpreter) over a small selection, to prove the plumbing; CI runs the whole files
anyway. Each test's outcome is appended to a JSONL file by the kit's pytest plugin as soon as it is known, so a
shard stopped at the budget still reports what it reached; tests that never reported count as not run (failed).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from typing import Dict, List

from fused_lora.gpu_check.context import FAILED, OK, Context, result, write_json

DEVICE_TEST_FILES = (
    "tests/test_triton_dense.py",
    "tests/test_triton_rows.py",
    "tests/test_triton_merge.py",
    "tests/test_training.py",
    "tests/test_contract.py",
    "tests/test_triton_decode.py",
    "tests/test_triton_pdl.py",
)
CONTRACT = "tests/test_contract.py::"


def gpu_worthy(node_id: str, quick: bool) -> bool:
    """The contract suite also runs its CPU backends under --device cuda; CI covers those, the GPU's minutes go to
    its `cuda` cases (the bf16 ones alone in a quick run: bf16 has only ever run compiled)."""
    if not node_id.startswith(CONTRACT):
        return True
    return "[cuda-" in node_id and (not quick or "bf16" in node_id)


DRY_RUN_FILES = DEVICE_TEST_FILES[:4]
DRY_RUN_SELECTION = "rank_one or safe_merge_clean or m_zero or all_none or empty_batch or preallocated or masks_differ"
PYTEST_FLAGS = ("-q", "-p", "no:cacheprovider", "-p", "fused_lora.gpu_check.pytest_plugin", "-o", "addopts=")


def _pytest(ctx: Context, args: List[str]) -> List[str]:
    return [ctx.python, "-m", "pytest", *PYTEST_FLAGS, "--device", ctx.device, *args]


def collect(ctx: Context, files: List[str], env: Dict[str, str]) -> List[str]:
    args = list(files) + (["-k", DRY_RUN_SELECTION] if ctx.dry_run else []) + ["--collect-only"]
    done = subprocess.run(
        _pytest(ctx, args),
        capture_output=True,
        text=True,
        cwd=ctx.root,
        env=env,
        timeout=max(30.0, ctx.remaining() / 2),
    )
    with open(ctx.path("tests", "collect.log"), "w") as f:
        f.write(done.stdout + done.stderr)
    ids = [line.strip() for line in done.stdout.splitlines() if "::" in line and not line.startswith(" ")]
    if done.returncode not in (0, 5) or not ids:
        tail = " | ".join((done.stdout + done.stderr).strip().splitlines()[-4:])
        raise RuntimeError(f"pytest --collect-only exited {done.returncode} with {len(ids)} tests: {tail}")
    return ids


def shards_of(ids: List[str], n: int) -> List[List[str]]:
    """Contiguous, near-equal chunks: neighbouring tests share kernel specializations, so keep them together."""
    n = max(1, min(n, len(ids)))
    size, extra = divmod(len(ids), n)
    out, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        out.append(ids[start:end])
        start = end
    return out


def outcomes(paths: List[str]) -> Dict[str, dict]:
    """nodeid -> {"outcome": passed|failed|skipped|error, "message", "seconds"} from the plugin's JSONL files."""
    final: Dict[str, dict] = {}
    for path in paths:
        if not os.path.exists(path):
            continue
        with open(path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a line cut by a kill
                node = final.setdefault(rec["nodeid"], {"outcome": "passed", "seconds": 0.0})
                node["seconds"] += rec.get("seconds", 0.0)
                if rec["outcome"] == "failed":
                    node["outcome"] = "failed" if rec["when"] == "call" else "error"
                    node["message"] = rec.get("message", "")
                elif rec["outcome"] == "skipped" and node["outcome"] == "passed":
                    node["outcome"] = "skipped"
                    node["message"] = rec.get("message", "")[-300:]
    return final


def _first_error_line(message: str) -> str:
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    picked = [ln for ln in lines if ln.startswith("E ")] or lines[-1:]
    return picked[0][:300] if picked else ""


def run(ctx: Context) -> dict:
    files = [
        f for f in (DRY_RUN_FILES if ctx.dry_run else DEVICE_TEST_FILES) if os.path.exists(os.path.join(ctx.root, f))
    ]
    env = dict(os.environ)
    if not ctx.dry_run and ctx.mode == "full":
        env["FUSED_LORA_GPU_TESTS"] = "all"
    collected = collect(ctx, files, env)
    ids = [i for i in collected if ctx.dry_run or gpu_worthy(i, ctx.quick)]
    shards = shards_of(ids, ctx.workers)
    print(f"{len(ids)} tests from {', '.join(files)} in {len(shards)} shards on {ctx.device}", flush=True)
    procs, jsonl = [], []
    for i, shard in enumerate(shards):
        path = ctx.path("tests", f"shard{i}.jsonl")
        if os.path.exists(path):
            os.unlink(path)
        jsonl.append(path)
        shard_env = dict(env, FUSED_LORA_GPU_CHECK_OUTCOMES=path)
        log = open(ctx.path("tests", f"shard{i}.log"), "w")
        procs.append(
            (
                subprocess.Popen(
                    _pytest(ctx, shard + ["--junitxml", ctx.path("tests", f"shard{i}.xml")]),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=ctx.root,
                    env=shard_env,
                ),
                log,
            )
        )
    deadline = time.time() + ctx.remaining() - 8
    stopped = False
    try:
        while any(p.poll() is None for p, _ in procs):
            if time.time() > deadline and not stopped:
                stopped = True
                for p, _ in procs:
                    if p.poll() is None:
                        p.send_signal(signal.SIGINT)  # pytest stops after the current test and reports
                deadline = time.time() + 10
            elif stopped and time.time() > deadline:
                for p, _ in procs:
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.5)
    except KeyboardInterrupt:
        stopped = True
        for p, _ in procs:
            if p.poll() is None:
                p.kill()
    for p, log in procs:
        p.wait()
        log.close()
    seen = outcomes(jsonl)
    counts = {k: 0 for k in ("passed", "failed", "error", "skipped", "not run")}
    for node in ids:
        counts[seen.get(node, {"outcome": "not run"})["outcome"]] += 1
    failures = [
        {"nodeid": n, "outcome": seen[n]["outcome"], "error": _first_error_line(seen[n].get("message", ""))}
        for n in ids
        if n in seen and seen[n]["outcome"] in ("failed", "error")
    ]
    slowest = sorted(((round(v["seconds"], 2), k) for k, v in seen.items()), reverse=True)[:10]
    summary = {
        "device": ctx.device,
        "files": files,
        "collected": len(collected),
        "selected": len(ids),
        "shards": len(shards),
        "counts": counts,
        "failures": failures,
        "not_run": [n for n in ids if n not in seen],
        "slowest": slowest,
        "exit_codes": [p.returncode for p, _ in procs],
        "stopped_at_budget": stopped,
    }
    write_json(ctx.path("tests", "summary.json"), summary)
    detail = (
        f"{counts['passed']} passed, {counts['failed']} failed, {counts['error']} errors, "
        f"{counts['skipped']} skipped, {counts['not run']} not run ({len(ids)} tests, --device {ctx.device}, "
        f"{len(shards)} shards)"
    )
    if stopped:
        detail += "; stopped at the budget (rerun with --only tests for the rest)"
    if failures:
        detail += "; first: " + failures[0]["nodeid"] + " " + failures[0]["error"]
    bad = counts["failed"] + counts["error"] + counts["not run"] > 0 or any(
        p.returncode not in (0, 5) for p, _ in procs
    )
    artifacts = ["tests/summary.json"] + [f"tests/shard{i}.log" for i in range(len(shards))]
    return result(FAILED if bad else OK, detail, artifacts=artifacts, data=summary)
