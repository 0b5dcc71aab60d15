"""Markdown tables for benchmarks/PERFORMANCE.md: the measured records of one run (the GPU MODEL is printed by
`bench --model-only`, fused_lora/bench/model_tables.py)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict, Iterable, List

from fused_lora.perf import cost_model

MIB = cost_model.MIB


def _ratio(rec: Dict, key: str) -> str:
    if rec is None or rec.get(key) is None:
        return "-"
    return f"{rec[key]:.3f} [{rec[key + '_p20']:.2f}-{rec[key + '_p80']:.2f}]"


def _cases(records: Iterable[Dict]) -> "OrderedDict[tuple, Dict[str, Dict]]":
    cases: "OrderedDict[tuple, Dict[str, Dict]]" = OrderedDict()
    for rec in records:
        key = (rec["op"], rec["dtype"], rec["M"], rec["K"], rec["N"], rec["r"], rec["n_adapters"])
        cases.setdefault(key, {})[rec["impl"]] = rec
    return cases


def measured_tables(records: List[Dict]) -> str:
    """One table for time-vs-merged ops (median ratio [p20-p80], paired per round) and one for merges."""
    cases = _cases(records)
    out = [
        "| op | dtype | tokens M | K->N | r | adapters | merged ms | PEFT x merged | addmm x merged | "
        "fused x merged | fused x PEFT |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    merges = [
        "| dtype | K->N | r | PEFT merge ms | fused merge_ ms | fused x PEFT | PEFT peak extra MiB | "
        "fused peak extra MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (op, dtype, M, K, N, r, n), impls in cases.items():
        if op == "merge":
            peft, fused = impls.get("peft"), impls.get("fused")

            def peak(rec):
                return (
                    "-"
                    if rec is None or rec.get("peak_extra_bytes") is None
                    else f"{rec['peak_extra_bytes'] / MIB:.0f}"
                )

            merges.append(
                f"| {dtype} | {K}->{N} | {r} | {peft['median_s'] * 1e3:.1f} | "
                f"{fused['median_s'] * 1e3:.1f} | {_ratio(fused, 'ratio_vs_peft')} | {peak(peft)} | "
                f"{peak(fused)} |"
            )
            continue
        merged = impls.get("merged")
        adapters = str(n) if op == "mixed_forward" else "1"
        out.append(
            f"| {op} | {dtype} | {M} | {K}->{N} | {r} | {adapters} | "
            f"{merged['median_s'] * 1e3:.2f} | {_ratio(impls.get('peft'), 'ratio_vs_merged')} | "
            f"{_ratio(impls.get('addmm'), 'ratio_vs_merged')} | {_ratio(impls.get('fused'), 'ratio_vs_merged')}"
            f" | {_ratio(impls.get('fused'), 'ratio_vs_peft')} |"
        )
    text = "\n".join(out) if len(out) > 2 else ""
    if len(merges) > 2:
        text += ("\n\n" if text else "") + "\n".join(merges)
    return text


def _find(records: List[Dict], **want) -> Dict:
    for rec in records:
        if all(rec.get(k) == v for k, v in want.items()):
            return rec
    return None


def targets_summary(records: List[Dict]) -> str:
    """The issue's targets, read off one run: fused forward within 3% of merged (4096->4096, r=16, 512 and 2048
    tokens), forward+backward vs PEFT, merge time and peak extra memory vs PEFT. Missing cases are skipped."""
    lines = []
    for dtype in ("float32", "bfloat16"):
        for M in (512, 2048):
            fused = _find(records, op="forward", impl="fused", dtype=dtype, M=M, K=4096, N=4096, r=16)
            peft = _find(records, op="forward", impl="peft", dtype=dtype, M=M, K=4096, N=4096, r=16)
            if fused and peft:
                verdict = "yes" if fused["ratio_vs_merged"] <= 1.03 else "no"
                lines.append(
                    f"- forward {dtype} M={M}: fused {_ratio(fused, 'ratio_vs_merged')} x merged "
                    f"(median within 3%: {verdict}); PEFT {_ratio(peft, 'ratio_vs_merged')}"
                )
    for dtype in ("float32", "bfloat16"):
        for M in (512, 2048):
            fused = _find(records, op="forward_backward", impl="fused", dtype=dtype, M=M, K=4096, N=4096, r=16)
            if fused:
                lines.append(
                    f"- forward+backward {dtype} M={M}: fused {_ratio(fused, 'ratio_vs_peft')} x PEFT, "
                    f"{_ratio(fused, 'ratio_vs_merged')} x merged"
                )
    for rec in records:
        if rec["op"] == "merge" and rec["impl"] == "fused":
            peft = _find(records, op="merge", impl="peft", dtype=rec["dtype"], K=rec["K"], N=rec["N"], r=rec["r"])
            mem = ""
            if peft and rec.get("peak_extra_bytes") is not None and peft.get("peak_extra_bytes") is not None:
                mem = (
                    f"; peak extra memory {rec['peak_extra_bytes'] / MIB:.1f} MiB vs PEFT "
                    f"{peft['peak_extra_bytes'] / MIB:.0f} MiB"
                )
            lines.append(
                f"- merge {rec['dtype']} {rec['K']}x{rec['N']} r={rec['r']}: fused "
                f"{_ratio(rec, 'ratio_vs_peft')} x PEFT's time{mem}"
            )
    return "\n".join(lines)
