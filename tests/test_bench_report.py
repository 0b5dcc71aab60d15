"""Behaviour of the benchmark harness and report (not timings): paired ratios, interleaving, the JSON schema, the
plot, the peak-memory probe, and the cost model's byte counts against DESIGN.md §2."""

import json
import sys

import pytest
import torch

from fused_lora.bench import memory
from fused_lora.bench.report import main as bench_main
from fused_lora.bench.timing import Timings, quantile, time_interleaved
from fused_lora.perf import cost_model, gpu_model
from fused_lora.perf.gpu_model import Launch, Occupancy, launch_time
from fused_lora.perf.plans import Shape

MIB = 2**20


# ---- cost model: DESIGN.md section 2, bf16, M=8192, K=N=4096 (r=16; the rank-r terms are < 1 MiB) ----
@pytest.mark.parametrize(
    "impl, mib, launches", [("merged", 160, 1), ("peft", 608, 5), ("addmm", 352, 3), ("fused_before", 224, 2)]
)
def test_forward_bytes_match_design(impl, mib, launches):
    est = cost_model.estimate(impl, Shape("forward", 8192, 4096, 4096, 16), "H100")
    assert est.bytes / MIB == pytest.approx(mib, abs=1.5)
    assert len(est.launches) == launches


def test_split_shrink_adds_only_its_partials():
    shape = Shape("forward", 8192, 4096, 4096, 16)
    before = cost_model.estimate("fused_before", shape)
    after = cost_model.estimate("fused", shape)
    shrink = after.launches[0]
    assert "split" in (shrink.name + shrink.note) and shrink.programs >= 2 * 132  # fills the GPU (issue 13)
    assert before.launches[0].programs == 8192 // 64  # one program per 64 rows at dd3ed58
    assert before.bytes <= after.bytes < 1.02 * before.bytes  # the fp32 partials are all it adds


def test_decode_fused_is_one_launch_reading_w_once():
    fused = cost_model.estimate("fused", Shape("forward", 16, 4096, 4096, 16), "H100")
    merged = cost_model.estimate("merged", Shape("forward", 16, 4096, 4096, 16), "H100")
    assert len(fused.launches) == 1
    assert fused.flops > merged.flops  # the shrink recomputed per column tile...
    # ...costs nothing while W's bytes bound the time: the split partials (< 10% of W) and the split-K epilogue's
    # round trips (ticket, partials, t and B) are all that come on top of the merged GEMV
    (decode,) = fused.launches
    extra_bytes = fused.bytes - merged.bytes
    assert extra_bytes < 0.1 * 4096 * 4096 * 2
    gpu = cost_model.GPUS["H100"]
    tail = decode.tail_latencies * gpu_model.value("epilogue_rt_s")
    assert decode.tail_latencies == 3
    assert fused.gpu_s == pytest.approx(
        merged.gpu_s + extra_bytes / (gpu.bandwidth * gpu_model.value("mem_eff")) + tail, rel=0.01
    )


@pytest.mark.parametrize(
    "regs, smem_kib, warps, ctas",
    [(116, 96, 8, 2), (76, 72, 8, 3), (123, 80, 4, 2), (56, 60, 4, 3), (220, 12, 4, 2), (64, 30, 4, 7)],
)
def test_ctas_per_sm_match_the_static_review(regs, smem_kib, warps, ctas):
    """GPU-REVIEW.md's occupancy table (sm_90: 64K registers, 228 KiB shared memory per SM)."""
    occ = Occupancy(regs, smem_kib * 1024, warps, "test")
    assert occ.ctas_per_sm(cost_model.GPUS["H100"]) == ctas


def test_one_program_past_a_full_wave_doubles_a_compute_bound_launch():
    gpu = cost_model.GPUS["H100"]
    occ = Occupancy(116, 96 * 1024, 8, "test")

    def seconds(programs):
        return launch_time(
            Launch("k", 1.0, programs * 1e9, "triton", programs, occ, 64 * 1024), gpu, "bfloat16"
        ).seconds

    assert seconds(132) == pytest.approx(seconds(100) * 132 / 100 * 100 / 132)  # one program per SM either way
    assert seconds(133) == pytest.approx(2 * seconds(132), rel=1e-6)


