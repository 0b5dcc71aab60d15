"""Behaviour of the benchmark harness and report (not timings): paired ratios, interleaving, the JSON schema, the
plot, the peak-memory probe, and the cost model's byte counts against DESIGN.md §2."""
import json
import sys

import pytest
import torch

from fused_lora.bench import cost_model, memory
from fused_lora.bench.report import main as bench_main
from fused_lora.bench.timing import Timings, quantile, time_interleaved

MIB = 2 ** 20


# ---- cost model: DESIGN.md §2, bf16, M=8192, K=N=4096 (r=16; the rank-r terms are < 1 MiB) ----
@pytest.mark.parametrize("impl, mib, launches", [("merged", 160, 1), ("peft", 608, 5), ("addmm", 352, 3),
                                                 ("fused", 224, 2)])
def test_forward_bytes_match_design(impl, mib, launches):
    est = cost_model.estimate("forward", impl, 8192, 4096, 4096, 16, "bfloat16", cost_model.GPUS["H100"])
    assert est.bytes / MIB == pytest.approx(mib, abs=1.5)
    assert est.launches == launches


def test_small_m_fused_is_one_launch_and_bandwidth_bound():
    gpu = cost_model.GPUS["H100"]
    fused = cost_model.estimate("forward", "fused", 16, 4096, 4096, 16, "bfloat16", gpu)
    merged = cost_model.estimate("forward", "merged", 16, 4096, 4096, 16, "bfloat16", gpu)
    assert fused.launches == 1
    assert fused.flops > merged.flops  # the shrink recomputed per column tile...
    assert fused.seconds < merged.seconds * 1.05  # ...costs nothing while W's bytes bound the time


def test_roofline_time_is_max_of_bytes_and_flops_plus_launches():
    gpu = cost_model.GPUS["A100"]
    est = cost_model.estimate("forward", "merged", 8192, 4096, 4096, 16, "bfloat16", gpu)
    expected = max(est.bytes / gpu.bandwidth, est.flops / gpu.peak["bfloat16"]) + cost_model.LAUNCH_S
    assert est.seconds == pytest.approx(expected)
    rows = cost_model.model_records("forward", ["merged", "peft"], 512, 4096, 4096, 16, "float32")
    assert {row["kind"] for row in rows} == {"MODEL"}
    assert [row["ratio_vs_merged"] for row in rows if row["impl"] == "merged"] == [1.0, 1.0]
    assert all(row["ratio_vs_merged"] > 1.0 for row in rows if row["impl"] == "peft")


def test_merge_model_fused_moves_two_weights_peft_six():
    w = 4096 * 4096 * 2
    fused = cost_model.estimate("merge", "fused", 0, 4096, 4096, 16, "bfloat16", cost_model.GPUS["H100"])
    peft = cost_model.estimate("merge", "peft", 0, 4096, 4096, 16, "bfloat16", cost_model.GPUS["H100"])
    assert fused.bytes == pytest.approx(2 * w, rel=0.01)
    assert peft.bytes == pytest.approx(6 * w, rel=0.01)


# ---- timing ----
def test_ratio_is_paired_per_round_not_a_ratio_of_medians():
    t = Timings({"merged": [1.0, 3.0, 2.0], "x": [3.0, 3.0, 6.0]})
    assert t.ratio("x", "merged").median == pytest.approx(3.0)  # rounds: 3, 1, 3
    assert t.spread("x").median / t.spread("merged").median == pytest.approx(1.5)
    assert t.ratio("merged", "merged").median == 1.0
    assert quantile([4.0, 1.0, 3.0, 2.0, 5.0], 0.2) == pytest.approx(1.8)


def test_time_interleaved_rotates_order_and_restores_after_each_call():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    restored = []
    timings = time_interleaved(fns, torch.device("cpu"), rounds=3, warmup=0, min_sample_s=0.0,
                               after_each={"b": lambda: restored.append(len(calls))})
    measured = calls[-9:]
    assert measured == list("abc") + list("bca") + list("cab")
    assert all(len(v) == 3 for v in timings.samples.values())
    assert len(restored) == calls.count("b")  # every call of b, warmup and probe included, was followed by it


def test_cpu_peak_extra_memory_sees_a_temporary():
    if not sys.platform.startswith("linux"):
        pytest.skip("RSS high-water probe is Linux-only")

    def make_temporary():
        t = torch.ones(16 * MIB // 4)  # 16 MiB, written so its pages are resident
        return float(t[-1])

    peak = memory.peak_extra_bytes(make_temporary, torch.device("cpu"))
    assert peak is not None and 15 * MIB <= peak <= 40 * MIB


# ---- the report end to end, tiny shapes ----
RECORD_KEYS = {"op": str, "impl": str, "device": str, "dtype": str, "M": int, "K": int, "N": int, "r": int,
               "n_adapters": int, "median_s": float, "p20_s": float, "p80_s": float}


def test_report_writes_json_and_plot(tmp_path, capsys):
    json_path, png_path, md_path = tmp_path / "bench.json", tmp_path / "bench.png", tmp_path / "bench.md"
    rc = bench_main(["--device", "cpu", "--ops", "forward,forward_backward,merge,mixed_forward", "--tokens", "8",
                     "--shapes", "40x24", "--ranks", "3", "--dtypes", "float32", "--adapters", "2", "--rounds", "3",
                     "--json", str(json_path), "--plot", str(png_path), "--markdown", str(md_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "MODEL MiB" in out and "H100 us" in out and "x merged" in out
    data = json.loads(json_path.read_text())
    records = data["records"]
    assert {(r["op"], r["impl"]) for r in records} == {
        ("forward", i) for i in ("merged", "peft", "addmm", "fused")} | {
        ("forward_backward", i) for i in ("merged", "peft", "addmm", "fused")} | {
        ("merge", "peft"), ("merge", "fused")} | {("mixed_forward", i) for i in ("merged", "peft", "fused")}
    for rec in records:
        for key, kind in RECORD_KEYS.items():
            assert isinstance(rec[key], kind), (key, rec)
        assert "ratio_vs_merged" in rec
        assert rec["p20_s"] <= rec["median_s"] <= rec["p80_s"]
        assert rec["rounds"] == 3
        if rec["op"] == "merge":
            assert rec["ratio_vs_merged"] is None and rec["ratio_vs_peft"] is not None
            assert "peak_extra_bytes" in rec
        else:
            assert rec["ratio_vs_merged"] > 0
        if rec["impl"] == "merged":
            assert rec["ratio_vs_merged"] == rec["ratio_vs_merged_p20"] == rec["ratio_vs_merged_p80"] == 1.0
    assert all(row["kind"] == "MODEL" for row in data["model"])
    assert {row["op"] for row in data["model"]} == {"forward", "forward_backward", "merge"}
    assert data["meta"]["device"] == "cpu" and data["meta"]["grid"] == "custom"
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = md_path.read_text()
    assert "| forward | float32 | 8 | 40->24 | 3 |" in markdown and "fused peak extra MiB" in markdown


def test_report_rejects_unknown_op():
    with pytest.raises(SystemExit):
        bench_main(["--ops", "sideways"])
