"""pytest-benchmark front end of fused_lora.bench: `pytest benchmarks/ --benchmark-only`.

Each test is one case (op, shape, dtype, rank); pytest-benchmark times one interleaved round of all
implementations (merged / PEFT / addmm / fused, A B C D then B C D A ...), and the per-implementation medians,
p20/p80 and the paired ratios vs merged and vs PEFT go to benchmark.extra_info (so into --benchmark-json) and to
an overhead table at the end of the session.

Options: --bench-grid quick|targets|full (default quick: a few minutes on 2 CPU cores), --full-grid (= full),
--bench-device cpu|cuda (default: cuda when available), --bench-rounds N, --bench-threads N.
"""

import pytest
import torch

from fused_lora.bench import grid

_RESULTS = []


def pytest_addoption(parser):
    group = parser.getgroup("fused_lora bench")
    group.addoption(
        "--bench-grid",
        choices=grid.GRIDS,
        default="quick",
        help="which cases: quick (default), targets (PERFORMANCE.md), full (Llama-7B/8B grid)",
    )
    group.addoption("--full-grid", action="store_true", help="the full grid (same as --bench-grid full)")
    group.addoption(
        "--bench-device", choices=("cpu", "cuda"), default=None, help="default: cuda when torch sees one, else cpu"
    )
    group.addoption("--bench-rounds", type=int, default=5, help="interleaved rounds per case")
    group.addoption(
        "--bench-threads",
        type=int,
        default=None,
        help="torch CPU threads (1 is far steadier on a shared machine; default: torch's choice)",
    )


def _grid_name(config) -> str:
    return "full" if config.getoption("--full-grid") else config.getoption("--bench-grid")


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        op = metafunc.module.BENCH_OP
        cases = [c for c in grid.cases_for(_grid_name(metafunc.config)) if c.op == op]
        metafunc.parametrize("case", cases, ids=[c.label.replace(" ", "-") for c in cases])


@pytest.fixture(scope="session")
def bench_device(pytestconfig) -> torch.device:
    name = pytestconfig.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("--bench-device cuda but torch sees no CUDA device")
    if pytestconfig.getoption("--bench-threads"):
        torch.set_num_threads(pytestconfig.getoption("--bench-threads"))
    return torch.device(name)


@pytest.fixture
def run_case(benchmark, bench_device, pytestconfig):
    """Measure one case through pytest-benchmark; returns the records (one per implementation)."""
    from fused_lora.bench.impls import build
    from fused_lora.bench.runner import records_for
    from fused_lora.bench.timing import InterleavedTimer

    def run(case):
        setup = build(case, bench_device)
        timer = InterleavedTimer(
            setup.fns,
            bench_device,
            after_each=setup.after_each,
            min_sample_s=0.001 if bench_device.type == "cuda" else 0.005,
        ).prepare()
        benchmark.group = case.label
        benchmark.name = "interleaved round (all implementations)"
        benchmark.pedantic(timer.round, rounds=pytestconfig.getoption("--bench-rounds"), iterations=1)
        records = records_for(case, bench_device, setup, timer.timings)
        for rec in records:
            for key in (
                "median_s",
                "p20_s",
                "p80_s",
                "ratio_vs_merged",
                "ratio_vs_merged_p20",
                "ratio_vs_merged_p80",
                "ratio_vs_peft",
                "peak_extra_bytes",
                "backend",
            ):
                if key in rec:
                    benchmark.extra_info[f"{rec['impl']}.{key}"] = rec[key]
        _RESULTS.append(records)
        return records

    return run


def pytest_terminal_summary(terminalreporter):
    if not _RESULTS:
        return
    from fused_lora.bench.report import format_case
    from fused_lora.perf.cost_model import model_records

    terminalreporter.section("fused_lora overhead (paired ratios within each case; MODEL rows are not measured)")
    for records in _RESULTS:
        first = records[0]
        model = []
        if first["op"] != "mixed_forward":
            model = model_records(
                first["op"],
                [r["impl"] for r in records],
                first["M"],
                first["K"],
                first["N"],
                first["r"],
                first["dtype"],
            )
        terminalreporter.write_line(format_case(records, model))
