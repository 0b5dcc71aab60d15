"""PNG of a bench run: time relative to merged, one panel per op.

    forward / forward_backward   one panel per (op, dtype, shape, rank): a line per implementation over tokens
    mixed_forward                one panel per (dtype, shape, rank, tokens): a line per implementation over the
                                 number of adapters
    merge                        one bar panel: PEFT's and fused's time per (shape, rank)
A series with a single x value would be a lone point: such cases are drawn as grouped bars instead (one bar panel
per op). Implementations at the same x are spread apart a little so their markers and error bars never overlap.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Dict, List

MAX_PANELS = 12
IMPL_ORDER = ("peft", "addmm", "fused")
STYLE = {
    "peft": ("tab:green", "s"),
    "addmm": ("tab:blue", "^"),
    "fused": ("tab:orange", "o"),
    "merged": ("tab:gray", "D"),
}
DODGE = {"peft": -1, "addmm": 0, "fused": 1}  # x offsets in steps of 4% (multiplicative on the log axis)
SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def _errors(recs: List[Dict], key: str):
    ys = [rec[key] for rec in recs]
    lo = [max(0.0, y - (rec.get(key + "_p20") if rec.get(key + "_p20") is not None else y)) for y, rec in zip(ys, recs)]
    hi = [max(0.0, (rec.get(key + "_p80") if rec.get(key + "_p80") is not None else y) - y) for y, rec in zip(ys, recs)]
    return ys, [lo, hi]


def _panels(records: List[Dict]):
    lines = defaultdict(lambda: defaultdict(list))  # panel key -> impl -> records
    for rec in records:
        if rec["op"] == "merge" or rec["impl"] == "merged" or rec.get("ratio_vs_merged") is None:
            continue
        if rec["op"] == "mixed_forward":
            key = ("mixed_forward", rec["dtype"], rec["K"], rec["N"], rec["r"], rec["M"])
        else:
            key = (rec["op"], rec["dtype"], rec["K"], rec["N"], rec["r"], None)
        lines[key][rec["impl"]].append(rec)
    curves, singles = [], defaultdict(list)
    for key, by_impl in lines.items():
        xs = {rec["n_adapters"] if key[0] == "mixed_forward" else rec["M"] for recs in by_impl.values() for rec in recs}
        if len(xs) >= 2:
            curves.append((key, by_impl))
        else:
            singles[key[0]] += [rec for recs in by_impl.values() for rec in recs]
    merges = [rec for rec in records if rec["op"] == "merge"]
    return curves, dict(singles), merges


def _curve_panel(ax, key, by_impl):
    op, dtype, K, N, r, M = key
    mixed = op == "mixed_forward"
    ticks = set()
    for impl in sorted(by_impl, key=lambda i: IMPL_ORDER.index(i) if i in IMPL_ORDER else 9):
        recs = sorted(by_impl[impl], key=lambda rec: rec["n_adapters"] if mixed else rec["M"])
        ticks.update(rec["n_adapters"] if mixed else rec["M"] for rec in recs)
        xs = [(rec["n_adapters"] if mixed else rec["M"]) * 1.04 ** DODGE.get(impl, 0) for rec in recs]
        ys, err = _errors(recs, "ratio_vs_merged")
        color, marker = STYLE.get(impl, (None, "o"))
        ax.errorbar(xs, ys, yerr=err, color=color, marker=marker, markersize=5, capsize=3, linewidth=1.4, label=impl)
    ax.axhline(1.0, color="gray", linewidth=0.8, linestyle="--")
    ys = [rec["ratio_vs_merged"] for recs in by_impl.values() for rec in recs]
    if max(ys) > 8 * min(ys):  # PEFT's mixed batches run to tens of x merged: keep the small ratios readable
        ax.set_yscale("log")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(ticks), [str(t) for t in sorted(ticks)])
    ax.minorticks_off()
    ax.set_xlabel("adapters in the batch" if mixed else "tokens M")
    ax.set_ylabel("time / merged")
    title = f"mixed batch {SHORT.get(dtype, dtype)} M={M}" if mixed else f"{op} {SHORT.get(dtype, dtype)}"
    ax.set_title(f"{title} {K}->{N} r={r}", fontsize=9)
    ax.legend(fontsize=8)


def _bar_panel(ax, title, groups: Dict[str, Dict[str, Dict]], key: str, ylabel: str, baseline: float = None):
    import numpy as np

    impls = [i for i in IMPL_ORDER if any(i in g for g in groups.values())]
    width = 0.8 / max(1, len(impls))
    positions = np.arange(len(groups))
    for j, impl in enumerate(impls):
        recs = [groups[g].get(impl) for g in groups]
        xs = [p + (j - (len(impls) - 1) / 2) * width for p, rec in zip(positions, recs) if rec]
        recs = [rec for rec in recs if rec]
        ys, err = _errors(recs, key)
        color, _ = STYLE.get(impl, (None, "o"))
        ax.bar(xs, ys, width=width * 0.9, yerr=err, capsize=3, color=color, label=impl)
    if baseline is not None:
        ax.axhline(baseline, color="gray", linewidth=0.8, linestyle="--")
    ax.set_xticks(positions)
    ax.set_xticklabels(list(groups), fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)


def write_plot(records: List[Dict], path: str, title: str = "") -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves, singles, merges = _panels(records)
    n_panels = min(MAX_PANELS, len(curves) + len(singles) + (1 if merges else 0)) or 1
    cols = 2 if n_panels in (2, 4) else min(3, n_panels)
    rows = math.ceil(n_panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[n_panels:]:
        ax.axis("off")
    slot = 0
    for key, by_impl in curves[:MAX_PANELS]:
        _curve_panel(flat[slot], key, by_impl)
        slot += 1
    for op, recs in singles.items():
        if slot >= n_panels:
            break
        groups: Dict[str, Dict[str, Dict]] = defaultdict(dict)
        for rec in recs:
            label = f"M={rec['M']}" + (f" x{rec['n_adapters']}" if op == "mixed_forward" else "")
            groups[f"{SHORT.get(rec['dtype'], rec['dtype'])} {rec['K']}->{rec['N']} r={rec['r']}\n{label}"][
                rec["impl"]
            ] = rec
        _bar_panel(flat[slot], f"{op} (one token count)", groups, "ratio_vs_merged", "time / merged", 1.0)
        slot += 1
    if merges and slot < n_panels:
        groups = defaultdict(dict)
        for rec in merges:
            ms = {"ms": rec["median_s"] * 1e3, "ms_p20": rec["p20_s"] * 1e3, "ms_p80": rec["p80_s"] * 1e3}
            groups[f"{SHORT.get(rec['dtype'], rec['dtype'])} {rec['K']}x{rec['N']}\nr={rec['r']}"][rec["impl"]] = ms
        _bar_panel(flat[slot], "merge into W (time per call)", groups, "ms", "ms")
        slot += 1
    if slot == 0:
        flat[0].text(0.5, 0.5, "no series with a merged baseline", ha="center", va="center")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
