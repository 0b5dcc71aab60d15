"""Step `bench`: merged (cuBLAS) vs PEFT vs addmm_ vs fused, with the implementations of fused_lora.bench.impls.

    forward, forward+backward   bf16, tokens 1 16 64 512 2048 8192, 4096->4096 / 4096->14336 / 4096->1024,
                                r 16 and 64 (the full run; --quick keeps 4096->4096 r=16 and a few more)
    mixed decode                16 rows (16 sequences of one token), 1 / 4 / 16 adapters
    merge                       in-place merge of one adapter, with its bandwidth (W read + written)
    host us per call            the calls issued back to back at a small shape (512->512), GPU work excluded

Timing: fused_lora.gpu_check.timers (interleaved rounds, CUDA events, L2 flushed before every call); every case's
fused kernels are compiled first by parallel warm-up processes. Cases run most important first and stop when the
budget is spent (the detail says how many ran). Records have fused_lora.bench's schema (runner.records_for) plus
"timer"; MODEL rows from fused_lora.perf.cost_model sit beside them. Writes bench.json, bench.md, bench.png.
Dry run: the CPU at tiny shapes (float32), to prove the plumbing; the numbers mean nothing.
"""

from __future__ import annotations

import gc
import os
from itertools import product
from typing import Dict, List

import torch

from fused_lora.bench.impls import LORA_ALPHA, Case, _peft_layer, build
from fused_lora.bench.runner import backend_name, records_for
from fused_lora.gpu_check import timers, warm
from fused_lora.gpu_check.context import FAILED, OK, Context, result, write_json
from fused_lora.perf import cost_model

TOKENS = (1, 16, 64, 512, 2048, 8192)
SHAPES = ((4096, 4096), (4096, 14336), (4096, 1024))
RANKS = (16, 64)
ADAPTERS = (1, 4, 16)
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
TIMER = "interleaved rounds, CUDA events per call, 256 MiB L2 flush before each call (fused_lora.gpu_check.timers)"


def case_to_json(case: Case) -> dict:
    return {
        "op": case.op,
        "M": case.M,
        "K": case.K,
        "N": case.N,
        "r": case.r,
        "dtype": case.dtype_name,
        "n_adapters": case.n_adapters,
    }


def case_from_json(fields: dict) -> Case:
    fields = dict(fields)
    fields["dtype"] = _DTYPES[fields["dtype"]]
    return Case(**fields)


def cases_for(mode: str) -> List[Case]:
    """Most important first: a run cut short by its budget keeps the head of the list."""
    bf16 = torch.bfloat16
    if mode == "dry-run":
        f32 = torch.float32
        return (
            [Case("forward", M, 64, 48, 4, f32) for M in (1, 16)]
            + [Case("forward_backward", 16, 64, 48, 4, f32)]
            + [Case("mixed_forward", 16, 64, 48, 4, f32, n) for n in (1, 4)]
            + [Case("merge", 0, 64, 48, 4, f32)]
        )
    core = [Case("forward", M, 4096, 4096, 16, bf16) for M in TOKENS]
    core += [Case("forward_backward", M, 4096, 4096, 16, bf16) for M in (512, 8192)]
    core += [Case("mixed_forward", 16, 4096, 4096, 16, bf16, n) for n in ADAPTERS]
    core += [Case("merge", 0, 4096, 4096, 16, bf16)]
    if mode == "quick":
        return core + [Case("forward", M, 4096, 14336, 16, bf16) for M in (1, 512)]
    rest = [
        Case(op, M, K, N, r, bf16)
        for op, (K, N), r, M in product(("forward", "forward_backward"), SHAPES, RANKS, TOKENS)
    ]
    rest += [Case("merge", 0, K, N, r, bf16) for (K, N), r in product(SHAPES[:2], RANKS)]
    return core + [c for c in rest if c not in core]


def merge_bandwidth(record: dict) -> float:
    """GB/s of an in-place merge counted as W read once and written once."""
    nbytes = 2 * record["N"] * record["K"] * cost_model.DTYPE_BYTES.get(record["dtype"], 2)
    return round(nbytes / record["median_s"] / 1e9, 1) if record["median_s"] else 0.0


