"""`bench --model-only`: the one performance MODEL (fused_lora/perf) as tables. Rendering only: every number comes
from fused_lora.perf.

    issue13_table   issue 13's regimes before (main at dd3ed58), after, after with PDL: exact counts, MODEL times
                    with the GEMM core at parity and at the assumed efficiency, vs each regime's reference
    targets_table   issue 13's targets and which configuration (PDL on/off) meets them in the model
    regime_table    issue 15's regimes: the dispatch's choice and its time against merged and PEFT, the Triton plan
                    without and with PDL, the cuBLAS composition and vLLM's mixed-batch plan
Times are GPU time (a captured graph, or a host that keeps ahead); the eager column of regime_table is max(GPU,
host), where host time per call (an assumption until `bench --ops host` measures it) can dominate small shapes.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

from fused_lora.bench.tables import render
from fused_lora.perf import cost_model, plans, regimes
from fused_lora.perf.gpu_model import CUBLAS_TILE, describe_assumptions, value
from fused_lora.perf.occupancy import SNAPSHOT, snapshot
from fused_lora.perf.plans import Shape

# (regime, op, tokens M, adapters)
REGIMES: List[Tuple[str, str, int, int]] = [
    ("decode", "forward", 1, 1),
    ("decode", "forward", 16, 1),
    ("decode", "forward", 64, 1),
    ("prefill", "forward", 512, 1),
    ("prefill", "forward", 2048, 1),
    ("prefill", "forward", 8192, 1),
    ("mixed", "mixed_forward", 16, 4),
    ("mixed", "mixed_forward", 16, 16),
    ("mixed", "mixed_forward", 512, 4),
    ("mixed", "mixed_forward", 512, 16),
    ("train", "forward_backward", 512, 1),
    ("train", "forward_backward", 2048, 1),
    ("train", "forward_backward", 8192, 1),
]


def _us(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1e6:.0f}" if seconds >= 1e-3 else f"{seconds * 1e6:.1f}"


def regime_rows(
    K: int = 4096, N: int = 4096, r: int = 16, dtype: str = "bfloat16", gpu: str = "H100", core: str = "tutorial"
) -> List[dict]:
    rows = []
    for regime, op, M, n in REGIMES:
        shape = Shape(op, M, K, N, r, dtype, n)
        est = {
            impl: cost_model.estimate(impl, shape, gpu, core).gpu_s for impl in ("merged", "peft", "cublas", "fused")
        }
        est["fused_pdl"] = cost_model.estimate("fused", shape, gpu, core, pdl=True).gpu_s
        peft_host = cost_model.estimate("peft", shape, gpu).host_s
        est["vllm"] = cost_model.estimate("vllm", shape, gpu).gpu_s if op == "mixed_forward" else None
        pick = cost_model.chosen(shape, gpu, core)
        rows.append(
            {
                "regime": regime,
                "op": op,
                "M": M,
                "adapters": n,
                "path": pick.label,
                "chosen_s": pick.gpu_s,
                "x_merged": pick.gpu_s / est["merged"],
                "x_peft": pick.gpu_s / est["peft"],
                "eager_x_peft": max(pick.gpu_s, pick.host_s) / max(est["peft"], peft_host),
                **{f"{impl}_s": value for impl, value in est.items()},
            }
        )
    return rows


def regime_table(
    K: int = 4096, N: int = 4096, r: int = 16, dtype: str = "bfloat16", gpu: str = "H100", core: str = "tutorial"
) -> str:
    rows = regime_rows(K, N, r, dtype, gpu, core)
    cells = [
        [
            row["regime"],
            f"{row['M']}" + (f"/{row['adapters']}" if row["op"] == "mixed_forward" else ""),
            row["path"],
            _us(row["chosen_s"]),
            f"{row['x_merged']:.2f}",
            f"{row['x_peft']:.2f}",
            _us(row["fused_s"]),
            _us(row["fused_pdl_s"]),
            _us(row["cublas_s"]),
            _us(row["vllm_s"]),
            _us(row["merged_s"]),
            f"{row['eager_x_peft']:.2f}",
        ]
        for row in rows
    ]
    title = f"MODEL (not measured): {gpu} {dtype}, K={K} N={N} r={r}, GPU us per call, GEMM core {core}"
    columns = [
        "regime",
        "M/ad",
        "chosen",
        "us",
        "xmerged",
        "xPEFT",
        "Triton",
        "+PDL",
        "cuBLAS",
        "vLLM",
        "merged",
        "eager",
    ]
    caption = (
        "chosen: the dispatch's path (fused = Triton; forward and backward decided separately; PDL off, its "
        "default); Triton / +PDL: the Triton plan with FUSED_LORA_PDL off / on (sm_90); cuBLAS: the "
        "composition; vLLM: base GEMM + SGMV shrink + expand; M/ad: tokens / adapters; eager: max(GPU, "
        "host) x PEFT's."
    )
    return render(title, columns, cells, caption, right_from=3)


def merge_table(shapes=((4096, 4096), (8192, 8192)), ranks=(16, 64), dtype: str = "bfloat16", gpu: str = "H100") -> str:
    cells = []
    for K, N in shapes:
        for r in ranks:
            peft = cost_model.merge_estimate("peft", N, K, r, dtype, gpu)
            fused = cost_model.merge_estimate("fused", N, K, r, dtype, gpu)
            peaks = [cost_model.merge_peak_extra_bytes(i, N, K, dtype) / cost_model.MIB for i in ("peft", "fused")]
            cells.append(
                [
                    f"{K}x{N}",
                    str(r),
                    _us(peft.gpu_s),
                    _us(fused.gpu_s),
                    f"{fused.gpu_s / peft.gpu_s:.2f}",
                    f"{peft.bytes / cost_model.MIB:.0f} / {fused.bytes / cost_model.MIB:.0f}",
                    f"{peaks[0]:.0f} / {peaks[1]:.0f}",
                ]
            )
    return render(
        f"MODEL (not measured): merge, {gpu}, {dtype}",
        ["W", "r", "PEFT us", "fused us", "x PEFT", "MiB moved P/F", "peak extra MiB P/F"],
        cells,
        right_from=1,
    )


def _short(regime: str) -> str:
    for long, short in (
        ("decode M=", "dec M="),
        ("prefill M=", "pre M="),
        ("backward M=", "bwd M="),
        (" N=", " N"),
        ("mixed decode ", "mix dec "),
        ("mixed prefill ", "mix pre "),
        (" x ", "x"),
    ):
        regime = regime.replace(long, short)
    return regime


def issue13_table(gpu: str = "H100") -> str:
    cells = [
        [
            _short(row["regime"]),
            {"after+PDL": "+PDL"}.get(row["version"], row["version"]),
            row["grids"].replace(", ", "\n"),
            f"{row['w_loads']:.2f}",
            f"{row['partial_mib']:.1f}",
            f"{row['hbm_fraction']:.0%}",
            _us(row["parity_s"]),
            f"{row['parity_x']:.2f}",
            _us(row["assumed_s"]),
            f"{row['assumed_x']:.2f}",
        ]
        for row in regimes.issue13_rows(gpu)
    ]
    title = (
        f"MODEL (not measured), issue 13's regimes: {gpu} bf16, K=4096, r=16; counts exact "
        f"(kernels/launch_plan.py), times MODEL"
    )
    caption = (
        "launches: kernel: programs, one launch per line, (PDL): overlaps the launch before it "
        "(FUSED_LORA_PDL=1, sm_90); W: W elements loaded / W's; part: split partials written, MiB; BW: the "
        "biggest launch's compulsory bytes (partials left out) per its time, of copy bandwidth; par / eff: "
        f"GEMM core at parity with cuBLAS / at triton_core_eff = {value('triton_core_eff'):g}: us, and x "
        "the reference: merged (dec, pre), one adapter's decode (mix dec), the same rows on one adapter "
        "(mix pre), dX by cuBLAS (bwd), planned with the same PDL setting."
    )
    return render(
        title,
        ["regime", "version", "launches", "W", "part", "BW", "par us", "x", "eff us", "x"],
        cells,
        caption,
        right_from=3,
    )


def targets_table(gpu: str = "H100") -> str:
    cells = [
        [
            t["target"],
            t["config"],
            f"{t['value']:.0%}" if "BW" in t["target"] else f"{t['value']:.3f}",
            t["bound"],
            "met" if t["met"] else "MISSED",
        ]
        for t in regimes.targets(gpu)
    ]
    table = render(
        f"MODEL (not measured): issue 13's targets on {gpu}, bf16, K=4096, r=16",
        ["target", "configuration", "MODEL", "target", ""],
        cells,
        "PDL: FUSED_LORA_PDL=1 on sm_90, off by default until a GPU measures it.",
        right_from=2,
    )
    lines = [
        "decode time term by term (BW = copy / total; no kernel streams faster than mem_eff of a copy, and the "
        "last program of each column tile waits on the split ticket, then reads the partials about 4 splits per "
        "L2 round trip):"
    ] + [f"  {t['target']}: {t['why']}" for t in regimes.targets(gpu) if t.get("why")]
    return table + "\n" + "\n".join(_wrap(line) for line in lines)


def assumptions_text() -> str:
    occ = snapshot()
    lines = [
        "MODEL assumptions (value [range]: evidence; the dispatch takes the Triton path only if it wins with "
        "every one at the end that favours cuBLAS):"
    ]
    lines += [f"  {line}" for line in describe_assumptions()]
    lines.append(
        f"  rule: every GEMM (cuBLAS's, ours) at peak x gemm_eff x core factor per SM, the busiest SM "
        f"running ceil(programs / SMs) programs; cuBLAS's programs: {CUBLAS_TILE[0]}x{CUBLAS_TILE[1]} "
        f"output tiles (split along K when they cannot fill the SMs); memory at mem_eff x copy bandwidth"
    )
    lines.append(f"  GPU: {cost_model.GPUS['H100'].source}")
    lines.append(f"  kernel plans: {plans.launch_plan_source()}")
    lines.append(
        f"  occupancy: {len(occ)} sm_90 configs from {SNAPSHOT.split('fused_lora/')[-1]}"
        if occ
        else "  occupancy: no codegen snapshot; registers/shared memory estimated"
    )
    return "\n".join(_wrap(line) for line in lines)


def _wrap(line: str, width: int = 100) -> str:
    import textwrap

    indent = " " * (len(line) - len(line.lstrip()) + 4)
    return "\n".join(textwrap.wrap(line, width=width, subsequent_indent=indent)) or line


def model_report(gpu: str = "H100") -> str:
    parts = [
        issue13_table(gpu),
        targets_table(gpu),
        regime_table(gpu=gpu),
        regime_table(K=4096, N=14336, gpu=gpu),
        regime_table(K=4096, N=1024, gpu=gpu),
        regime_table(gpu=gpu, core="tma"),
        regime_table(dtype="float32", gpu=gpu),
        merge_table(gpu=gpu),
        assumptions_text(),
    ]
    return "\n\n".join(parts)
