"""Issue 13's regimes timed by the one model (gpu_model), and the quantities its targets are stated in. A MODEL.

The launches are kernels/launch_plan.py's (before = main at dd3ed58, after = today, after + PDL = today with
FUSED_LORA_PDL=1 on sm_90); their counts are exact, their times are this package's rule. Each regime is judged
against a reference:
    decode, prefill   merged: the same GEMM by cuBLAS without LoRA
    mixed decode      one adapter's dense decode (the same 16 rows, Triton), planned with the same PDL setting
    mixed prefill     the same rows on one adapter (Triton), same PDL setting
    backward          dX = dY W by cuBLAS alone
Every time is given twice: with our GEMM cores at parity with cuBLAS (issue 13's premise) and at the assumed
core efficiency (gpu_model ASSUMPTIONS triton_core_eff).
"""

from __future__ import annotations

from typing import Dict, List, Tuple

from fused_lora.perf import plans
from fused_lora.perf.gpu_model import ASSUMPTIONS, GPUS, Gpu, launch_time, parity, plan_seconds, value

# issue 13's targets
DECODE_HBM_TARGET = 0.85  # of copy bandwidth, M <= 16, N in {1024, 4096, 14336}, K = 4096
MIXED_DECODE_TARGET = 1.15  # x one adapter's decode, 16 rows x 16 adapters
PREFILL_TARGETS = {512: 1.10, 2048: 1.05, 8192: 1.05}  # fused forward x merged, GEMM core at parity


def _lp():
    from fused_lora.kernels import launch_plan

    return launch_plan


def _seconds(launches, dtype: str, gpu: Gpu, at_parity: bool) -> float:
    if at_parity:
        with parity():
            return plan_seconds(launches, gpu, dtype)
    return plan_seconds(launches, gpu, dtype)


def _reference(op: str, shape, pdl: bool) -> Tuple[str, list]:
    """(label, this model's launches) of what a regime is judged against."""
    lp = _lp()
    e = shape.e
    if op == "forward":
        return "merged", plans.merged(plans.Shape("forward", shape.M, shape.K, shape.N, shape.R, shape.dtype))
    if op == "backward":
        return "dX by cuBLAS", plans.merged(plans.Shape("backward", shape.M, shape.K, shape.N, shape.R, shape.dtype))
    if op == "rows_forward" and shape.M <= 64:
        one = lp.Shape(shape.M, shape.N, shape.K, [shape.ranks[0]], shape.dtype)
        return "one adapter's decode", plans.from_launch_plan(lp.plan("forward", one, pdl=pdl), e)
    if op == "rows_forward":
        same_rows = lp.Shape(shape.M, shape.N, shape.K, shape.ranks, shape.dtype, row_ids=lp.single(shape.M))
        return "same rows, one adapter", plans.from_launch_plan(lp.plan("rows_forward", same_rows, pdl=pdl), e)
    raise ValueError(f"no reference for op {op!r}")


def useful_hbm_fraction(lp_launch, gpu: Gpu, dtype: str) -> float:
    """The op's compulsory bytes of one launch (split partials left out: they are overhead) per its modelled
    time, as a fraction of copy bandwidth: issue 13's "% of HBM bandwidth"."""
    (launch,) = plans.from_launch_plan([lp_launch], 2 if dtype != "float32" else 4)
    useful = lp_launch.hbm_bytes - 4 * lp_launch.writes.get("part", 0)
    return useful / launch_time(launch, gpu, dtype).seconds / gpu.bandwidth


