"""Ahead-of-time compilation gate of every Triton kernel config (benchmarks/codegen.py), sm_80 and sm_90.

Marker "codegen" (slow: about 300 compiles, 15-30 minutes on 2 cores, less with a warm Triton cache); deselect with
`-m "not codegen"`. Registered in pyproject.toml:
    markers = ["codegen: ahead-of-time compilation of every Triton kernel config for sm_80/sm_90 (slow)"]
Runs the tool in a subprocess: it must see the real compiler, and this process may run the interpreter.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARCHES = (80, 90)


def _modules_with_specs() -> set:
    # Read the sources instead of importing them: importing would decorate the kernels in this process.
    return {f"fused_lora.kernels.{p.stem}" for p in (ROOT / "kernels").glob("*.py")
            if "def codegen_specs(" in p.read_text()}


@pytest.mark.codegen
def test_every_kernel_config_compiles_without_spills_and_uses_tensor_cores(tmp_path):
    out = tmp_path / "codegen.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "codegen.py"), "--arch", *map(str, ARCHES),
                           "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
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
    failed = [f"sm_{r['arch']} {r['name']}: {r['failures']}" for r in report["results"] if r["failures"]]
    assert not failed, "\n".join(failed)
    assert proc.returncode == 0, tail