def test_too_few_programs_cannot_reach_hbm_bandwidth():
    gpu = cost_model.GPUS["H100"]
    occ = Occupancy(123, 80 * 1024, 4, "test")
    w = 32 * MIB

    def seconds(programs):
        return launch_time(Launch("k", w, 0.0, "triton", programs, occ, 48 * 1024), gpu, "bfloat16").seconds

    # 64 SMs of 132 pull W (the review's decode at N = 4096): each at the per-SM cap, not the HBM ceiling
    assert seconds(64) == pytest.approx(w / (64 * gpu_model.value("per_sm_bw")))
    assert seconds(64) > 1.2 * seconds(264)
    # one resident CTA with little in flight is latency-bound (Little's law), below the per-SM cap
    one = launch_time(Launch("k", w, 0.0, "triton", 132, occ, 8 * 1024), gpu, "bfloat16").seconds
    assert one == pytest.approx(w / (132 * 8 * 1024 / gpu_model.value("latency_s")))
    assert seconds(264) == pytest.approx(w / (gpu.bandwidth * gpu_model.value("mem_eff")))


def test_every_model_table_is_labelled_and_fits_100_columns(capsys):
    assert bench_main(["--model-only"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 100
    titles = [line for line in lines if "K=" in line and "r=" in line or line.startswith("MODEL")]
    assert titles and all(line.startswith("MODEL") for line in titles)
    for regime in ("decode", "prefill", "mixed", "train"):
        assert any(line.lstrip().startswith(regime) for line in lines), regime
    for name in cost_model.ASSUMPTIONS:
        assert f"{name} = " in out
    assert "GEMM core tutorial" in out and "chosen" in out and "vLLM" in out


def test_model_records_say_model_and_fused_is_the_dispatch_choice():
    rows = cost_model.model_records("forward", ["merged", "peft", "fused"], 8192, 4096, 4096, 16, "bfloat16")
    assert {row["kind"] for row in rows} == {"MODEL"}
    fused = [row for row in rows if row["impl"] == "fused" and row["device"] == "H100"][0]
    assert fused["path"] == "cuBLAS"  # compute-bound prefill: the tutorial core cannot beat cuBLAS
    assert [row["ratio_vs_merged"] for row in rows if row["impl"] == "merged"] == [1.0, 1.0]


def test_merge_model_fused_moves_two_weights_peft_six():
    w = 4096 * 4096 * 2
    fused = cost_model.merge_estimate("fused", 4096, 4096, 16, "bfloat16")
    peft = cost_model.merge_estimate("peft", 4096, 4096, 16, "bfloat16")
    assert fused.bytes == pytest.approx(2 * w, rel=0.01)
    assert peft.bytes == pytest.approx(6 * w, rel=0.01)


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_quick_grid_gives_every_plotted_line_two_points_or_more(device_type):
    from fused_lora.bench.grid import quick

    cases = quick(device_type)
    lines = {}
    for c in cases:
        if c.op == "merge":  # a bar panel
            continue
        key = (c.op, c.dtype, c.K, c.N, c.r) + ((c.M,) if c.op == "mixed_forward" else ())
        lines.setdefault(key, set()).add(c.n_adapters if c.op == "mixed_forward" else c.M)
    assert {key[0] for key in lines} == {"forward", "forward_backward", "mixed_forward"}
    assert all(len(xs) >= 2 for xs in lines.values()), lines
    assert sum(c.op == "merge" for c in cases) == 2


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
    timings = time_interleaved(
        fns,
        torch.device("cpu"),
        rounds=3,
        warmup=0,
        min_sample_s=0.0,
        after_each={"b": lambda: restored.append(len(calls))},
    )
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
RECORD_KEYS = {
    "op": str,
    "impl": str,
    "device": str,
    "dtype": str,
    "M": int,
    "K": int,
    "N": int,
    "r": int,
    "n_adapters": int,
    "median_s": float,
    "p20_s": float,
    "p80_s": float,
}


def test_report_writes_json_and_plot(tmp_path, capsys):
    json_path, png_path, md_path = tmp_path / "bench.json", tmp_path / "bench.png", tmp_path / "bench.md"
    rc = bench_main(
        [
            "--device",
            "cpu",
            "--ops",
            "forward,forward_backward,merge,mixed_forward",
            "--tokens",
            "8,16",
            "--shapes",
            "40x24",
            "--ranks",
            "3",
            "--dtypes",
            "float32",
            "--adapters",
            "1,2",
            "--rounds",
            "3",
            "--json",
            str(json_path),
            "--plot",
            str(png_path),
            "--markdown",
            str(md_path),
            "--no-progress",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "MODEL H100 us" in out and "x merged" in out
    # every line but the ones naming the (long) temporary paths written
    assert max(len(line) for line in out.splitlines() if not line.startswith("wrote ")) <= 100
    data = json.loads(json_path.read_text())
    records = data["records"]
    assert {(r["op"], r["impl"]) for r in records} == {("forward", i) for i in ("merged", "peft", "addmm", "fused")} | {
        ("forward_backward", i) for i in ("merged", "peft", "addmm", "fused")
    } | {("merge", "peft"), ("merge", "fused")} | {("mixed_forward", i) for i in ("merged", "peft", "fused")}
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
    assert {row["op"] for row in data["model"]} == {"forward", "forward_backward", "merge", "mixed_forward"}
    assert data["meta"]["device"] == "cpu" and data["meta"]["grid"] == "custom"
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = md_path.read_text()
    assert "| forward | float32 | 8 | 40->24 | 3 |" in markdown and "fused peak extra MiB" in markdown


def test_plot_has_no_lone_points_and_spreads_implementations_apart(tmp_path, monkeypatch):
    from fused_lora.bench import plot

    drawn = []
    import matplotlib.axes

    real = matplotlib.axes.Axes.errorbar

    def spy(self, x, y, *args, **kwargs):
        if kwargs.get("label") != "_nolegend_":  # matplotlib's own error bars of a bar chart
            drawn.append((kwargs.get("label"), list(x)))
        return real(self, x, y, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar", spy)
    records = []
    for M in (1, 16, 128):
        for impl, ratio in (("merged", 1.0), ("peft", 1.5), ("addmm", 1.2), ("fused", 1.2)):
            records.append(
                {
                    "op": "forward",
                    "impl": impl,
                    "dtype": "float32",
                    "M": M,
                    "K": 8,
                    "N": 8,
                    "r": 2,
                    "n_adapters": 1,
                    "median_s": 1e-3,
                    "p20_s": 1e-3,
                    "p80_s": 1e-3,
                    "ratio_vs_merged": ratio,
                    "ratio_vs_merged_p20": ratio,
                    "ratio_vs_merged_p80": ratio,
                }
            )
    lone = dict(records[-1], op="forward_backward")  # one token count only: must become a bar, not a point
    plot.write_plot(records + [lone], str(tmp_path / "p.png"))
    assert {label for label, _ in drawn} == {"peft", "addmm", "fused"}
    assert all(len(xs) >= 2 for _, xs in drawn)
    firsts = sorted(xs[0] for _, xs in drawn)
    assert len(set(firsts)) == 3  # same token count, three distinct x positions: markers never coincide


def test_quantiles_are_numpys():
    import numpy as np

    values = [4.0, 1.0, 3.0, 2.0, 5.0, 9.0]
    assert quantile(values, 0.2) == pytest.approx(np.quantile(values, 0.2))


def test_info_does_not_claim_cuda_without_a_device(capsys, monkeypatch):
    from fused_lora.__main__ import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    cuda_line = [line for line in out.splitlines() if line.startswith("cuda:")][0]
    assert "no CUDA device" in cuda_line and "cuda: triton" not in out


def test_info_explain_prints_the_choice_and_both_plans(capsys):
    from fused_lora.__main__ import main

    assert main(["info", "--explain", "16", "4096", "4096", "16", "bf16"]) == 0
    out = capsys.readouterr().out
    assert "forward: fused" in out and "MODEL" in out and "cuBLAS composition" in out
    assert max(len(line) for line in out.splitlines()) <= 100
    assert main(["info", "--explain", "8192", "4096", "4096", "16", "bfloat16"]) == 0
    assert "forward: cublas" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["info", "--explain", "16", "4096", "4096", "16", "int8"])


def test_report_rejects_unknown_op():
    with pytest.raises(SystemExit):
        bench_main(["--ops", "sideways"])