def issue13_rows(gpu: str = "H100") -> List[Dict]:
    """One row per regime and version: counts (exact) and MODEL times at parity and at the assumed efficiency."""
    lp = _lp()
    g = GPUS[gpu]
    rows = []
    for name, op, shape in lp.issue13_regimes():
        versions = [("before", lp.plan_before(op, shape), False), ("after", lp.plan(op, shape, pdl=False), False)]
        with_pdl = lp.plan(op, shape, pdl=True)
        if any(lc.pdl for lc in with_pdl):
            versions.append(("after+PDL", with_pdl, True))
        for version, lp_launches, pdl in versions:
            launches = plans.from_launch_plan(lp_launches, shape.e, before=version == "before")
            label, ref = _reference(op, shape, pdl)
            widest = max(lp_launches, key=lambda lc: lc.hbm_bytes)
            row = {
                "regime": name,
                "op": op,
                "version": version,
                "pdl": pdl,
                "reference": label,
                "grids": lp.grids(lp_launches),
                "launches": len(lp_launches),
                "w_loads": sum(lc.loads.get("w", 0) for lc in lp_launches) / (shape.N * shape.K),
                "partial_mib": lp.partial_bytes(lp_launches) / 2**20,
                "hbm_fraction": useful_hbm_fraction(widest, g, shape.dtype),
            }
            for key, at_parity in (("parity", True), ("assumed", False)):
                seconds = _seconds(launches, shape.dtype, g, at_parity)
                row[f"{key}_s"] = seconds
                row[f"{key}_x"] = seconds / _seconds(ref, shape.dtype, g, at_parity)
            rows.append(row)
    return rows


# ---- issue 13's targets, as the model states them ----------------------------------------------------------------
def decode_hbm_fraction(M: int, N: int, K: int = 4096, r: int = 16, gpu: str = "H100") -> float:
    """The decode launch's share of copy bandwidth (the forward at M <= 16 is one launch: the shrink in its pass)."""
    lp = _lp()
    launches = lp.plan("forward", lp.Shape(M, N, K, [r]), pdl=False)
    widest = max(launches, key=lambda lc: lc.hbm_bytes)
    return useful_hbm_fraction(widest, GPUS[gpu], "bfloat16")


def decode_budget(M: int, N: int, K: int = 4096, r: int = 16, gpu: str = "H100") -> Dict[str, float]:
    """Where the decode launch's modelled time goes, in seconds: `copy` (its compulsory bytes at copy bandwidth),
    `mem_eff` (what streaming them at mem_eff of a copy adds), `partials` (the split partials' bytes at that
    rate), `tail` (the dependent round trips after the K loop: the split ticket and the partials), `other` (the rest:
    the busiest SM's share, compute or L2 above the stream), `total`; and `tail_allowed`: the most the work after
    the W stream may take for the target (target time - copy - mem_eff), which no split-K reduction fits when it
    is below its round trips (the ticket, then the partials: launch_plan.partial_trips); `round_trips`, `splits`."""
    lp = _lp()
    g = GPUS[gpu]
    (lc,) = [x for x in lp.plan("forward", lp.Shape(M, N, K, [r]), pdl=False) if x.kernel == "decode_kernel"]
    (launch,) = plans.from_launch_plan([lc], 2)
    t = launch_time(launch, g, "bfloat16")
    part = 4 * lc.writes.get("part", 0)
    useful = lc.hbm_bytes - part
    rate = g.bandwidth * value("mem_eff")
    copy, stream = useful / g.bandwidth, useful / rate
    tail = t.detail["tail_s"]
    return {
        "copy": copy,
        "mem_eff": stream - copy,
        "partials": part / rate,
        "tail": tail,
        "other": t.seconds - stream - part / rate - tail,
        "total": t.seconds,
        "tail_allowed": useful / (DECODE_HBM_TARGET * g.bandwidth) - stream,
        "round_trips": lc.tail_latencies,
        "splits": lc.config["splits"],
    }


