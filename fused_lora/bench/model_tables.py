"""`bench --model-only`: per regime, the dispatch's choice and its MODELLED time against merged and PEFT, the
Triton plan before (main at dd3ed58) and after issue 13, the cuBLAS composition and vLLM's mixed-batch plan.

Times are GPU time (a captured graph, or a host that keeps ahead); the last column is the eager figure, where host
time per call (an assumption until `bench --ops host` measures it) can dominate small shapes.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

from fused_lora.perf import cost_model, plans
from fused_lora.perf.gpu_model import describe_assumptions
from fused_lora.perf.occupancy import SNAPSHOT, snapshot
from fused_lora.perf.plans import Shape
from fused_lora.bench.tables import render

# (regime, op, tokens M, adapters)
REGIMES: List[Tuple[str, str, int, int]] = [
    ("decode", "forward", 1, 1), ("decode", "forward", 16, 1), ("decode", "forward", 64, 1),
    ("prefill", "forward", 512, 1), ("prefill", "forward", 2048, 1), ("prefill", "forward", 8192, 1),
    ("mixed", "mixed_forward", 16, 4), ("mixed", "mixed_forward", 16, 16),
    ("mixed", "mixed_forward", 512, 4), ("mixed", "mixed_forward", 512, 16),
    ("train", "forward_backward", 512, 1), ("train", "forward_backward", 2048, 1),
    ("train", "forward_backward", 8192, 1),
]


def _us(seconds: Optional[float]) -> str:
    return "-" if seconds is None else f"{seconds * 1e6:.1f}"


def regime_rows(K: int = 4096, N: int = 4096, r: int = 16, dtype: str = "bfloat16", gpu: str = "H100",
                core: str = "tutorial") -> List[dict]:
    rows = []
    for regime, op, M, n in REGIMES:
        shape = Shape(op, M, K, N, r, dtype, n)
        est = {impl: cost_model.estimate(impl, shape, gpu, core).gpu_s for impl in ("merged", "peft", "cublas",
                                                                                     "fused", "fused_before")}
        peft_host = cost_model.estimate("peft", shape, gpu).host_s
        est["vllm"] = cost_model.estimate("vllm", shape, gpu).gpu_s if op == "mixed_forward" else None
        pick = cost_model.chosen(shape, gpu, core)
        rows.append({"regime": regime, "op": op, "M": M, "adapters": n, "path": pick.label, "chosen_s": pick.gpu_s,
                     "x_merged": pick.gpu_s / est["merged"], "x_peft": pick.gpu_s / est["peft"],
                     "eager_x_peft": max(pick.gpu_s, pick.host_s) / max(est["peft"], peft_host), **{
                         f"{impl}_s": value for impl, value in est.items()}})
    return rows


def regime_table(K: int = 4096, N: int = 4096, r: int = 16, dtype: str = "bfloat16", gpu: str = "H100",
                 core: str = "tutorial") -> str:
    rows = regime_rows(K, N, r, dtype, gpu, core)
    cells = [[row["regime"], f"{row['M']}" + (f"/{row['adapters']}" if row["op"] == "mixed_forward" else ""),
              row["path"], _us(row["chosen_s"]), f"{row['x_merged']:.2f}", f"{row['x_peft']:.2f}",
              _us(row["fused_before_s"]), _us(row["fused_s"]), _us(row["cublas_s"]), _us(row["vllm_s"]),
              _us(row["merged_s"]), f"{row['eager_x_peft']:.2f}"] for row in rows]
    title = f"MODEL (not measured): {gpu} {dtype}, K={K} N={N} r={r}, GPU us per call, GEMM core {core}"
    columns = ["regime", "M/ad", "chosen", "us", "xmerged", "xPEFT", "before", "after", "cuBLAS", "vLLM", "merged",
               "eager"]
    caption = ("chosen: the dispatch's path (fused = Triton; forward and backward decided separately); before / "
               "after: the Triton plan of main at dd3ed58 / after issue 13; cuBLAS: the composition; vLLM: base "
               "GEMM + SGMV shrink + expand; M/ad: tokens / adapters; eager: max(GPU, host) x PEFT's.")
    return render(title, columns, cells, caption, right_from=3)


def merge_table(shapes=((4096, 4096), (8192, 8192)), ranks=(16, 64), dtype: str = "bfloat16",
                gpu: str = "H100") -> str:
    cells = []
    for K, N in shapes:
        for r in ranks:
            peft = cost_model.merge_estimate("peft", N, K, r, dtype, gpu)
            fused = cost_model.merge_estimate("fused", N, K, r, dtype, gpu)
            peaks = [cost_model.merge_peak_extra_bytes(i, N, K, dtype) / cost_model.MIB for i in ("peft", "fused")]
            cells.append([f"{K}x{N}", str(r), _us(peft.gpu_s), _us(fused.gpu_s), f"{fused.gpu_s / peft.gpu_s:.2f}",
                          f"{peft.bytes / cost_model.MIB:.0f} / {fused.bytes / cost_model.MIB:.0f}",
                          f"{peaks[0]:.0f} / {peaks[1]:.0f}"])
    return render(f"MODEL (not measured): merge, {gpu}, {dtype}",
                  ["W", "r", "PEFT us", "fused us", "x PEFT", "MiB moved P/F", "peak extra MiB P/F"], cells,
                  right_from=1)


def assumptions_text() -> str:
    occ = snapshot()
    lines = ["MODEL assumptions (value [range]; the dispatch takes the Triton path only if it wins with every one "
             "at the end that favours cuBLAS):"]
    lines += [f"  {line}" for line in describe_assumptions()]
    lines.append(f"  GPU: {cost_model.GPUS['H100'].source}")
    lines.append(f"  kernel plans: {plans.launch_plan_source()}")
    lines.append(f"  occupancy: {len(occ)} sm_90 configs from {SNAPSHOT.split('fused_lora/')[-1]}"
                 if occ else "  occupancy: no codegen snapshot; registers/shared memory estimated")
    return "\n".join(_wrap(line) for line in lines)


def _wrap(line: str, width: int = 100) -> str:
    import textwrap
    indent = " " * (len(line) - len(line.lstrip()) + 4)
    return "\n".join(textwrap.wrap(line, width=width, subsequent_indent=indent)) or line


def model_report(gpu: str = "H100") -> str:
    parts = [regime_table(gpu=gpu), regime_table(K=4096, N=14336, gpu=gpu), regime_table(K=4096, N=1024, gpu=gpu),
             regime_table(gpu=gpu, core="tma"), regime_table(dtype="float32", gpu=gpu), merge_table(gpu=gpu),
             assumptions_text()]
    return "\n\n".join(parts)
