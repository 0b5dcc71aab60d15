"""ISA levels of the C++ backend (csrc/isa.h): every level the CPU supports can be forced, by FUSED_LORA_CPU_ISA at
load or by cpp_backend.use_isa at run time, and forcing one really runs that level's code (dispatch trace, distinct
builds). Results per level are checked by tests/test_cpp_backend.py, which runs every case once per level."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest
import torch

try:
    from fused_lora.ops import cpp_backend as cb
except ImportError as exc:
    if os.environ.get("CI"):
        raise
    pytest.skip(f"C++ backend not built: {exc}", allow_module_level=True)

LEVELS = ("baseline", "avx2", "avx512", "avx512_bf16")
GENERIC = ("convert", "dropout", "merge", "expand")  # built once per level up to avx512


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _levels_from_cpuinfo() -> list[str] | None:
    """What the CPU flags say the levels should be (x86-64 Linux only)."""
    flags = _cpu_flags()
    if platform.machine() != "x86_64" or not flags:
        return None
    v3 = {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}
    v4 = v3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
    out = ["baseline"]
    if v3 <= flags:
        out.append("avx2")
        if v4 <= flags:
            out.append("avx512")
            if "avx512_bf16" in flags:
                out.append("avx512_bf16")
    return out


def test_levels_are_the_cpus_lowest_first():
    paths = cb.isa_paths()
    assert paths == list(LEVELS[: len(paths)])
    expected = _levels_from_cpuinfo()
    if expected is not None and len(paths) > 1:  # one level only: a build without per-level code (not GCC >= 11)
        assert paths == expected


_PROBE = (
    "import json, warnings\n"
    "with warnings.catch_warnings(record=True) as caught:\n"
    "    warnings.simplefilter('always')\n"
    "    from fused_lora.ops import cpp_backend as cb\n"
    "print(json.dumps({'active': cb.active_isa(),\n"
    "                  'warnings': [str(w.message) for w in caught if 'FUSED_LORA_CPU_ISA' in str(w.message)]}))\n"
)


def _probe(env_values: list[str | None]) -> list[dict]:
    """active_isa() and the load warnings of fresh processes (run side by side), one per FUSED_LORA_CPU_ISA value
    (None: unset)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    procs = []
    for value in env_values:
        env = dict(os.environ)
        env.pop("FUSED_LORA_CPU_ISA", None)
        if value is not None:
            env["FUSED_LORA_CPU_ISA"] = value
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", _PROBE],
                env=env,
                cwd=root,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    results = []
    for value, proc in zip(env_values, procs):
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, (value, err[-3000:])
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def test_env_var_forces_every_level_at_load():
    """One fresh process per setting: unset (the best level), each level, a level beyond the CPU, a typo."""
    paths = cb.isa_paths()
    beyond = LEVELS[len(paths)] if len(paths) < len(LEVELS) else None  # a level this CPU cannot run
    settings = [None, *paths, "avx3"] + ([beyond] if beyond else [])
    got = dict(zip(map(str, settings), _probe(settings)))
    assert got["None"]["active"] == paths[-1] and not got["None"]["warnings"]
    for level in paths:
        assert got[level]["active"] == level and not got[level]["warnings"], (level, got[level])
    assert got["avx3"]["active"] == paths[-1] and any("not a level" in w for w in got["avx3"]["warnings"])
    if beyond:  # clamped, and said so
        assert got[beyond]["active"] == paths[-1]
        assert any(beyond in w and "beyond" in w for w in got[beyond]["warnings"]), got[beyond]


def test_use_isa_sets_and_restores_the_level():
    paths = cb.isa_paths()
    start = cb.active_isa()
    for level in paths:
        with cb.use_isa(level) as active:
            assert active == level == cb.active_isa()
            with cb.use_isa("baseline"):
                assert cb.active_isa() == "baseline"
            assert cb.active_isa() == level
        assert cb.active_isa() == start
    with cb.use_isa("auto"):
        assert cb.active_isa() == paths[-1]
    with pytest.raises(ValueError, match="not one of"):
        with cb.use_isa("avx3"):
            pass
    if len(paths) < len(LEVELS):
        with pytest.raises(ValueError, match="cannot run here"):
            with cb.use_isa(LEVELS[len(paths)]):
                pass
    assert cb.active_isa() == start


def _workload():
    """Calls that reach every kernel family: dense fwd/bwd with and without dropout (bf16, fp32), per-row, merge."""
    torch.manual_seed(0)
    M, K, N, R = 70, 45, 29, 5
    seed = torch.tensor([3], dtype=torch.int64)
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(M, K).to(dtype)
        w, b = torch.randn(N, K).to(dtype), torch.randn(N).to(dtype)
        a, bb, scale = torch.randn(R, K).to(dtype), torch.randn(N, R).to(dtype), torch.ones(R)
        for dps in ([0.0], [0.2]):
            y, t = cb.lora_fwd(x, w, b, a, bb, scale, [0, R], dps, seed)
            cb.lora_bwd(torch.randn(M, N).to(dtype), x, w, a, bb, scale, t, [0, R], dps, seed, True)
        ids = torch.randint(-1, 1, (M,))
        y, t = cb.lora_rows_fwd(x, w, b, a, bb, scale, [0, R], ids, [0.1], seed)
        cb.lora_rows_bwd(torch.randn(M, N).to(dtype), x, w, a, bb, scale, t, [0, R], ids, [0.1], seed, True)
        cb.lora_merge_(w.clone(), a, bb, scale, 1.0, False, True)


@pytest.mark.parametrize("level", cb.isa_paths())
def test_each_level_runs_its_own_code(level):
    """The dispatch trace: every family runs the build of the forced level (the avx512 build serves avx512_bf16),
    the AVX-512 dA/dB kernel only from avx512 up, the AVX512-BF16 shrink only at avx512_bf16; nothing else."""
    with cb.use_isa(level), cb.trace_isa_kernels() as counts:
        _workload()
    generic = LEVELS[min(LEVELS.index(level), LEVELS.index("avx512"))]
    for family in GENERIC:
        assert counts[family][generic] > 0, (family, counts[family])
        assert all(n == 0 for lv, n in counts[family].items() if lv != generic), (family, counts[family])
    at_least_avx512 = LEVELS.index(level) >= LEVELS.index("avx512")
    assert (counts["outer_acc"]["avx512"] > 0) == at_least_avx512, counts["outer_acc"]
    assert sum(counts["outer_acc"].values()) == counts["outer_acc"]["avx512"]
    assert (counts["shrink_bf16"]["avx512_bf16"] > 0) == (level == "avx512_bf16"), counts["shrink_bf16"]
    assert sum(counts["shrink_bf16"].values()) == counts["shrink_bf16"]["avx512_bf16"]


def test_trace_is_off_outside_the_block():
    with cb.trace_isa_kernels() as counts:
        pass
    _workload()
    assert all(n == 0 for per_level in counts.values() for n in per_level.values())
    assert all(n == 0 for per_level in cb._C.isa_trace_counts().values() for n in per_level.values())


def test_level_builds_are_distinct_code():
    """Each level's build of the generic loops is its own machine code, not one function reached three ways."""
    addresses = cb._C.isa_loop_addresses()
    builds = [lv for lv in ("baseline", "avx2", "avx512") if lv in cb.isa_paths()]
    assert sorted(addresses) == sorted(builds)
    for i, lv in enumerate(builds):
        for other in builds[i + 1 :]:
            assert all(p != q for p, q in zip(addresses[lv], addresses[other])), (lv, other)