def host_micros(device: torch.device, dtype: torch.dtype, dim: int, calls: int) -> Dict[str, float]:
    """Host us per call of each implementation (forward and a training step) and of the two layers."""
    from torch import nn

    from fused_lora.layer import FusedLoRALinear

    out = {}
    for op in ("forward", "forward_backward"):
        setup = build(Case(op, 1, dim, dim, 16, dtype), device)
        for name, fn in setup.fns.items():
            out[f"{op}/{name}"] = round(timers.host_seconds(fn, device, calls) * 1e6, 1)
    gen = torch.Generator().manual_seed(0)
    weight, a, b = (
        torch.randn(*shape, generator=gen).to(device, dtype) * 0.05 for shape in ((dim, dim), (16, dim), (dim, 16))
    )
    layer = _peft_layer(weight, [("default", a, b)], 16).eval()
    fused = FusedLoRALinear.from_linear(
        nn.Linear(dim, dim, bias=False, device=device, dtype=dtype), "default", r=16, lora_alpha=LORA_ALPHA
    ).eval()
    with torch.no_grad():
        fused.base_layer.weight.copy_(weight)
        fused.lora_A["default"].weight.copy_(a)
        fused.lora_B["default"].weight.copy_(b)
    x = torch.randn(1, dim, generator=gen).to(device, dtype)
    with torch.no_grad():
        out["layer/peft"] = round(timers.host_seconds(lambda: layer(x), device, calls) * 1e6, 1)
        out["layer/fused"] = round(timers.host_seconds(lambda: fused(x), device, calls) * 1e6, 1)
    return out


def _summary(records: List[dict]) -> str:
    def ratio(op, M, key):
        for rec in records:
            if (rec["op"], rec["M"], rec["K"], rec["N"], rec["r"], rec["impl"]) == (op, M, 4096, 4096, 16, "fused"):
                return rec.get(key)
        return None

    parts = []
    for op, M in (("forward", 1), ("forward", 16), ("forward", 512), ("forward", 8192), ("forward_backward", 8192)):
        vm, vp = ratio(op, M, "ratio_vs_merged"), ratio(op, M, "ratio_vs_peft")
        if vm is not None:
            parts.append(f"{op} M={M}: fused x{vm} merged, x{vp} peft")
    merges = [r for r in records if r["op"] == "merge" and r["impl"] == "fused"]
    if merges:
        parts.append(f"merge {merges[0]['K']}x{merges[0]['N']} r={merges[0]['r']}: {merges[0]['gbps']} GB/s")
    return "; ".join(parts)


