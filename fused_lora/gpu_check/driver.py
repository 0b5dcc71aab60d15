"""The kit's driver: runs each step in its own process within its budget and writes gpu_check.json as it goes.

    python -m fused_lora.gpu_check [--quick | --dry-run] [--only a,b] [--skip a,b] [--serial] [--out DIR]

(scripts/gpu_check.sh is the front end.) The driver itself never touches CUDA: a step that crashes, hangs or
poisons its CUDA context costs that step only. gpu_check.json is rewritten after every step, so a run cut short
still leaves what it finished.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections import deque
from typing import Dict, List, Optional

from fused_lora.gpu_check import plan
from fused_lora.gpu_check.bootstrap import ROOT
from fused_lora.gpu_check.context import FAILED, OK, SKIPPED, Context, read_json, result, write_json

POLL_S = 0.5
CACHE_ROOT = "/tmp/fused_lora_gpu_check"


def parse_args(argv: List[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/gpu_check.sh", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="the 4-minute selection (default: the full 8-minute run)")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="no GPU: every step that can run on the CPU (interpreter, tiny shapes); CUDA-only parts "
        "are recorded as skipped",
    )
    p.add_argument("--only", default="", help=f"comma list of steps ({', '.join(plan.BY_NAME)})")
    p.add_argument("--skip", default="", help="comma list of steps to leave out")
    p.add_argument("--serial", action="store_true", help="run the check steps one at a time, not side by side")
    p.add_argument("--out", default=None, help="output directory (default: $OUT, else out/gpu in the checkout)")
    p.add_argument(
        "--max-seconds",
        type=float,
        default=None,
        help="the whole run's limit (default: 240 quick, 480 full); later steps shrink to fit",
    )
    return p.parse_args(argv)


def child_env(mode: str, out: str) -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("PIP_NO_INDEX", "1")
    # the GPU machine is offline: no library may wait on a hub
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cache = env.get("FUSED_LORA_GPU_CHECK_CACHE", CACHE_ROOT)
    env.setdefault("TRITON_CACHE_DIR", os.path.join(cache, "triton"))
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(cache, "inductor"))
    env.setdefault("MPLCONFIGDIR", os.path.join(cache, "matplotlib"))
    if mode == "dry-run":
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    env["FUSED_LORA_GPU_CHECK_OUT"] = out
    return env


class RunningStep:
    """One step's process: started with its context, polled, stopped (SIGINT, then SIGKILL) past its budget."""

    def __init__(self, step: plan.Step, ctx: Context, env: Dict[str, str]):
        self.step, self.ctx = step, ctx
        self.ctx_path = ctx.path("steps", f"{step.name}.context.json")
        self.result_path = ctx.path("steps", f"{step.name}.result.json")
        self.log_path = ctx.path("logs", f"{step.name}.log")
        if os.path.exists(self.result_path):
            os.unlink(self.result_path)
        write_json(self.ctx_path, ctx.to_json())
        self.log = open(self.log_path, "w")
        self.started = time.time()
        self.stop_at = ctx.budget_s * plan.HARD_FACTOR
        self.interrupted_at: Optional[float] = None
        self.proc = subprocess.Popen(
            [ctx.python, "-m", "fused_lora.gpu_check.step", step.name, self.ctx_path, self.result_path],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=ctx.root,
            start_new_session=True,
        )  # its own process group: pytest shards and sanitizer runs stop with it

    def _signal(self, sig) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def poll(self) -> Optional[dict]:
        elapsed = time.time() - self.started
        code = self.proc.poll()
        if code is None:
            if self.interrupted_at is None and elapsed > self.stop_at:
                self.interrupted_at = elapsed
                self._signal(signal.SIGINT)
            elif self.interrupted_at is not None and elapsed > self.interrupted_at + plan.HARD_GRACE_S:
                self._signal(signal.SIGKILL)
            return None
        self._signal(signal.SIGKILL)  # leftovers of the group (a shard that ignored SIGINT)
        self.log.close()
        out = None
        if os.path.exists(self.result_path):
            try:
                out = read_json(self.result_path)
            except ValueError:
                out = None
        if out is None:
            out = result(
                FAILED,
                f"the step's process ended (exit code {code}) without a result; "
                f"last log lines: {' | '.join(tail(self.log_path, 3))}",
            )
        if self.interrupted_at is not None:
            out["detail"] = f"stopped at {self.interrupted_at:.0f}s ({plan.HARD_FACTOR} x budget); " + out.get(
                "detail", ""
            )
            if out.get("status") == OK:
                out["status"] = FAILED
        out.update(
            name=self.step.name,
            seconds=round(elapsed, 1),
            budget_s=round(self.ctx.budget_s, 1),
            log=os.path.relpath(self.log_path, self.ctx.out),
        )
        return out


def tail(path: str, n: int) -> List[str]:
    try:
        with open(path, errors="replace") as f:
            return [line.rstrip() for line in f.readlines()[-n:]]
    except OSError:
        return []


