"""A MODEL, not a measurement: the time each implementation's kernel plan implies on a GPU, and the dispatch test.

    plans.py      which launches an implementation makes for a shape (bytes, FLOPs, grids, occupancy)
    gpu_model.py  what one launch costs on a GPU (roofline per launch, waves, Little's law), and the assumptions
    this file     totals per implementation (GPU time, host time, eager time) and `compare`, the dispatch's rule

GPU time is what a captured CUDA graph (or a stream the host keeps ahead of) sees: the sum of the launches plus a
gap per launch (a PDL consumer overlapping its producer instead, gpu_model.overlap). Host time is the Python side
of one eager call; an eager call costs max(GPU, host). `pdl=True` models the Triton plans as FUSED_LORA_PDL=1 runs
them on sm_90 (off by default, as the switch is; the dispatch decides without it).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, List, Optional

from fused_lora.perf import plans
from fused_lora.perf.gpu_model import (
    AGAINST_TRITON,
    ASSUMPTIONS,
    GPUS,
    MIB,
    Gpu,
    Launch,
    describe_assumptions,
    launch_time,
    overlap,
    plan_seconds,
    scenario,
    value,
)
from fused_lora.perf.plans import DTYPE_BYTES, IMPLS, Shape

__all__ = [
    "GPUS",
    "MIB",
    "DTYPE_BYTES",
    "IMPLS",
    "Shape",
    "Estimate",
    "estimate",
    "compare",
    "Comparison",
    "chosen",
    "host_seconds",
    "merge_estimate",
    "merge_peak_extra_bytes",
    "model_records",
    "describe_assumptions",
    "ASSUMPTIONS",
]


def _gpu(gpu) -> Gpu:
    return gpu if isinstance(gpu, Gpu) else GPUS[gpu]


def host_seconds(impl: str, launches: List[Launch]) -> float:
    """Host time of one eager call (assumptions host_*; `bench --ops host` measures the real figures)."""
    if impl == "merged":
        return value("host_linear_call_s")
    if impl == "peft":
        return value("host_peft_call_s") + max(0, len(launches) - 5) * value("host_torch_op_s")
    if impl in ("addmm", "vllm"):
        return len(launches) * value("host_torch_op_s")
    if impl == "cublas":
        return value("host_fused_call_s") + len(launches) * value("host_torch_op_s")
    if impl in ("fused", "fused_before"):
        return value("host_fused_call_s") + len(launches) * value("host_triton_launch_s")
    raise ValueError(f"no host model for {impl!r}")


@dataclass(frozen=True)
class Estimate:
    impl: str
    shape: Shape
    gpu: str
    launches: List[Launch]
    gpu_s: float
    host_s: float

    @property
    def eager_s(self) -> float:
        return max(self.gpu_s, self.host_s)

    @property
    def bytes(self) -> float:
        return sum(k.bytes for k in self.launches)

    @property
    def flops(self) -> float:
        return sum(k.flops for k in self.launches)

    def record(self, merged: Optional["Estimate"] = None, peft: Optional["Estimate"] = None) -> Dict:
        s = self.shape
        return {
            "kind": "MODEL",
            "op": s.op,
            "impl": self.impl,
            "device": self.gpu,
            "dtype": s.dtype,
            "M": s.M,
            "K": s.K,
            "N": s.N,
            "r": s.r,
            "n_adapters": s.n_adapters,
            "bytes": self.bytes,
            "flops": self.flops,
            "launches": len(self.launches),
            "model_s": self.gpu_s,
            "host_s": self.host_s,
            "ratio_vs_merged": round(self.gpu_s / merged.gpu_s, 4) if merged else None,
            "ratio_vs_peft": round(self.gpu_s / peft.gpu_s, 4) if peft else None,
        }


def estimate(impl: str, shape: Shape, gpu="H100", core: str = "tutorial", pdl: bool = False) -> Estimate:
    g = _gpu(gpu)
    launches = plans.launches(impl, shape, core, pdl)
    return Estimate(impl, shape, g.name, launches, plan_seconds(launches, g, shape.dtype), host_seconds(impl, launches))


def explain_launches(est: Estimate) -> List[str]:
    """One line per launch: name, engine, programs, CTAs/SM and waves, bound, modelled microseconds."""
    g = GPUS[est.gpu]
    lines = []
    for i, k in enumerate(est.launches):
        t = launch_time(k, g, est.shape.dtype)
        grid = f", {k.programs} programs (tiles x K splits)" if k.engine == "cublas" else ""
        if k.engine == "triton":
            occ = k.occupancy
            grid = (
                f", {k.programs} programs, {t.ctas_per_sm} CTA/SM ({occ.registers} regs, "
                f"{occ.shared // 1024} KiB, {occ.source}), {t.waves:.2f} waves"
            )
        tail = f" incl. {t.detail['tail_s'] * 1e6:.1f} us tail" if t.detail.get("tail_s") else ""
        pdl = ""
        if k.pdl and i > 0:
            pair = overlap(est.launches[i - 1], k, g, est.shape.dtype)
            pdl = f"; PDL with the launch before: {pair['seconds'] * 1e6:.1f} us the pair, {pair['bound']}-bound"
        lines.append(
            f"{k.name}: {k.engine}{grid}, {k.bytes / MIB:.1f} MiB, {k.flops / 1e9:.2f} GFLOP, "
            f"{t.bound}-bound, {t.seconds * 1e6:.1f} us{tail}{pdl}" + (f" ({k.note})" if k.note else "")
        )
    return lines


@dataclass(frozen=True)
class Comparison:
    fused_s: float  # modelled GPU time of the Triton plan (central assumptions)
    cublas_s: float  # of the cuBLAS composition
    fused_worst_s: float  # both at the ends of the ranges that favour cuBLAS (AGAINST_TRITON)
    cublas_worst_s: float
    choice: str  # "fused" | "cublas"
    why: str


def compare(shape: Shape, gpu="H100", core: str = "tutorial", pdl: bool = False) -> Comparison:
    """The dispatch rule: the Triton plan is chosen only if it is faster even with every uncertain assumption at
    the end of its range that favours cuBLAS; a margin inside the model's own uncertainty goes to cuBLAS."""
    fused = estimate("fused", shape, gpu, core, pdl).gpu_s
    cub = estimate("cublas", shape, gpu).gpu_s
    with scenario(AGAINST_TRITON):
        fused_w = estimate("fused", shape, gpu, core, pdl).gpu_s
        cub_w = estimate("cublas", shape, gpu).gpu_s
    if fused_w < cub_w:
        why = (
            f"Triton {fused * 1e6:.1f} us vs cuBLAS composition {cub * 1e6:.1f} us; still faster with every "
            f"assumption at its cuBLAS-favouring end ({fused_w * 1e6:.1f} vs {cub_w * 1e6:.1f} us)"
        )
        return Comparison(fused, cub, fused_w, cub_w, "fused", why)
    if fused < cub:
        why = (
            f"Triton {fused * 1e6:.1f} us vs cuBLAS composition {cub * 1e6:.1f} us: a margin inside the model's "
            f"uncertainty (at the cuBLAS-favouring ends: {fused_w * 1e6:.1f} vs {cub_w * 1e6:.1f} us)"
        )
    else:
        why = f"cuBLAS composition {cub * 1e6:.1f} us vs Triton {fused * 1e6:.1f} us"
    return Comparison(fused, cub, fused_w, cub_w, "cublas", why)


