"""Benchmark: forward, every implementation interleaved (see benchmarks/conftest.py for options)."""

BENCH_OP = "forward"


def test_forward(case, run_case):
    records = run_case(case)
    assert {rec["impl"] for rec in records} >= {"peft", "fused"}
    assert all(rec["median_s"] > 0 for rec in records)