class Driver:
    def __init__(self, args: argparse.Namespace):
        self.mode = "dry-run" if args.dry_run else ("quick" if args.quick else "full")
        self.out = os.path.abspath(args.out or os.environ.get("OUT") or os.path.join(ROOT, "out", "gpu"))
        os.makedirs(self.out, exist_ok=True)
        self.serial = args.serial
        self.steps = plan.select([s for s in args.only.split(",") if s], [s for s in args.skip.split(",") if s])
        self.limit = args.max_seconds or plan.TOTAL_S[self.mode]
        self.began = time.time()
        self.env = child_env(self.mode, self.out)
        cpus = os.cpu_count() or 2
        self.workers = 2 if self.mode == "dry-run" else max(2, min(6, cpus // 3))
        self.report = {
            "device": None,
            "torch": None,
            "triton": None,
            "mode": self.mode,
            "command": "scripts/gpu_check.sh " + " ".join(sys.argv[1:]),
            "checkout": ROOT,
            "out": self.out,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "finished": None,
            "seconds": None,
            "ok": None,
            "counts": {},
            "budgets": {s.name: s.budget[self.mode] for s in self.steps},
            "estimates": {s.name: s.estimate for s in self.steps},
            "steps": [],
        }
        self.info: dict = {}
        self.cuda = False
        self.active: List[RunningStep] = []

    # ---- bookkeeping ----
    def save(self) -> None:
        write_json(os.path.join(self.out, "gpu_check.json"), self.report)

    def record(self, res: dict) -> None:
        self.report["steps"].append(res)
        self.save()
        print(
            f"[{res['name']}] {res['status'].upper()} in {res.get('seconds', 0):.0f}s "
            f"(budget {res.get('budget_s', 0):.0f}s): {res.get('detail', '')}",
            flush=True,
        )
        if res["status"] == FAILED and res.get("log"):
            for line in tail(os.path.join(self.out, res["log"]), 8):
                print(f"    | {line}", flush=True)

    def skip(self, step: plan.Step, why: str, status: str = SKIPPED) -> None:
        self.record(dict(result(status, why), name=step.name, seconds=0.0, budget_s=step.budget[self.mode]))

    def context(self, step: plan.Step, budget: float) -> Context:
        return Context(
            mode=self.mode,
            out=self.out,
            root=ROOT,
            budget_s=budget,
            cuda=self.cuda,
            workers=self.workers,
            python=sys.executable,
            info=self.info,
        )

    def left(self) -> float:
        return self.limit - (time.time() - self.began)

    # ---- phases ----
    def run_one(self, step: plan.Step, budget: float) -> dict:
        running = RunningStep(step, self.context(step, budget), self.env)
        self.active.append(running)
        while True:
            res = running.poll()
            if res is not None:
                self.active.remove(running)
                return res
            time.sleep(POLL_S)

    def run_side_by_side(self, steps: List[plan.Step], reserve: float) -> None:
        pending = deque(steps)
        most = 1 if self.serial else len(steps)
        while pending or self.active:
            while pending and len(self.active) < most:
                step = pending.popleft()
                budget = min(step.budget[self.mode], self.left() - reserve)
                if budget < 10:
                    self.skip(step, f"no time left in the run's {self.limit:.0f}s")
                    continue
                self.active.append(RunningStep(step, self.context(step, budget), self.env))
            for r in list(self.active):
                res = r.poll()
                if res is not None:
                    self.active.remove(r)
                    self.record(res)
            time.sleep(POLL_S)

    def stop_all(self) -> None:
        for r in self.active:
            r._signal(signal.SIGKILL)
        self.active.clear()

    def run(self) -> int:
        print(f"fused_lora GPU check: mode {self.mode}, output {self.out}, python {sys.executable}", flush=True)
        print("time budgets:\n" + "\n".join(plan.budget_lines(self.steps, self.mode)), flush=True)
        self.save()
        setup = [s for s in self.steps if s.phase == "setup"]
        check = [s for s in self.steps if s.phase == "check"]
        measure = [s for s in self.steps if s.phase == "measure"]
        for step in setup:
            res = self.run_one(step, step.budget[self.mode])
            self.record(res)
            data = res.get("data") or {}
            self.info = data
            self.cuda = bool(data.get("cuda"))
            for key in ("device", "torch", "triton"):
                self.report[key] = data.get(key)
        if self.mode != "dry-run" and not self.cuda:
            why = f"torch sees no CUDA device ({self.info.get('cuda_detail', 'environment step failed')})"
            for step in check + measure:
                self.skip(step, why, status=FAILED)
            return self.finish()
        reserve = sum(s.budget[self.mode] for s in measure)
        self.run_side_by_side(check, reserve)
        for step in measure:
            budget = min(step.budget[self.mode], self.left())
            if budget < 10:
                self.skip(step, f"no time left in the run's {self.limit:.0f}s")
                continue
            if step.name == "bench":
                tuned = os.path.join(self.out, "tuned")
                if os.path.isdir(tuned):  # the launchers read this run's tuning, committed or not
                    self.env["FUSED_LORA_TUNED_DIR"] = tuned
            self.record(self.run_one(step, budget))
        return self.finish()

    def finish(self) -> int:
        steps = self.report["steps"]
        counts = {status: sum(1 for s in steps if s["status"] == status) for status in (OK, SKIPPED, FAILED)}
        self.report.update(
            finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
            seconds=round(time.time() - self.began, 1),
            ok=counts[FAILED] == 0,
            counts=counts,
        )
        self.save()
        print(f"\n{'step':<12} {'status':<8} {'seconds':>8} {'budget':>7}  detail")
        for s in steps:
            print(
                f"{s['name']:<12} {s['status']:<8} {s.get('seconds', 0):>8.1f} {s.get('budget_s', 0):>7.0f}  "
                f"{s.get('detail', '')[:150]}"
            )
        print(
            f"\n{counts[OK]} ok, {counts[SKIPPED]} skipped, {counts[FAILED]} failed in "
            f"{self.report['seconds']:.0f}s; device {self.report['device']}, torch {self.report['torch']}, "
            f"triton {self.report['triton']}; results in {os.path.join(self.out, 'gpu_check.json')}",
            flush=True,
        )
        return 0 if counts[FAILED] == 0 else 1


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        driver = Driver(args)
    except ValueError as exc:
        print(f"gpu_check: {exc}", file=sys.stderr)
        return 2
    try:
        return driver.run()
    except KeyboardInterrupt:
        driver.stop_all()
        driver.report["interrupted"] = True
        driver.finish()
        return 130
