"""Step `sanitizer`: compute-sanitizer memcheck and racecheck over fused_lora.gpu_check.sanitize_target (a per-row
backward with atomics; a safe merge that must refuse, then one that must apply), the two tools side by side.

torch's caching allocator is turned off (PYTORCH_NO_CUDA_MEMORY_CACHING=1) so that memcheck sees every tensor's
real bounds. Only flags that this compute-sanitizer's --help lists are passed. A tool fails the step when it
reports errors (its --error-exitcode) or the target's own checks fail. Dry run, or no compute-sanitizer: the
target runs without it (on the CPU through the interpreter in a dry run) and the step is recorded as skipped.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from typing import Dict, List

from fused_lora.gpu_check.context import FAILED, OK, SKIPPED, Context, result, write_json
from fused_lora.gpu_check.steps.environment import find_tool

TOOLS = ("memcheck", "racecheck")
SANITIZER_ERRORS = 86  # our --error-exitcode: tells the sanitizer's findings from the target's own failures
OPTIONAL_FLAGS = (
    ("--report-api-errors", "no"),  # torch probes APIs that may fail on purpose
    ("--print-limit", "20"),
    ("--show-backtrace", "no"),
)


def _target(ctx: Context) -> List[str]:
    return [ctx.python, "-m", "fused_lora.gpu_check.sanitize_target"]


def _help_text(sanitizer: str) -> str:
    try:
        done = subprocess.run([sanitizer, "--help"], capture_output=True, text=True, timeout=30)
        return done.stdout + done.stderr
    except (OSError, subprocess.SubprocessError):
        return ""


def command(sanitizer: str, tool: str, help_text: str, target: List[str]) -> List[str]:
    cmd = [sanitizer, "--tool", tool, "--error-exitcode", str(SANITIZER_ERRORS)]
    for flag, value in OPTIONAL_FLAGS:
        if flag in help_text:
            cmd += [flag, value]
    return cmd + target


def summarize(tool: str, code: int, output: str) -> Dict[str, object]:
    errors = [int(n) for n in re.findall(r"ERROR SUMMARY:\s*(\d+) error", output)]
    race = re.search(r"RACECHECK SUMMARY:\s*(\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)", output)
    findings = [
        ln.strip()
        for ln in output.splitlines()
        if ln.startswith("=========") and ("Invalid" in ln or "Error" in ln or "Race" in ln or "hazard" in ln.lower())
    ][:5]
    target_lines = [ln.strip() for ln in output.splitlines() if " ok (" in ln or "Error" in ln.split(":")[0]]
    ok = code == 0 and not any(errors) and (race is None or int(race.group(2)) == 0)
    return {
        "tool": tool,
        "exit_code": code,
        "ok": ok,
        "errors": sum(errors) if errors else None,
        "race_errors": int(race.group(2)) if race else None,
        "race_warnings": int(race.group(3)) if race else None,
        "findings": findings,
        "target": target_lines[-3:],
    }


def _run_plain(ctx: Context) -> dict:
    done = subprocess.run(_target(ctx), capture_output=True, text=True, cwd=ctx.root, timeout=max(10, ctx.remaining()))
    with open(ctx.path("sanitizer", "plain.log"), "w") as f:
        f.write(done.stdout + done.stderr)
    lines = [ln for ln in done.stdout.splitlines() if ln.strip()]
    return {
        "exit_code": done.returncode,
        "output": lines[-3:],
        "error": (done.stderr.strip().splitlines() or [""])[-1] if done.returncode else "",
    }


def run(ctx: Context) -> dict:
    sanitizer = str(ctx.info.get("compute_sanitizer") or find_tool("compute-sanitizer"))
    if ctx.dry_run or not sanitizer or not ctx.cuda:
        plain = _run_plain(ctx)
        why = (
            "a dry run has no GPU"
            if ctx.dry_run
            else "compute-sanitizer not found (PATH, /usr/local/cuda/bin)"
            if not sanitizer
            else "no CUDA device"
        )
        if plain["exit_code"] != 0:
            return result(
                FAILED, f"{why}; the target itself failed without the sanitizer: {plain['error']}", data=plain
            )
        return result(
            SKIPPED,
            f"{why}; the target ran without it on {'the CPU' if ctx.dry_run else 'the GPU'}: "
            f"{'; '.join(plain['output'])}",
            data=plain,
        )
    help_text = _help_text(sanitizer)
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    procs = {}
    for tool in TOOLS:
        cmd = command(sanitizer, tool, help_text, _target(ctx))
        log = open(ctx.path("sanitizer", f"{tool}.log"), "w")
        log.write(" ".join(cmd) + "\n")
        log.flush()
        procs[tool] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ctx.root, env=env), log)
    deadline = time.time() + ctx.remaining() - 5
    summaries = []
    for tool, (proc, log) in procs.items():
        try:
            code = proc.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
            code = -9 if code == 0 else code
        log.close()
        with open(ctx.path("sanitizer", f"{tool}.log"), errors="replace") as f:
            output = f.read()
        summary = summarize(tool, code, output)
        if code == -9 or (code < 0 and time.time() >= deadline):
            summary["findings"].insert(0, "stopped at the step's budget")
        summaries.append(summary)
    write_json(ctx.path("sanitizer", "summary.json"), summaries)
    parts = []
    for s in summaries:
        state = "clean" if s["ok"] else f"exit {s['exit_code']}"
        extra = f", {s['race_warnings']} race warnings" if s.get("race_warnings") else ""
        parts.append(
            f"{s['tool']} {state} ({s['errors']} errors{extra})"
            + (f": {s['findings'][0]}" if s["findings"] and not s["ok"] else "")
        )
    artifacts = ["sanitizer/summary.json"] + [f"sanitizer/{t}.log" for t in TOOLS]
    status = OK if all(s["ok"] for s in summaries) else FAILED
    return result(
        status,
        "; ".join(parts) + " over rows_bwd (atomics) and safe_merge (refusal)",
        artifacts=artifacts,
        data={"tools": summaries},
    )
