"""Ahead-of-time compilation gate of every Triton kernel config (benchmarks/codegen.py), sm_80 and sm_90.

The gate reads a committed snapshot (fused_lora/perf/codegen_gate.json) under content keys (benchmarks/codegen_key.py)
and compiles only the (spec, arch) pairs whose key it lacks, plus a rotating sample of the others that must equal
their rows: under 2 minutes on 2 cores when no kernel changed; a changed kernel is compiled and gated for real.
Marker "codegen" (compiles; deselect with `-m "not codegen"`). The key tests compile nothing.
Every run is a subprocess: the tool must see the real compiler, and this process may run the interpreter.
"""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "benchmarks" / "codegen.py"
SNAPSHOT = ROOT / "fused_lora" / "perf" / "codegen_gate.json"
ARCHES = (80, 90)
SAMPLE = 12


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(extra)
    return env


def _run_tool(*args, timeout=1800):
    return subprocess.run(
        [sys.executable, str(TOOL), *map(str, args)],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _modules_with_specs() -> set:
    # Read the sources instead of importing them: importing would decorate the kernels in this process.
    return {
        f"fused_lora.kernels.{p.stem}" for p in (ROOT / "kernels").glob("*.py") if "def codegen_specs(" in p.read_text()
    }


@pytest.mark.codegen
def test_every_kernel_config_compiles_without_spills_and_uses_tensor_cores(tmp_path):
    out = tmp_path / "codegen.json"
    proc = _run_tool("--arch", *ARCHES, "--check-snapshot", "--sample", SAMPLE, "--json", out)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert out.exists(), f"codegen wrote no JSON (rc {proc.returncode}):\n{tail}"
    report = json.loads(out.read_text())

    assert sorted(report["arches"]) == list(ARCHES)
    assert not report["import_errors"], report["import_errors"]
    assert set(report["modules"]) == _modules_with_specs()
    compiled = {(r["module"], r["name"], r["arch"]) for r in report["results"]}
    only = report.get("spec_arches", {})  # specs limited to some arches (extra["arches"]: TMA kernels, sm_90)
    for module, names in report["modules"].items():
        assert names, f"{module}.codegen_specs() is empty"
        for name in names:
            for arch in (a for a in ARCHES if a in only.get(name, ARCHES)):
                assert (module, name, arch) in compiled, f"{name} not compiled for sm_{arch}"
    failed = [
        f"sm_{r['arch']} {r['name']}: {r['failures']} ({r['source']})" for r in report["results"] if r["failures"]
    ]
    assert not failed, "\n".join(failed) + "\n" + tail
    for r in report["results"]:  # TMA where promised, whether the row was compiled now or recorded
        if r["requires_tma"] and r["arch"] >= 90:
            assert r["tma_loads"] > 0, r
    snap = report["snapshot"]
    assert not snap["stale"], "\n".join(snap["stale"])
    recorded = len(report["results"]) - len(snap["missing"])
    assert len(snap["sampled"]) == min(SAMPLE, recorded)  # the snapshot is checked against the compiler every run
    assert proc.returncode == 0, tail
    if snap["missing"]:
        warnings.warn(
            f"{len(snap['missing'])} (spec, arch) pairs are not in {SNAPSHOT.name} (compiled and gated "
            f"now, every run): python benchmarks/codegen.py --arch 80 90 --update-snapshot --incremental",
            stacklevel=2,
        )


_CURRENT_KEYS = """
import json, sys
sys.path.insert(0, sys.argv[1])
import codegen
found, _ = codegen.discover()
rows = [dict(codegen.spec_fields(m, codegen._spec(m, i), a), **codegen.spec_key(codegen._spec(m, i), a))
        for m, i, a in codegen.select(found, [80, 90], sys.argv[2])]
print(json.dumps({"schema": codegen.SNAPSHOT_SCHEMA, "rows": rows}))
"""


def _snapshot_with_current_keys(only: str, path: Path, measured: dict) -> dict:
    """A snapshot of made-up results under today's keys of the specs named `only`: {arch: row}."""
    proc = subprocess.run(
        [sys.executable, "-c", _CURRENT_KEYS, str(ROOT / "benchmarks"), only],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    made_up = {
        "registers": 24,
        "spill_stores": 0,
        "spill_loads": 0,
        "stack_frame": 0,
        "shared": 0,
        "mma": {},
        "tma": {},
        "tma_loads": 0,
        "ptx_missing": [],
    }
    rows = {
        r["arch"]: {**r, **made_up, "gpu_name": f"sm_{r['arch']}", **measured.get(r["arch"], {})} for r in data["rows"]
    }
    assert set(rows) == set(ARCHES), data
    path.write_text(json.dumps({"schema": data["schema"], "rows": list(rows.values())}))
    return rows


@pytest.mark.codegen
def test_check_catches_an_edited_row_and_compiles_and_gates_missing_ones(tmp_path):
    """The cheapest spec (dropout_keep), one or two compiles a run."""
    path, out = tmp_path / "snap.json", tmp_path / "out.json"
    _snapshot_with_current_keys("dropout_keep", path, {90: {"registers": -1}})
    data = json.loads(path.read_text())
    data["rows"] = [r for r in data["rows"] if r["arch"] == 90]  # sm_80 missing
    path.write_text(json.dumps(data))
    check = ("--arch", *ARCHES, "--check-snapshot", "--only", "dropout_keep", "--snapshot", path, "--jobs", 1)

    proc = _run_tool(*check, "--sample", SAMPLE, "--json", out)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 1, text
    assert "STALE SNAPSHOT ROW sm_90 dropout_keep[BLOCK=1024]: registers -1 recorded" in text, text
    report = json.loads(out.read_text())
    assert report["snapshot"]["missing"] == ["sm_80 dropout_keep[BLOCK=1024]"]
    by_arch = {r["arch"]: r for r in report["results"]}
    assert by_arch[80]["source"] == "compiled" and by_arch[80]["failures"] == [] and by_arch[80]["registers"] > 0
    assert by_arch[90]["source"] == "sampled" and by_arch[90]["registers"] > 0

    unsampled = _run_tool(*check, "--sample", 0)  # the edited row is not looked at; the missing one passes
    assert unsampled.returncode == 0 and "warning: 1 (spec, arch) pairs" in unsampled.stdout, unsampled.stdout
    strict = _run_tool(*check, "--sample", 0, "--strict")
    assert strict.returncode == 1 and "MISSING: 1 (spec, arch) pairs" in strict.stdout, strict.stdout


def test_check_gates_recorded_rows_without_compiling(tmp_path):
    """A recorded result is gated like a fresh one: a row that spills fails, with no compile at all."""
    path = tmp_path / "snap.json"
    _snapshot_with_current_keys("dropout_keep", path, {90: {"spill_stores": 8}})
    proc = _run_tool("--arch", *ARCHES, "--check-snapshot", "--only", "dropout_keep", "--sample", 0, "--snapshot", path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "0 sampled and recompiled, 0 compiled as missing" in proc.stdout, proc.stdout
    assert "GATE FAILED sm_90 dropout_keep[BLOCK=1024]: spills 8/0 B [recorded result]" in proc.stdout
    assert "GATE FAILED sm_80" not in proc.stdout


def test_cost_model_reads_the_gate_snapshot_for_every_config_it_looks_up():
    """fused_lora.perf.occupancy reads the sm_90 rows of the same snapshot; a renamed spec would leave the model
    on estimates without this."""
    from fused_lora.perf import occupancy

    rows = [r for r in json.loads(SNAPSHOT.read_text())["rows"] if r["arch"] == 90 and "error" not in r]
    assert occupancy.SNAPSHOT == str(SNAPSHOT) and set(occupancy.snapshot()) == {r["name"] for r in rows}
    row = rows[0]
    assert occupancy.snapshot()[row["name"]]["registers"] == row["registers"]
    for kernel, tokens in [
        ("fused_gemm", ["y", "dense", "BM=128", "BN=128", "bf16"]),
        ("shrink", ["dense", "BR=16", "bf16"]),
        ("decode", ["BM=16", "bf16"]),
        ("ds", ["dense", "bf16"]),
        ("fused_gemm_tma", ["y", "dense", "BM=128", "BN=128", "bf16"]),
    ]:
        assert occupancy.lookup(kernel, tokens).source == "codegen sm_90 snapshot", (kernel, tokens)
    assert occupancy.tma_loads("fused_gemm_tma", ["y", "dense", "BM=128", "bf16"]) > 0


# ---- content keys (benchmarks/codegen_key.py): import only, nothing compiled -----------------------------------
_HELPERS = """
import triton
import triton.language as tl

LIMIT = tl.constexpr(4)


@triton.jit
def inner(x):
    return x * 2


@triton.jit
def scale(x):
    return inner(x) + 1
"""
_KERNELS = """
import triton
import triton.language as tl

from keyprobe import helpers
from keyprobe.helpers import scale


@triton.jit
def by_name(X, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(X + offs, scale(tl.load(X + offs)))


@triton.jit
def by_attribute(X, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(X + offs, helpers.scale(tl.load(X + offs)) + helpers.LIMIT)
"""
_KEYS = """
import json, sys
sys.path.insert(0, sys.argv[1])
from types import SimpleNamespace
import codegen
from keyprobe import kernels

def key(fn, arch=90, sig="*fp32", block=64, warps=4, stages=3, **extra):  # a KernelSpec, without importing torch
    spec = SimpleNamespace(name="probe", fn=fn, signature={"X": sig, "BLOCK": "constexpr"}, constexprs={"BLOCK": block},
                           num_warps=warps, num_stages=stages, uses_tensor_cores=False, extra=extra)
    return codegen.spec_key(spec, arch)["key"]

keys = {}
for name in ("by_name", "by_attribute"):
    fn = getattr(kernels, name)
    keys[name] = key(fn)
    keys[name + " variants"] = [key(fn, arch=80), key(fn, sig="*fp16"), key(fn, block=128), key(fn, warps=8),
                                key(fn, stages=2), key(fn, ptx_patterns={"p": "bar"})]
print(json.dumps(keys))
"""


def _probe_keys(package: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", _KEYS, str(ROOT / "benchmarks")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(PYTHONPATH=str(package.parent)),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def test_key_changes_with_every_input_that_can_change_the_code_and_only_then(tmp_path):
    package = tmp_path / "keyprobe"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "helpers.py").write_text(_HELPERS)
    (package / "kernels.py").write_text(_KERNELS)
    base = _probe_keys(package)
    assert _probe_keys(package) == base  # the same in every process (no ids or addresses in it)
    for name in ("by_name", "by_attribute"):
        variants = base[name + " variants"]
        assert len(set(variants + [base[name]])) == len(variants) + 1, variants  # arch, signature, ...

    (package / "helpers.py").write_text(_HELPERS + "\n\ndef unrelated():\n    return 1\n")
    assert _probe_keys(package) == base  # content addressed: an edit the kernels do not reach changes nothing

    _edit(package / "helpers.py", "return x * 2", "return x * 3")  # two calls deep, in another module
    after_helper = _probe_keys(package)
    assert after_helper["by_name"] != base["by_name"] and after_helper["by_attribute"] != base["by_attribute"]

    # A constexpr read through its module: Triton 3.9's cache_key misses it, the key must not
    _edit(package / "helpers.py", "LIMIT = tl.constexpr(4)", "LIMIT = tl.constexpr(5)")
    after_limit = _probe_keys(package)
    assert after_limit["by_attribute"] != after_helper["by_attribute"]
    assert after_limit["by_name"] == after_helper["by_name"]  # it does not read LIMIT
