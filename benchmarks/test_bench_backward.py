"""Benchmark: forward_backward, every implementation interleaved (see benchmarks/conftest.py for options)."""

BENCH_OP = "forward_backward"


def test_forward_backward(case, run_case):
    records = run_case(case)
    assert {rec["impl"] for rec in records} >= {"peft", "fused"}
    assert all(rec["median_s"] > 0 for rec in records)
