"""PNG plot of measured overhead: time relative to merged vs tokens, one line per implementation, one panel per
(op, dtype, shape, rank) series that has a merged baseline; mixed batches draw one line per adapter count."""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Dict, List

MAX_PANELS = 12
COLORS = {"peft": "tab:green", "addmm": "tab:blue", "fused": "tab:orange"}
MARKERS = {"x1": "o", "x4": "s", "x16": "^"}


def _series(records: List[Dict]):
    groups = defaultdict(lambda: defaultdict(list))
    for rec in records:
        if rec.get("ratio_vs_merged") is None or rec["impl"] == "merged":
            continue
        key = (rec["op"], rec["dtype"], rec["K"], rec["N"], rec["r"])
        # mixed batches: one panel per shape, one line per (implementation, adapter count)
        line = f"{rec['impl']} x{rec['n_adapters']}" if rec["op"] == "mixed_forward" else rec["impl"]
        groups[key][line].append(rec)
    # panels with the most token counts first: those are the overhead-vs-tokens curves worth drawing
    ordered = sorted(groups.items(), key=lambda kv: -max(len(v) for v in kv[1].values()))
    return ordered[:MAX_PANELS]


def write_plot(records: List[Dict], path: str, title: str = "") -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = _series(records)
    cols = min(3, max(1, len(panels)))
    rows = max(1, math.ceil(len(panels) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, ((op, dtype, K, N, r), lines) in zip(axes.flat, panels):
        for line, recs in sorted(lines.items(), key=lambda kv: (kv[0].split(" ")[0], len(kv[0]), kv[0])):
            impl, _, count = line.partition(" ")
            recs = sorted(recs, key=lambda rec: rec["M"])
            xs = [rec["M"] for rec in recs]
            ys = [rec["ratio_vs_merged"] for rec in recs]
            lo = [max(0.0, y - (rec.get("ratio_vs_merged_p20") or y)) for y, rec in zip(ys, recs)]
            hi = [max(0.0, (rec.get("ratio_vs_merged_p80") or y) - y) for y, rec in zip(ys, recs)]
            ax.errorbar(xs, ys, yerr=[lo, hi], marker=MARKERS.get(count, "o"), capsize=3, label=line,
                        color=COLORS.get(impl), linestyle="-" if count in ("", "x1") else ":")
        ax.axhline(1.0, color="gray", linewidth=0.8, linestyle="--")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens M")
        ax.set_ylabel("time / merged")
        ax.set_title(f"{op} {dtype} {K}->{N} r={r}", fontsize=9)
        ax.legend(fontsize=8)
    if not panels:
        axes.flat[0].text(0.5, 0.5, "no series with a merged baseline", ha="center", va="center")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