@dataclass(frozen=True)
class Chosen:
    label: str  # "fused", "cuBLAS", or "fused/cuBLAS" (forward / backward)
    gpu_s: float
    host_s: float
    launches: int


def _pick(shape: Shape, gpu, core: str, pdl: bool) -> tuple:
    cmp = compare(shape, gpu, core, pdl)
    return cmp.choice, estimate(cmp.choice, shape, gpu, core, pdl)


def chosen(shape: Shape, gpu="H100", core: str = "tutorial", pdl: bool = False) -> Chosen:
    """What the CUDA dispatch runs for `shape` (forward and backward decided separately, as the ops are)."""
    names = {"fused": "fused", "cublas": "cuBLAS"}
    if shape.op != "forward_backward":
        path, est = _pick(shape, gpu, core, pdl)
        return Chosen(names[path], est.gpu_s, est.host_s, len(est.launches))
    fwd_path, fwd = _pick(replace(shape, op="forward"), gpu, core, pdl)
    bwd_path, bwd = _pick(replace(shape, op="backward"), gpu, core, pdl)
    label = names[fwd_path] if fwd_path == bwd_path else f"{names[fwd_path]}/{names[bwd_path]}"
    return Chosen(label, fwd.gpu_s + bwd.gpu_s, fwd.host_s + bwd.host_s, len(fwd.launches) + len(bwd.launches))


