"""`python -m fused_lora bench`: the overhead of unmerged LoRA on this device, measured, with a GPU model beside it.

    python -m fused_lora bench [--device cpu|cuda] [--quick | --grid quick|targets|full] [--json PATH] [--plot PATH]

Prints, per case, every implementation's median time with its p20-p80 spread and its time relative to merged
(and to PEFT), both ratios paired round by round within this run; then MODEL rows (bytes/FLOPs/launches on H100
and A100 ceilings, see fused_lora/bench/cost_model.py). Custom grids: --ops/--tokens/--shapes/--ranks/--dtypes.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from itertools import product
from typing import Dict, List, Optional

import torch

from fused_lora.bench import cost_model, grid, memory
from fused_lora.bench.impls import OPS, Case
from fused_lora.bench.runner import Budget, backend_name, measure_case

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def _csv(kind):
    return lambda text: [kind(item) for item in text.split(",") if item]


def _shape(text: str):
    k, n = text.lower().split("x")
    return int(k), int(n)


def parse_args(argv: List[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fused-lora bench", description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda when available, else cpu")
    p.add_argument("--quick", action="store_true", help="the quick grid (a few minutes on 2 CPU cores)")
    p.add_argument("--grid", choices=grid.GRIDS, default=None,
                   help="quick | targets (default: the numbers in PERFORMANCE.md) | full (Llama-7B/8B grid)")
    p.add_argument("--json", metavar="PATH", help="write the records (and MODEL rows) as JSON")
    p.add_argument("--plot", metavar="PATH", help="write a PNG: overhead vs tokens, one line per implementation")
    p.add_argument("--markdown", metavar="PATH", help="write the measured tables as Markdown (PERFORMANCE.md)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds per case (default 7)")
    p.add_argument("--max-seconds-per-case", type=float, default=None,
                   help="stop a case's rounds after this long (never before 3 rounds)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice); 1 is steadier on a crowded machine")
    p.add_argument("--no-model", action="store_true", help="leave out the MODEL rows")
    p.add_argument("--model-only", action="store_true",
                   help="print the GPU MODEL tables (Markdown, 4096->4096 r=16, merges) and measure nothing")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    custom = p.add_argument_group("custom grid (replaces --grid when --ops is given)")
    custom.add_argument("--ops", type=_csv(str), help=f"comma list of {', '.join(OPS)}")
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
    return "-" if seconds is None else f"{seconds * 1e3:.3f}"


def _ratio(rec: Dict, key: str) -> str:
    mid = rec.get(key)
    if mid is None:
        return "-"
    return f"{mid:.3f} [{rec[key + '_p20']:.3f}-{rec[key + '_p80']:.3f}]"


def _case_title(rec: Dict) -> str:
    tokens = "" if rec["op"] == "merge" else f" M={rec['M']}"
    text = f"{rec['op']} {rec['dtype']}{tokens} {rec['K']}->{rec['N']} r={rec['r']}"
    return text + (f" adapters={rec['n_adapters']}" if rec["op"] == "mixed_forward" else "")


def _model_columns(model_rows: List[Dict], impl: str) -> str:
    rows = {row["device"]: row for row in model_rows if row["impl"] == impl}
    if not rows:
        return ""
    any_row = next(iter(rows.values()))
    text = f" | {any_row['bytes'] / cost_model.MIB:>10.1f} {any_row['launches']:>3}"
    for gpu in cost_model.GPUS:
        row = rows.get(gpu)
        if row is None:
            text += f" {'-':>9}{'':<7}"
            continue
        ratio = "" if row["ratio_vs_merged"] is None else f" x{row['ratio_vs_merged']:.3f}"
        micros = f"{row['model_s'] * 1e6:.1f}"
        text += f" {micros:>9}{ratio:<7}"
    return text


def format_case(records: List[Dict], model_rows: List[Dict]) -> str:
    """The measured rows of one case, with the MODEL's bytes, launches and GPU times beside each."""
    first = records[0]
    lines = [f"== {_case_title(first)}  ({first['device']}, {first['rounds']} rounds)"]
    header = f"  {'impl':<7} {'median ms':>10} {'p20-p80 ms':>19} {'x merged [p20-p80]':>22} {'x peft [p20-p80]':>22}"
    if first["op"] == "merge":
        header += f" {'peak+MiB':>9}"
    if model_rows:
        header += f" | {'MODEL MiB':>10} {'ln':>3}" + "".join(f" {gpu + ' us':>9}{'':<7}" for gpu in cost_model.GPUS)
    lines.append(header)
    for rec in records:
        spread = f"{_ms(rec['p20_s'])}-{_ms(rec['p80_s'])}"
        line = (f"  {rec['impl']:<7} {_ms(rec['median_s']):>10} {spread:>19} {_ratio(rec, 'ratio_vs_merged'):>22} "
                f"{_ratio(rec, 'ratio_vs_peft'):>22}")
        if first["op"] == "merge":
            peak = rec.get("peak_extra_bytes")
            line += f" {'-' if peak is None else f'{peak / cost_model.MIB:.1f}':>9}"
        line += _model_columns(model_rows, rec["impl"])
        if rec["impl"] == "fused":
            line += f"  [fused backend: {rec['backend']}]"
        lines.append(line)
    return "\n".join(lines)


