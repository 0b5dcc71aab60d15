"""The GPU check kit (scripts/gpu_check.sh): its dry run end to end, as CI runs it, and the parts that decide what a
GPU run reports (step selection, the budget stop, test outcomes, sanitizer output)."""

import json
import os
import subprocess
import sys
import time

import pytest

from fused_lora.gpu_check import plan
from fused_lora.gpu_check.context import Context
from fused_lora.gpu_check.driver import RunningStep, child_env
from fused_lora.gpu_check.steps import sanitizer
from fused_lora.gpu_check.steps import tests as tests_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run for the module: the python running the tests, no index, no venv activation, output in a tmp dir."""
    out = tmp_path_factory.mktemp("gpu_check")
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "TRITON_INTERPRET", "FUSED_LORA_BACKEND")}
    env.update(PIP_NO_INDEX="1", OUT=str(out), PYTHON=sys.executable)
    began = time.time()
    done = subprocess.run(
        ["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), "--dry-run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    report_path = out / "gpu_check.json"
    assert report_path.exists(), (
        f"no gpu_check.json; exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )
    return done, json.loads(report_path.read_text()), out, time.time() - began


def test_dry_run_exits_zero_and_reports_every_step(dry_run):
    done, report, out, seconds = dry_run
    print(f"\ndry run: {seconds:.0f}s wall\n" + done.stdout[-2500:])
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    for key in ("device", "torch", "triton", "steps", "mode", "ok", "seconds", "budgets"):
        assert key in report, key
    assert report["device"] == "cpu" and report["mode"] == "dry-run" and report["ok"] is True
    assert [s["name"] for s in report["steps"]][0] == "environment"
    assert sorted(s["name"] for s in report["steps"]) == sorted(s.name for s in plan.STEPS)
    for step in report["steps"]:
        assert set(step) >= {"name", "status", "seconds", "detail"}, step
        assert step["status"] in ("ok", "skipped"), step
        assert isinstance(step["seconds"], (int, float)) and step["detail"]
        assert os.path.exists(out / step["log"])


def test_dry_run_runs_what_the_cpu_can_and_says_why_it_skips_the_rest(dry_run):
    _, report, out, _ = dry_run
    steps = {s["name"]: s for s in report["steps"]}
    for name in ("environment", "tests", "compile", "tune", "bench"):
        assert steps[name]["status"] == "ok", steps[name]
    for name in ("graphs", "sanitizer", "offsets"):  # need CUDA; their plumbing still ran on the CPU
        assert steps[name]["status"] == "skipped" and "GPU" in steps[name]["detail"], steps[name]
    assert "ok" in steps["offsets"]["detail"] and "safe_merge ok" in steps["sanitizer"]["detail"]
    assert steps["environment"]["data"]["torch"] == report["torch"]
    counts = steps["tests"]["data"]["counts"]
    assert counts["passed"] > 0 and counts["failed"] == counts["error"] == counts["not run"] == 0
    bench = json.loads((out / "bench.json").read_text())
    assert bench["records"] and {r["impl"] for r in bench["records"]} >= {"merged", "peft", "fused"}
    assert (out / "bench.md").exists()


def test_dry_run_tuned_file_round_trips(dry_run):
    _, report, out, _ = dry_run
    tune = next(s for s in report["steps"] if s["name"] == "tune")
    assert tune["data"]["read_back"] == "ok"
    from fused_lora.kernels import tuned

    data = tuned.read_file(os.path.join(out, tune["data"]["path"]))
    assert data["gpu"] == tune["data"]["gpu"] and data["kernels"]
    for classes in data["kernels"].values():
        for entry in classes.values():
            assert entry["candidates"][0]["config"] == entry["default"]


def test_kit_never_makes_a_venv_or_installs():
    texts = [open(os.path.join(ROOT, "scripts", "gpu_check.sh")).read()]
    kit = os.path.join(ROOT, "fused_lora", "gpu_check")
    for dirpath, _, files in os.walk(kit):
        texts += [open(os.path.join(dirpath, f)).read() for f in files if f.endswith(".py")]
    for text in texts:
        for forbidden in ("-m venv", "virtualenv", "bin/activate", "pip install", "pip3 install", "setup.py"):
            assert forbidden not in text, forbidden


def test_step_selection():
    names = [s.name for s in plan.select(["bench"], [])]
    assert names == ["environment", "bench"]
    assert "tests" not in [s.name for s in plan.select([], ["tests"])]
    with pytest.raises(ValueError, match="unknown step"):
        plan.select(["nope"], [])
    for mode in plan.MODES:  # the planned wall time fits the run's limit
        check = max(s.budget[mode] for s in plan.STEPS if s.phase == "check")
        rest = sum(s.budget[mode] for s in plan.STEPS if s.phase != "check")
        assert check + rest <= plan.TOTAL_S[mode], mode


def test_a_step_past_its_budget_is_stopped_and_reported_failed(tmp_path):
    step = plan.Step("environment", "setup", {"dry-run": 0.5}, "", "")
    ctx = Context(mode="dry-run", out=str(tmp_path), root=ROOT, budget_s=0.5, python=sys.executable)
    running = RunningStep(step, ctx, child_env("dry-run", str(tmp_path)))
    began = time.time()
    res = None
    while res is None and time.time() - began < 60:
        res = running.poll()
        time.sleep(0.1)
    assert res is not None and res["status"] == "failed"
    assert "stopped at" in res["detail"]
    assert res["seconds"] < 0.5 * plan.HARD_FACTOR + plan.HARD_GRACE_S + 5


def test_shards_keep_order_and_cover_everything():
    ids = [f"t{i}" for i in range(11)]
    shards = tests_step.shards_of(ids, 3)
    assert [len(s) for s in shards] == [4, 4, 3] and sum(shards, []) == ids
    assert tests_step.shards_of(ids[:1], 4) == [["t0"]]


def test_gpu_runs_the_contract_cuda_cases_only_and_bf16_first():
    cuda_bf16 = "tests/test_contract.py::test_contract[cuda-linear/bf16/dropout]"
    cuda_fp32 = "tests/test_contract.py::test_contract[cuda-linear/fp32/dropout]"
    cpu = "tests/test_contract.py::test_contract[reference-linear/bf16/dropout]"
    ours = "tests/test_triton_dense.py::test_forward_and_backward_match_reference[M5]"
    assert [tests_step.gpu_worthy(i, quick=True) for i in (cuda_bf16, cuda_fp32, cpu, ours)] == [
        True,
        False,
        False,
        True,
    ]
    assert [tests_step.gpu_worthy(i, quick=False) for i in (cuda_bf16, cuda_fp32, cpu, ours)] == [
        True,
        True,
        False,
        True,
    ]


def test_declared_ranges_hold_what_is_tested():
    tomllib = pytest.importorskip("tomllib")
    import torch

    from fused_lora.gpu_check.steps.environment import MIN_TORCH, MIN_TRITON, version_tuple

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]

    def bounds(requirement):
        low = version_tuple(requirement.split(">=")[1].split(",")[0])
        high = version_tuple(requirement.split("<")[1]) if "<" in requirement else None
        return low, high

    torch_req = next(r for r in project["dependencies"] if r.startswith("torch"))
    triton_req = next(r for r in project["optional-dependencies"]["triton"] if r.startswith("triton"))
    (torch_low, torch_high), (triton_low, triton_high) = bounds(torch_req), bounds(triton_req)
    # the kit refuses exactly what pyproject excludes at the bottom; this environment sits inside the ranges
    assert torch_low == MIN_TORCH and triton_low == MIN_TRITON
    assert torch_low <= version_tuple(torch.__version__) < torch_high
    triton = pytest.importorskip("triton")
    assert triton_low <= version_tuple(triton.__version__) < triton_high


def test_outcomes_take_the_worst_phase_of_each_test(tmp_path):
    path = tmp_path / "shard.jsonl"
    lines = [
        {"nodeid": "a", "when": "call", "outcome": "passed", "seconds": 1.0},
        {"nodeid": "b", "when": "call", "outcome": "failed", "seconds": 0.5, "message": "E  assert 1 == 2"},
        {"nodeid": "c", "when": "setup", "outcome": "skipped", "seconds": 0.0, "message": "bf16"},
        {"nodeid": "d", "when": "call", "outcome": "passed", "seconds": 0.1},
        {"nodeid": "d", "when": "teardown", "outcome": "failed", "seconds": 0.0, "message": "boom"},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + '\n{"cut by a kill')
    got = tests_step.outcomes([str(path), str(tmp_path / "missing.jsonl")])
    assert {k: v["outcome"] for k, v in got.items()} == {"a": "passed", "b": "failed", "c": "skipped", "d": "error"}


def test_sanitizer_passes_only_flags_its_help_lists_and_reads_its_summaries():
    cmd = sanitizer.command("cs", "racecheck", "  --print-limit <n>\n  --show-backtrace", ["python", "t.py"])
    assert cmd[:5] == ["cs", "--tool", "racecheck", "--error-exitcode", str(sanitizer.SANITIZER_ERRORS)]
    assert "--print-limit" in cmd and "--show-backtrace" in cmd and "--report-api-errors" not in cmd
    assert cmd[-2:] == ["python", "t.py"]
    clean = sanitizer.summarize("memcheck", 0, "rows_bwd ok (M=45)\n========= ERROR SUMMARY: 0 errors\n")
    assert clean["ok"] and clean["errors"] == 0
    dirty = sanitizer.summarize(
        "memcheck",
        sanitizer.SANITIZER_ERRORS,
        "========= Invalid __global__ read of size 2 bytes\n========= ERROR SUMMARY: 3 errors\n",
    )
    assert not dirty["ok"] and dirty["errors"] == 3 and "Invalid" in dirty["findings"][0]
    race = sanitizer.summarize("racecheck", 0, "========= RACECHECK SUMMARY: 2 hazards displayed (1 error, 1 warning)")
    assert not race["ok"] and race["race_errors"] == 1 and race["race_warnings"] == 1