def model_records(op: str, impls, M: int, K: int, N: int, r: int, dtype: str, n_adapters: int = 1) -> List[Dict]:
    """MODEL rows beside measured records, for every GPU in GPUS: "fused" is what the CUDA dispatch would run."""
    rows = []
    for gpu in GPUS:
        if op == "merge":
            est = {i: merge_estimate(i, N, K, r, dtype, gpu) for i in impls if i in ("peft", "fused")}
            for impl, e in est.items():
                rows.append(
                    {
                        "kind": "MODEL",
                        "op": op,
                        "impl": impl,
                        "device": gpu,
                        "dtype": dtype,
                        "M": M,
                        "K": K,
                        "N": N,
                        "r": r,
                        "n_adapters": 1,
                        "bytes": e.bytes,
                        "launches": len(e.launches),
                        "model_s": e.gpu_s,
                        "host_s": e.host_s,
                        "ratio_vs_merged": None,
                        "ratio_vs_peft": round(e.gpu_s / est["peft"].gpu_s, 4) if "peft" in est else None,
                    }
                )
            continue
        shape = Shape(op, M, K, N, r, dtype, n_adapters)
        times = {}
        for impl in impls:
            if impl == "fused":
                pick = chosen(shape, gpu)
                times[impl] = (pick.gpu_s, pick.host_s, pick.label, pick.launches)
            elif impl in IMPLS:
                e = estimate(impl, shape, gpu)
                times[impl] = (e.gpu_s, e.host_s, impl, len(e.launches))
        for impl, (gpu_s, host_s, label, launches) in times.items():
            rows.append(
                {
                    "kind": "MODEL",
                    "op": op,
                    "impl": impl,
                    "path": label,
                    "device": gpu,
                    "dtype": dtype,
                    "M": M,
                    "K": K,
                    "N": N,
                    "r": r,
                    "n_adapters": n_adapters,
                    "launches": launches,
                    "model_s": gpu_s,
                    "host_s": host_s,
                    "ratio_vs_merged": round(gpu_s / times["merged"][0], 4) if "merged" in times else None,
                    "ratio_vs_peft": round(gpu_s / times["peft"][0], 4) if "peft" in times else None,
                }
            )
    return rows


# ---- merges -------------------------------------------------------------------------------------------------------
def merge_estimate(impl: str, N: int, K: int, r: int, dtype: str, gpu="H100") -> Estimate:
    g = _gpu(gpu)
    launches = plans.merge_launches(impl, N, K, r, dtype)
    host = value("host_fused_call_s") if impl == "fused" else 3 * value("host_torch_op_s")
    return Estimate(impl, Shape("merge", 0, K, N, r, dtype), g.name, launches, plan_seconds(launches, g, dtype), host)


def merge_peak_extra_bytes(impl: str, N: int, K: int, dtype: str) -> int:
    """Temporaries alive at once during a merge on a GPU: PEFT holds B A and its scaled copy (both [N, K] in the
    adapter dtype, here the weight's); the fused merge works tile by tile in registers."""
    if impl == "peft":
        return 2 * N * K * DTYPE_BYTES[dtype]
    if impl == "fused":
        return 0
    raise ValueError(f"no merge model for implementation {impl!r}")
