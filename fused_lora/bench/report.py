"""`python -m fused_lora bench`: the overhead of unmerged LoRA on this device, measured, with a GPU model beside it.

    python -m fused_lora bench [--device cpu|cuda] [--quick | --grid quick|targets|full] [--json PATH] [--plot PATH]

Prints, per case, a table (at most 100 columns) of every implementation's median time with its p20-p80 spread and
its time relative to merged (and to PEFT), both ratios paired round by round within this run, with the H100 MODEL
time beside each (fused: the path the CUDA dispatch would take; fused_lora/perf, the one performance model).
`--model-only` prints the model only (fused_lora/bench/model_tables.py): issue 13's regimes before/after/with PDL
and its targets, issue 15's per-regime dispatch tables, and every assumption with its range and evidence.
Custom grids: --ops/--tokens/--shapes/--ranks/--dtypes.
`--ops host` prints host time per call instead (fused_lora/bench/host.py; its own options: --rounds, --calls).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import textwrap
import time
from itertools import product
from typing import Dict, List, Optional

import torch

from fused_lora.bench import grid, memory
from fused_lora.bench.impls import OPS, Case
from fused_lora.bench.runner import Budget, backend_name, measure_case
from fused_lora.bench.tables import render
from fused_lora.perf import cost_model

QUICK_CPU_BUDGET_S = 25.0  # timing budget of the quick grid on a CPU; imports and setup come on top
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def _csv(kind):
    return lambda text: [kind(item) for item in text.split(",") if item]


def _shape(text: str):
    k, n = text.lower().split("x")
    return int(k), int(n)


def parse_args(argv: List[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fused-lora bench", description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available, else cpu")
    p.add_argument("--quick", action="store_true", help="the quick grid (under a minute on 2 CPU cores)")
    p.add_argument(
        "--grid",
        choices=grid.GRIDS,
        default=None,
        help="quick | targets (default: the numbers in PERFORMANCE.md) | full (Llama-7B/8B grid)",
    )
    p.add_argument("--json", metavar="PATH", help="write the records (and MODEL rows) as JSON")
    p.add_argument("--plot", metavar="PATH", help="write a PNG: overhead vs tokens, one line per implementation")
    p.add_argument("--markdown", metavar="PATH", help="write the measured tables as Markdown (PERFORMANCE.md)")
    p.add_argument(
        "--rounds", type=int, default=None, help="interleaved rounds per case (default 7; 5 for the quick grid)"
    )
    p.add_argument(
        "--max-seconds-per-case",
        type=float,
        default=None,
        help="stop a case's rounds after this long (never before 3 rounds)",
    )
    p.add_argument(
        "--budget-seconds",
        type=float,
        default=None,
        help=f"spread this many seconds of timing over the cases (quick on a CPU: {QUICK_CPU_BUDGET_S})",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice); 1 is steadier on a crowded machine",
    )
    p.add_argument("--no-model", action="store_true", help="leave out the MODEL rows")
    p.add_argument(
        "--model-only",
        action="store_true",
        help="print the GPU MODEL per regime (issue 13's regimes before/after/PDL and targets; the "
        "dispatch's choice vs merged, PEFT, cuBLAS, vLLM) with its assumptions, and measure nothing",
    )
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    custom = p.add_argument_group("custom grid (replaces --grid when --ops is given)")
    custom.add_argument(
        "--ops",
        type=_csv(str),
        help=f"comma list of {', '.join(OPS)}; or `--ops host` alone: host time per call vs nn.Linear and PEFT "
        "(its own options: --ops host --help)",
    )
    custom.add_argument("--tokens", type=_csv(int), default=[16, 512])
    custom.add_argument("--shapes", type=_csv(_shape), default=[(4096, 4096)], help="KxN list, e.g. 4096x14336")
    custom.add_argument("--ranks", type=_csv(int), default=[16])
    custom.add_argument("--dtypes", type=_csv(str), default=["float32", "bfloat16"])
    custom.add_argument("--adapters", type=_csv(int), default=[1, 4, 16], help="adapter counts for mixed_forward")
    args = p.parse_args(argv)
    if args.quick and args.grid not in (None, "quick"):
        p.error("--quick and --grid disagree")
    for op in args.ops or []:
        if op not in OPS:
            p.error(f"unknown op {op!r}; expected one of {', '.join(OPS)}")
    for name in args.dtypes:
        if name not in _DTYPES:
            p.error(f"unknown dtype {name!r}; expected one of {', '.join(_DTYPES)}")
    return args


def custom_cases(args) -> List[Case]:
    cases = []
    for op, (K, N), r, dt in product(args.ops, args.shapes, args.ranks, args.dtypes):
        dtype = _DTYPES[dt]
        if op == "merge":
            cases.append(Case(op, 0, K, N, r, dtype))
        elif op == "mixed_forward":
            cases += [Case(op, M, K, N, r, dtype, n) for M in args.tokens for n in args.adapters]
        else:
            cases += [Case(op, M, K, N, r, dtype) for M in args.tokens]
    return cases


def _ms(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1e3
    return f"{ms:.4g}" if ms >= 0.01 else f"{ms:.2g}"


def _ratio(rec: Dict, key: str) -> str:
    mid = rec.get(key)
    if mid is None:
        return "-"
    return f"{mid:.2f} [{rec[key + '_p20']:.2f}-{rec[key + '_p80']:.2f}]"


def _case_title(rec: Dict) -> str:
    tokens = "" if rec["op"] == "merge" else f" M={rec['M']}"
    text = f"{rec['op']} {rec['dtype']}{tokens} {rec['K']}->{rec['N']} r={rec['r']}"
    return text + (f" adapters={rec['n_adapters']}" if rec["op"] == "mixed_forward" else "")


def _model_row(model_rows: List[Dict], impl: str, gpu: str = "H100") -> Optional[Dict]:
    return next((row for row in model_rows if row["impl"] == impl and row["device"] == gpu), None)


def format_case(records: List[Dict], model_rows: List[Dict]) -> str:
    """The measured rows of one case as a table of at most 100 columns, with the H100 MODEL beside each."""
    first = records[0]
    merge = first["op"] == "merge"
    key = "ratio_vs_peft" if merge else "ratio_vs_merged"
    columns = [
        "impl",
        "median ms",
        "p20-p80 ms",
        "x PEFT [p20-p80]" if merge else "x merged [p20-p80]",
        "peak+MiB" if merge else "x PEFT [p20-p80]",
    ]
    if model_rows:
        columns += ["MODEL H100 us", "x PEFT" if merge else "x merged"]
    cells = []
    for rec in records:
        row = [rec["impl"], _ms(rec["median_s"]), f"{_ms(rec['p20_s'])}-{_ms(rec['p80_s'])}", _ratio(rec, key)]
        if merge:
            peak = rec.get("peak_extra_bytes")
            row.append("-" if peak is None else f"{peak / cost_model.MIB:.1f}")
        else:
            row.append(_ratio(rec, "ratio_vs_peft"))
        if model_rows:
            model = _model_row(model_rows, rec["impl"])
            ratio = None if model is None else model[key]
            row += ["-" if model is None else f"{model['model_s'] * 1e6:.1f}", "-" if ratio is None else f"{ratio:.2f}"]
        cells.append(row)
    fused = next((rec for rec in records if rec["impl"] == "fused"), None)
    title = f"{_case_title(first)} ({first['device']}, {first['rounds']} rounds"
    title += f", fused on {fused['backend']})" if fused else ")"
    model_fused = _model_row(model_rows, "fused") if model_rows else None
    caption = (
        f"MODEL fused = the CUDA dispatch's path: {model_fused['path']}"
        if model_fused and model_fused.get("path")
        else None
    )
    return render(title, columns, cells, caption)


def _model_for(case: Case, impls) -> List[Dict]:
    if case.dtype_name not in cost_model.DTYPE_BYTES:
        return []
    return cost_model.model_records(
        case.op, list(impls), case.M, case.K, case.N, case.r, case.dtype_name, case.n_adapters
    )


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _meta(device: torch.device, grid_name: str, budget: Budget) -> Dict:
    meta = {
        "device": device.type,
        "grid": grid_name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "processor": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "fused_backend": backend_name(device),
        "rounds": budget.rounds,
        "memory_method": memory.method_description(device),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "model_gpus": {g.name: g.source for g in cost_model.GPUS.values()},
        "model_assumptions": {name: a.value for name, a in cost_model.ASSUMPTIONS.items()},
    }
    if device.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(device)
    else:
        try:
            meta["loadavg_start"] = os.getloadavg()
        except OSError:
            pass
    return meta


def run(
    cases: List[Case], device: torch.device, budget: Budget, *, progress: bool = True, model: bool = True, echo=print
) -> Dict:
    """Measure every case (interleaved, paired ratios) and return {meta, records, model}."""
    grid_name = "custom"
    result = {"meta": _meta(device, grid_name, budget), "records": [], "model": []}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(cases), desc="bench", unit="case", file=sys.stderr, leave=False)
    try:
        for case in cases:
            if bar is not None:
                bar.set_postfix_str(case.label)
            records = measure_case(case, device, budget)
            model_rows = _model_for(case, [rec["impl"] for rec in records]) if model else []
            result["records"] += records
            result["model"] += model_rows
            text = format_case(records, model_rows)
            if bar is not None:
                bar.update(1)
                bar.write(text)  # printed above the bar, which is redrawn below it
            else:
                echo(text)
    finally:
        if bar is not None:
            bar.close()
    if device.type == "cpu":
        try:
            result["meta"]["loadavg_end"] = os.getloadavg()
        except OSError:
            pass
    return result


def _wrapped(text: str) -> str:
    return textwrap.fill(text, width=100)


def _host_argv(argv: List[str]) -> Optional[List[str]]:
    """`--ops host` selects the host-time table (fused_lora/bench/host.py): the other arguments, else None."""
    for i, arg in enumerate(argv):
        if arg == "--ops" and i + 1 < len(argv) and argv[i + 1] == "host":
            return argv[:i] + argv[i + 2 :]
        if arg == "--ops=host":
            return argv[:i] + argv[i + 1 :]
    return None


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    host_argv = _host_argv(argv)
    if host_argv is not None:
        from fused_lora.bench.host import main as host_main

        return host_main(host_argv)
    args = parse_args(argv)
    if args.model_only:
        from fused_lora.bench.model_tables import model_report

        print(model_report())
        return 0
    device_name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_name == "cuda" and not torch.cuda.is_available():
        print("fused-lora bench: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    device = torch.device(device_name)
    if args.threads:
        torch.set_num_threads(args.threads)
    grid_name = "custom" if args.ops else ("quick" if args.quick else (args.grid or "targets"))
    cases = custom_cases(args) if args.ops else grid.cases_for(grid_name, device.type)
    rounds = args.rounds or (5 if grid_name == "quick" else 7)
    budget_s = args.budget_seconds
    if budget_s is None and grid_name == "quick" and device.type == "cpu":
        budget_s = QUICK_CPU_BUDGET_S
    per_case = args.max_seconds_per_case
    if budget_s is not None:
        per_case = min(per_case or budget_s, budget_s / max(1, len(cases)))
    budget = Budget(
        rounds=rounds, max_seconds_per_case=per_case, min_sample_s=0.001 if device.type == "cuda" else 0.002
    )
    print(
        _wrapped(
            f"fused-lora bench: {len(cases)} cases, grid {grid_name}, device {device}, fused backend "
            f"{backend_name(device)}, {rounds} interleaved rounds"
            + (f" (fewer past {per_case:.1f} s per case)" if per_case else "")
            + f", torch threads {torch.get_num_threads()}"
        )
    )
    print(
        _wrapped(
            "ratios are paired per round within this run (median [p20-p80]); MODEL columns are the cost "
            "model on an H100 (`bench --model-only` lists its assumptions), not measurements"
        )
    )
    result = run(cases, device, budget, progress=not args.no_progress, model=not args.no_model)
    result["meta"]["grid"] = grid_name
    meta = result["meta"]
    if "loadavg_start" in meta and "loadavg_end" in meta:
        print(
            _wrapped(
                f"conditions: {meta['processor']}, {meta['cpu_count']} CPUs, torch threads "
                f"{meta['threads']}, 1-min load average {meta['loadavg_start'][0]:.1f} at start, "
                f"{meta['loadavg_end'][0]:.1f} at end"
            )
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json} ({len(result['records'])} records, {len(result['model'])} MODEL rows)")
    from fused_lora.bench.markdown import measured_tables, targets_summary

    summary = targets_summary(result["records"])
    if summary:
        print("targets (median [p20-p80], paired within this run):")
        for line in summary.splitlines():
            print(textwrap.fill(line, width=100, subsequent_indent="  "))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write((summary + "\n\n" if summary else "") + measured_tables(result["records"]) + "\n")
        print(f"wrote {args.markdown}")
    if args.plot:
        from fused_lora.bench.plot import write_plot

        write_plot(
            result["records"],
            args.plot,
            title=f"{device.type}, fused backend: {result['meta']['fused_backend']}, grid {grid_name}",
        )
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