def _decode_why(budget: Dict[str, float]) -> str:
    us = {k: v * 1e6 for k, v in budget.items() if k not in ("round_trips", "splits")}
    trips = budget["round_trips"]
    tail = (
        f"tail {us['tail']:.2f} ({trips} round trips: the ticket, {trips - 1} to read {budget['splits']} splits' "
        "partials)"
        if budget["splits"] > 1
        else "no split of K: no partials, no tail"
    )
    text = (
        f"{us['total']:.2f} us = copy {us['copy']:.2f} + mem_eff {us['mem_eff']:.2f} + partials "
        f"{us['partials']:.2f} + {tail}"
        + (f" + {us['other']:.2f} (the busiest SM, compute or L2 above the stream)" if us["other"] > 0.005 else "")
    )
    room = us["tail_allowed"] - us["partials"] - max(us["other"], 0.0)
    if trips and room < us["tail"]:
        low = ASSUMPTIONS["epilogue_rt_s"].low * 1e6
        text += (
            f"; 85% leaves {max(room, 0.0):.2f} us after the W stream for the {trips} dependent round trips of the "
            f"split-K reduction: met only if epilogue_rt_s <= {max(room, 0.0) / trips:.2f} us (assumed "
            f"{value('epilogue_rt_s') * 1e6:g}, range from {low:g})"
            + (", below the range: out of reach for this design" if room / trips < low else "")
        )
    return text


def _ratio(op: str, shape, pdl: bool, at_parity: bool, gpu: str) -> float:
    lp = _lp()
    g = GPUS[gpu]
    launches = plans.from_launch_plan(lp.plan(op, shape, pdl=pdl), shape.e)
    return _seconds(launches, shape.dtype, g, at_parity) / _seconds(
        _reference(op, shape, pdl)[1], shape.dtype, g, at_parity
    )


def mixed_decode_ratio(pdl: bool, n: int = 16, gpu: str = "H100") -> float:
    """16 rows over n adapters (interleaved) x the same rows on one adapter's dense decode."""
    lp = _lp()
    shape = lp.Shape(16, 4096, 4096, [16] * n, row_ids=lp.interleaved(16, n))
    return _ratio("rows_forward", shape, pdl, True, gpu)


def prefill_ratio(
    M: int, pdl: bool, at_parity: bool = True, N: int = 4096, K: int = 4096, r: int = 16, gpu: str = "H100"
) -> float:
    """The fused forward (shrink + fused GEMM) x merged, bf16."""
    lp = _lp()
    return _ratio("forward", lp.Shape(M, N, K, [r]), pdl, at_parity, gpu)


def targets(gpu: str = "H100") -> List[Dict]:
    """Every target of issue 13 with the configurations the model evaluates it in: {target, config, value, bound,
    met}, and for the decode rows `why`: its time term by term (decode_budget). PDL only where a launch overlaps a
    producer (the decode at r = 16 has none: one launch)."""
    out = []
    for M in (1, 16):
        for N in (1024, 4096, 14336):
            v = decode_hbm_fraction(M, N, gpu=gpu)
            out.append(
                {
                    "target": f"decode M={M} N={N} HBM BW",
                    "config": "PDL n/a (one launch)",
                    "value": v,
                    "bound": f">= {DECODE_HBM_TARGET:.0%}",
                    "met": v >= DECODE_HBM_TARGET,
                    "why": _decode_why(decode_budget(M, N, gpu=gpu)),
                }
            )
    for pdl in (False, True):
        v = mixed_decode_ratio(pdl, gpu=gpu)
        out.append(
            {
                "target": "mixed decode 16 x 16 ad x one adapter",
                "config": "PDL on" if pdl else "PDL off",
                "value": v,
                "bound": f"<= {MIXED_DECODE_TARGET:.2f}",
                "met": v <= MIXED_DECODE_TARGET,
            }
        )
    for M, bound in PREFILL_TARGETS.items():
        for pdl in (False, True):
            v = prefill_ratio(M, pdl, gpu=gpu)
            out.append(
                {
                    "target": f"prefill M={M} x merged (parity)",
                    "config": "PDL on" if pdl else "PDL off",
                    "value": v,
                    "bound": f"<= {bound:.2f}",
                    "met": v <= bound,
                }
            )
    return out