def _model_for(case: Case, impls) -> List[Dict]:
    if case.op == "mixed_forward" or case.dtype_name not in cost_model.DTYPE_BYTES:
        return []
    return cost_model.model_records(case.op, [i for i in impls], case.M, case.K, case.N, case.r, case.dtype_name)


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
    meta = {"device": device.type, "grid": grid_name, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "platform": platform.platform(), "processor": _cpu_name(), "cpu_count": os.cpu_count(),
            "fused_backend": backend_name(device), "rounds": budget.rounds,
            "memory_method": memory.method_description(device),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "model_gpus": {g.name: g.source for g in cost_model.GPUS.values()},
            "model_launch_s": cost_model.LAUNCH_S}
    if device.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(device)
    else:
        try:
            meta["loadavg_start"] = os.getloadavg()
        except OSError:
            pass
    return meta


def run(cases: List[Case], device: torch.device, budget: Budget, *, progress: bool = True, model: bool = True,
        echo=print) -> Dict:
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


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.model_only:
        from fused_lora.bench.markdown import merge_model_table, model_table
        print("MODEL (bytes/FLOPs/launches on published ceilings; not measured)\n")
        print(model_table() + "\n\n" + merge_model_table())
        return 0
    device_name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_name == "cuda" and not torch.cuda.is_available():
        print("fused-lora bench: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    device = torch.device(device_name)
    if args.threads:
        torch.set_num_threads(args.threads)
    grid_name = "custom" if args.ops else ("quick" if args.quick else (args.grid or "targets"))
    cases = custom_cases(args) if args.ops else grid.cases_for(grid_name)
    rounds = args.rounds or 7
    budget = Budget(rounds=rounds, max_seconds_per_case=args.max_seconds_per_case,
                    min_sample_s=0.001 if device.type == "cuda" else 0.005)
    print(f"fused-lora bench: {len(cases)} cases, grid {grid_name}, device {device}, "
          f"fused backend {backend_name(device)}, {rounds} interleaved rounds, torch threads "
          f"{torch.get_num_threads()}")
    print("ratios are paired per round within this run (median [p20-p80]); MODEL rows are a bytes/FLOPs/launches "
          "model on published GPU ceilings, not measurements")
    result = run(cases, device, budget, progress=not args.no_progress, model=not args.no_model)
    result["meta"]["grid"] = grid_name
    meta = result["meta"]
    if "loadavg_start" in meta and "loadavg_end" in meta:
        print(f"conditions: {meta['processor']}, {meta['cpu_count']} CPUs, torch threads {meta['threads']}, "
              f"1-min load average {meta['loadavg_start'][0]:.1f} at start, {meta['loadavg_end'][0]:.1f} at end")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json} ({len(result['records'])} records, {len(result['model'])} MODEL rows)")
    from fused_lora.bench.markdown import measured_tables, targets_summary
    summary = targets_summary(result["records"])
    if summary:
        print("targets (median [p20-p80], paired within this run):\n" + summary)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write((summary + "\n\n" if summary else "") + measured_tables(result["records"]) + "\n")
        print(f"wrote {args.markdown}")
    if args.plot:
        from fused_lora.bench.plot import write_plot
        write_plot(result["records"], args.plot,
                   title=f"{device.type}, fused backend: {result['meta']['fused_backend']}, grid {grid_name}")
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