def run(ctx: Context) -> dict:
    device = torch.device(ctx.device)
    cases = cases_for(ctx.mode)
    rounds, reps = (2, 1) if ctx.dry_run else ((5, 3) if ctx.quick else (7, 3))
    data = {
        "meta": {
            "device": ctx.info.get("device"),
            "torch": torch.__version__,
            "triton": ctx.info.get("triton"),
            "mode": ctx.mode,
            "fused_backend": backend_name(device),
            "timer": TIMER,
            "rounds": rounds,
            "reps": reps,
            "tuned_dir": os.environ.get("FUSED_LORA_TUNED_DIR"),
        },
        "records": [],
        "model": [],
        "model_errors": [],
        "errors": [],
        "host_us": {},
    }
    # compile every fused specialization side by side first; a dry run has nothing to compile and runs the
    # worker's code in this process (the tune step exercises the spawning)
    spec = {"cases": [case_to_json(c) for c in cases]}
    if ctx.dry_run:
        warm.bench_worker(spec, 0, len(spec["cases"]))
        data["warm"] = {"workers": 0, "in_process": True}
    else:
        data["warm"] = warm.spawn(
            ctx,
            "bench",
            spec,
            max(2, min(8, (ctx.info.get("cpus") or 8) // 2)),
            timeout_s=min(0.35 * ctx.budget_s, ctx.remaining() - 20),
        )
    measured = 0
    for case in cases:
        if ctx.remaining() < (25 if device.type == "cuda" else 10):
            break
        try:
            setup = build(case, device)
            timings = timers.interleaved(
                setup.fns,
                device,
                rounds=rounds,
                reps=reps,
                after_each=setup.after_each,
                max_seconds=min(10.0, ctx.remaining() / 4),
            )
            records = records_for(case, device, setup, timings)
            for rec in records:
                rec["timer"] = "cuda-events" if device.type == "cuda" else "perf_counter"
                if case.op == "merge":
                    rec["gbps"] = merge_bandwidth(rec)
            data["records"] += records
            measured += 1
            try:  # the MODEL beside the measurement; its failure is noted, it does not fail the case
                data["model"] += cost_model.model_records(
                    case.op,
                    [r["impl"] for r in records],
                    case.M,
                    case.K,
                    case.N,
                    case.r,
                    case.dtype_name,
                    case.n_adapters,
                )
            except Exception as exc:  # noqa: BLE001
                data["model_errors"].append(f"{case.label}: {type(exc).__name__}: {str(exc)[:200]}")
            print(
                f"{case.label}: " + ", ".join(f"{r['impl']} {r['median_s'] * 1e6:.1f}us" for r in records), flush=True
            )
            del setup
        except Exception as exc:  # noqa: BLE001 - one case's failure is reported, the others still run
            data["errors"].append({"case": case.label, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
            print(f"{case.label}: FAILED {type(exc).__name__}: {exc}", flush=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    try:
        if ctx.remaining() > 8:
            data["host_us"] = host_micros(
                device,
                torch.float32 if ctx.dry_run else torch.bfloat16,
                64 if ctx.dry_run else 512,
                10 if ctx.dry_run else 100,
            )
    except Exception as exc:  # noqa: BLE001
        data["errors"].append({"case": "host us", "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
    write_json(ctx.path("bench.json"), data)
    artifacts = ["bench.json"]
    from fused_lora.bench.markdown import measured_tables

    with open(ctx.path("bench.md"), "w") as f:
        f.write(
            f"Measured by scripts/gpu_check.sh ({ctx.mode}) on {data['meta']['device']}, torch "
            f"{data['meta']['torch']}, triton {data['meta']['triton']}. Timer: {TIMER}.\n\n"
            + measured_tables(data["records"])
            + "\n"
        )
    artifacts.append("bench.md")
    try:
        from fused_lora.bench.plot import write_plot

        write_plot(data["records"], ctx.path("bench.png"), title=f"{data['meta']['device']} ({ctx.mode})")
        artifacts.append("bench.png")
    except Exception as exc:  # noqa: BLE001 - a plot is a convenience
        data["errors"].append({"case": "plot", "error": f"{type(exc).__name__}: {exc}"})
    detail = (
        f"{measured} of {len(cases)} cases measured on {device.type}"
        + (
            f" ({len(cases) - measured - len(data['errors'])} left out: budget)"
            if measured + len(data["errors"]) < len(cases)
            else ""
        )
        + (
            f", {len(data['errors'])} errors (first: {data['errors'][0]['case']}: {data['errors'][0]['error']})"
            if data["errors"]
            else ""
        )
        + ("; " + _summary(data["records"]) if _summary(data["records"]) else "")
        + (
            f"; host us fwd: merged {data['host_us'].get('forward/merged')}, peft "
            f"{data['host_us'].get('forward/peft')}, fused {data['host_us'].get('forward/fused')}, layer fused "
            f"{data['host_us'].get('layer/fused')}"
            if data["host_us"]
            else ""
        )
    )
    if ctx.dry_run:
        detail = "dry run (CPU, tiny shapes: plumbing only, numbers meaningless): " + detail
    status = FAILED if data["errors"] or measured == 0 else OK
    return result(
        status,
        detail,
        artifacts=artifacts,
        data={k: data[k] for k in ("meta", "errors", "host_us", "warm")}
        | {"cases_measured": measured, "cases_planned": len(cases)},
    )
