"""CPU: fused_lora's C++ path against PEFT's LoRA Linear and a merged nn.Linear (issue 14's CPU targets).

    python benchmarks/cpu_vs_peft.py [--ops forward,forward_backward] [--tokens 1,16,512,2048] [--dtypes bf16,fp32]
        [--shape 4096x4096] [--rank 16] [--threads 2] [--rounds 7] [--max-seconds-per-case S] [--markdown PATH]
    python benchmarks/cpu_vs_peft.py --crossover [--ops forward,backward] [--tokens 1,2,4,...] [--dtypes ...]

Default mode: per case, merged (F.linear), PEFT and fused (fused_lora.lora_linear) timed interleaved, round by round
(fused_lora/bench/timing.py), and the paired ratios fused/PEFT and fused/merged reported as median [p20-p80], with
the base GEMM the backend's rule picked for the case (fused_lora.ops.cpp_backend.base_gemm_for). forward runs
under no_grad; forward_backward has W frozen, A, B and x requiring grad (fused_lora/bench/impls.py).
--crossover: the raw C++ op (lora_fwd, or lora_bwd with dx) with each base GEMM forced, interleaved, relative to
the vendor GEMM: the measurements behind the rule's row limits (csrc/gemm_choice.cpp).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

from fused_lora.bench.impls import Case, build
from fused_lora.bench.timing import time_interleaved
from fused_lora.ops import cpp_backend as cb

DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def _csv(kind):
    return lambda text: [kind(v) for v in text.split(",") if v]


def machine_lines(threads: int) -> list[str]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("", platform.machine(), platform.processor()):
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_fp16") if f in flags]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return [
        f"CPU: {model} ({', '.join(isa) or 'no AVX2'}); {os.cpu_count()} logical CPUs; torch {torch.__version__}, "
        f"{threads} torch thread(s); 1-minute load average {load:.1f}; C++ ISA level {cb.active_isa()}",
        "Base-GEMM rule here: " + "; ".join(cb.gemm_rule().strip().splitlines()),
    ]


def _fmt(spread) -> str:
    return "-" if spread is None else f"{spread.median:.3f} [{spread.p20:.2f}-{spread.p80:.2f}]"


def compare(args) -> list[dict]:
    rows = []
    print(
        "| op | dtype | tokens | fused GEMM | merged ms | PEFT ms | fused ms | fused x PEFT | fused x merged | "
        "PEFT x merged | rounds |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for op in args.ops:
        for dname in args.dtypes:
            dtype = DTYPES[dname]
            for M in args.tokens:
                case = Case(op, M, args.shape[0], args.shape[1], args.rank, dtype)
                setup = build(case, torch.device("cpu"))
                fns = {k: v for k, v in setup.fns.items() if k in ("merged", "peft", "fused")}
                t = time_interleaved(
                    fns,
                    torch.device("cpu"),
                    rounds=args.rounds,
                    min_sample_s=0.005,
                    max_seconds=args.max_seconds_per_case,
                )
                gemm = cb.base_gemm_for(dtype, M)
                if op == "forward_backward":
                    gemm += "/" + cb.base_gemm_for(dtype, M, backward=True)
                rec = {
                    "op": op,
                    "dtype": str(dtype).replace("torch.", ""),
                    "M": M,
                    "K": case.K,
                    "N": case.N,
                    "r": case.r,
                    "gemm": gemm,
                    "rounds": len(t.samples["fused"]),
                    **{f"{k}_ms": t.spread(k).median * 1e3 for k in fns},
                }
                for name, base in (("fused", "peft"), ("fused", "merged"), ("peft", "merged")):
                    s = t.ratio(name, base)
                    rec[f"{name}_x_{base}"] = [s.median, s.p20, s.p80]
                rows.append(rec)
                print(
                    f"| {op} | {rec['dtype']} | {M} | {gemm} | {rec['merged_ms']:.4g} | {rec['peft_ms']:.4g} | "
                    f"{rec['fused_ms']:.4g} | {_fmt(t.ratio('fused', 'peft'))} | {_fmt(t.ratio('fused', 'merged'))} | "
                    f"{_fmt(t.ratio('peft', 'merged'))} | {rec['rounds']} |",
                    flush=True,
                )
                del setup, fns
    return rows


def crossover(args) -> list[dict]:
    rows = []
    K, N, r = args.shape[0], args.shape[1], args.rank
    seed = torch.zeros(1, dtype=torch.int64)
    print(
        "| op | dtype | rows | " + " | ".join(f"{g} ms" for g in cb.BASE_GEMMS) + " | direct x vendor | "
        "mixed x vendor | rule |"
    )
    print("|---|---|---|" + "---|" * (len(cb.BASE_GEMMS) + 3))
    for op in args.ops:
        for dname in args.dtypes:
            dtype = DTYPES[dname]
            gemms = [g for g in cb.BASE_GEMMS if g != "mixed" or dtype != torch.float32]
            for M in args.tokens:
                gen = torch.Generator().manual_seed(0)
                x = torch.randn(M, K, generator=gen).to(dtype)
                w = (torch.randn(N, K, generator=gen) / K**0.5).to(dtype)
                a = (torch.randn(r, K, generator=gen) / K**0.5).to(dtype)
                b = (torch.randn(N, r, generator=gen) / r**0.5).to(dtype)
                scale, dy = torch.ones(r), torch.randn(M, N, generator=gen).to(dtype)
                t = cb.lora_fwd(x, w, None, a, b, scale, [0, r], [0.0], seed)[1]

                def call(gemm, op=op, x=x, w=w, a=a, b=b, scale=scale, dy=dy, t=t):
                    def run():
                        with cb.use_base_gemm(gemm):
                            if op == "forward":
                                return cb.lora_fwd(x, w, None, a, b, scale, [0, r], [0.0], seed)
                            return cb.lora_bwd(dy, x, w, a, b, scale, t, [0, r], [0.0], seed, True)

                    return run

                tm = time_interleaved(
                    {g: call(g) for g in gemms},
                    torch.device("cpu"),
                    rounds=args.rounds,
                    min_sample_s=0.005,
                    max_seconds=args.max_seconds_per_case,
                )
                rule = cb.base_gemm_for(dtype, M, backward=op != "forward")
                rec = {
                    "op": op,
                    "dtype": str(dtype).replace("torch.", ""),
                    "M": M,
                    "rule": rule,
                    **{f"{g}_ms": tm.spread(g).median * 1e3 for g in gemms},
                }
                rows.append(rec)
                cells = [f"{rec[g + '_ms']:.4g}" if g in gemms else "-" for g in cb.BASE_GEMMS]
                ratios = [_fmt(tm.ratio(g, "vendor")) if g in gemms else "-" for g in ("direct", "mixed")]
                print(f"| {op} | {rec['dtype']} | {M} | " + " | ".join(cells + ratios) + f" | {rule} |", flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--crossover", action="store_true", help="each base GEMM forced, on the raw op")
    p.add_argument(
        "--ops",
        type=_csv(str),
        default=None,
        help="forward,forward_backward (default); with --crossover: forward,backward",
    )
    p.add_argument("--tokens", type=_csv(int), default=None, help="default 1,16,512,2048 (crossover: 1..128)")
    p.add_argument("--dtypes", type=_csv(str), default=["bf16", "fp32"])
    p.add_argument(
        "--shape", type=lambda s: tuple(int(v) for v in s.lower().split("x")), default=(4096, 4096), help="KxN"
    )
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument(
        "--max-seconds-per-case",
        type=float,
        default=None,
        help="stop a case's rounds after this long (never before 3 rounds)",
    )
    p.add_argument("--json", metavar="PATH", help="also write the records as JSON")
    args = p.parse_args(argv)
    for d in args.dtypes:
        if d not in DTYPES:
            p.error(f"unknown dtype {d!r}; expected one of {', '.join(DTYPES)}")
    args.ops = args.ops or (["forward", "backward"] if args.crossover else ["forward", "forward_backward"])
    valid = ("forward", "backward") if args.crossover else ("forward", "forward_backward")
    for op in args.ops:
        if op not in valid:
            p.error(f"unknown op {op!r}; expected one of {', '.join(valid)}")
    args.tokens = args.tokens or ([1, 2, 4, 8, 16, 32, 64, 128] if args.crossover else [1, 16, 512, 2048])
    torch.set_num_threads(args.threads)
    for line in machine_lines(args.threads):
        print(line)
    print(f"Command: python {' '.join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:]))}")
    began = time.time()
    rows = crossover(args) if args.crossover else compare(args)
    print(f"({time.time() - began:.0f} s; load average at end {os.getloadavg()[0]:.1f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine_lines(args.threads), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
