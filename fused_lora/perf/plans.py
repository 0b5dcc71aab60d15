"""Kernel plans: the launches each implementation makes for a shape, with their bytes, FLOPs and grids. A MODEL input.

Implementations:
    merged        y = x W^T (cuBLAS): the floor
    peft          PEFT's LoRA Linear: base, lora_A, lora_B, * scaling, + (out of place)
    addmm         Unsloth's composition: out = x W^T; out.addmm_(x A^T, B^T, alpha=s)
    cublas        fused_lora's cuBLAS composition (fused_lora/ops/cublas_backend.py), t kept in fp32 for backward
    fused         fused_lora's Triton kernels after issue 13 (split-K decode with the shrink in its K loop, split
                  shrink, fused GEMM; per-row rank term inside the fused GEMM)
    fused_before  the Triton kernels of main at dd3ed58 (one-kernel decode with 64-column tiles and a second K
                  loop, unsplit shrink, per-adapter row tiles for mixed batches; GPU-REVIEW.md)
    vllm          mixed batches, vLLM/Punica: base GEMM once, then SGMV shrink and expand (modelled as memory-bound
                  kernels at cuBLAS-like efficiency: an assumption)

`fused_launches` is the one switch for the Triton plans: it takes kernels/launch_plan.py's launches (plan and
plan_before, computed by the launchers' own config/grid/split functions; `pdl` plans the launches as with
FUSED_LORA_PDL=1 on sm_90) when that module is importable, and falls back to this file's own mirror of the
launchers otherwise (own_fused_launches, no PDL).
Compulsory bytes: every operand read once per launch, every result written once. A GEMM's tile re-reads through
L2 are part of its efficiency (gpu_model: gemm_eff and the core factors); l2_bytes holds the traffic that stays in
L2 on top: split-K partials (small, written and read back at once) and abnormal re-reads (a whole W per row tile).
cuBLAS GEMMs carry their programs (gpu_model.cublas_programs) so the same wave rule times them as ours.
Activations and weights have the dtype's size, t and dS are fp32 (the op contract).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import List

from fused_lora.perf import occupancy
from fused_lora.perf.gpu_model import KIB, Launch, Occupancy, cublas_programs

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
IMPLS = ("merged", "peft", "addmm", "cublas", "fused", "fused_before", "vllm")
TARGET_PROGRAMS = 2 * 132  # issue 13's launches aim at 2 programs per SM (kernels/config.py)
MAX_SPLITS = 32


@dataclass(frozen=True)
class Shape:
    op: str  # forward | backward | forward_backward | mixed_forward | mixed_backward
    M: int
    K: int
    N: int
    r: int
    dtype: str = "bfloat16"
    n_adapters: int = 1
    dropout: bool = False
    adapters_fp32: bool = False  # fp32 adapters over a 16-bit model (PEFT's default autocast_adapter_dtype)

    @property
    def e(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def ae(self) -> int:
        return 4 if self.adapters_fp32 else self.e

    @property
    def R(self) -> int:
        """Stacked ranks: every adapter's ranks for mixed batches (r is one adapter's rank there)."""
        return self.r * (self.n_adapters if self.op.startswith("mixed") else 1)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def gemm(name: str, M: int, K: int, N: int, e: int, out_e: int = None, extra: float = 0.0, engine="cublas") -> Launch:
    """[M, K] @ [K, N] by cuBLAS: both operands read once, the result written once (+ extra bytes)."""
    out_e = e if out_e is None else out_e
    return Launch(
        name, M * K * e + K * N * e + M * N * out_e + extra, 2.0 * M * N * K, engine, programs=cublas_programs(M, N, K)
    )


def elementwise(name: str, read: float, written: float, elements: float) -> Launch:
    return Launch(name, read + written, elements, "torch")


# ---- implementations built from torch ops ------------------------------------------------------------------------
def merged(s: Shape) -> List[Launch]:
    return _with_backward(s, [gemm("x W^T", s.M, s.K, s.N, s.e)], [gemm("dx = dy W", s.M, s.N, s.K, s.e)])


def peft(s: Shape) -> List[Launch]:
    M, K, N, r, e = s.M, s.K, s.N, s.R, s.e
    MN = M * N * e
    fwd = [
        gemm("base x W^T", M, K, N, e),
        gemm("lora_A x A^T", M, K, r, e),
        gemm("lora_B S B^T", M, r, N, e),
        elementwise("* scaling", MN, MN, M * N),
        elementwise("result + lora", 2 * MN, MN, M * N),
    ]
    if s.dropout:
        fwd.insert(1, elementwise("dropout(x)", M * K * e, M * K * e + M * K, M * K))
    if s.op == "mixed_backward":
        raise ValueError("PEFT does not train mixed batches (adapter_names is inference only)")
    if s.op == "mixed_forward":  # PEFT loops over adapters, each on its rows (index_select + index_add per adapter)
        per = s.M / s.n_adapters
        fwd = [gemm("base x W^T", M, K, N, e)]
        for i in range(s.n_adapters):
            fwd += [
                elementwise(f"x[rows {i}]", per * K * e, per * K * e, per * K),
                gemm(f"lora_A {i}", int(per), K, s.r, e),
                gemm(f"lora_B {i}", int(per), s.r, N, e),
                elementwise(f"* scaling {i}", per * N * e, per * N * e, per * N),
                elementwise(f"result[rows {i}] +=", 2 * per * N * e, per * N * e, per * N),
            ]
        return fwd
    bwd = [
        elementwise("dT = dy * s", MN, MN, M * N),
        gemm("dS = dT B", M, N, r, e),
        gemm("dB = dT^T S", N, M, r, e),
        gemm("dA = dS^T x", r, M, K, e),
        gemm("dx_lora = dS A", M, r, K, e),
        gemm("dx = dy W", M, N, K, e),
        elementwise("dx += dx_lora", 2 * M * K * e, M * K * e, M * K),
    ]
    return _with_backward(s, fwd, bwd)


def addmm(s: Shape) -> List[Launch]:
    M, K, N, r, e = s.M, s.K, s.N, s.R, s.e
    fwd = [
        gemm("x W^T", M, K, N, e),
        gemm("S = x A^T", M, K, r, e),
        gemm("out.addmm_(S, B^T)", M, r, N, e, extra=M * N * e),
    ]  # addmm_ also reads out
    bwd = [
        gemm("dS = s dy B", M, N, r, e),
        gemm("dB = s dy^T S", N, M, r, e),
        gemm("dA = dS^T x", r, M, K, e),
        gemm("dx = dy W", M, N, K, e),
        gemm("dx.addmm_(dS, A)", M, r, K, e, extra=M * K * e),
    ]
    return _with_backward(s, fwd, bwd)


def cublas(s: Shape) -> List[Launch]:
    """fused_lora/ops/cublas_backend.py, launch by launch."""
    M, K, N, R, e, ae = s.M, s.K, s.N, s.R, s.e, s.ae
    fwd = []
    if ae != e:
        fwd.append(elementwise("x.to(fp32)", M * K * e, M * K * ae, M * K))
    shrinks = s.n_adapters if (s.dropout and s.op == "mixed_forward") else 1
    for _ in range(shrinks):
        if s.dropout:
            fwd += [
                Launch("keep mask (Philox)", M * K, 10.0 * M * K, "torch"),
                elementwise("x * keep / (1-p)", M * K * (e + 1), M * K * ae, M * K),
            ]
        fwd.append(gemm("S = drop(x) A^T" if s.dropout else "S = x A^T", M, K, R // shrinks, ae))
    fwd.append(elementwise("t = S * scale (fp32)", M * R * ae, M * R * 4, M * R))
    if s.op == "mixed_forward":
        fwd.append(elementwise("t *= rows' rank mask", M * R * 4 + M * 8, M * R * 4, M * R))
    fwd.append(gemm("y = x W^T + bias", M, K, N, e))
    if ae == e:
        fwd += [
            elementwise("t.to(dtype)", M * R * 4, M * R * e, M * R),
            gemm("y.addmm_(t, B^T)", M, R, N, e, extra=M * N * e),
        ]
    else:
        fwd += [gemm("d = t B^T (fp32)", M, R, N, 4), elementwise("y += d", M * N * (e + 4), M * N * e, M * N)]
    if s.op == "mixed_forward":
        fwd.append(elementwise("t per row (gather)", M * R * 4, M * s.r * 4, M * s.r))
    bwd = [elementwise("t.to(dtype)", M * R * 4, M * R * ae, M * R)]
    if s.op == "mixed_backward":
        bwd = [elementwise("t to stacked ranks (gather x mask)", M * s.r * 4 + M * 8, M * R * ae, M * R)]
    bwd += [
        gemm("dB = dy^T t", N, M, R, ae),
        gemm("dS = dy B", M, N, R, ae),
        elementwise("dS *= scale", M * R * ae, M * R * ae, M * R),
        gemm("dA = dS^T x", R, M, K, ae),
        gemm("dx = dy W", M, N, K, e),
        gemm("dx.addmm_(dS, A)", M, R, K, e, extra=M * K * e),
    ]
    if s.op == "mixed_backward":
        bwd.insert(4, elementwise("dS *= rows' rank mask", M * R * ae, M * R * ae, M * R))
    return _with_backward(s, fwd, bwd)


def vllm(s: Shape) -> List[Launch]:
    """Base GEMM once, then per-token shrink and expand over each row's adapter (SGMV): only r ranks per row."""
    M, K, N, r, e, n = s.M, s.K, s.N, s.r, s.e, s.n_adapters
    return [
        gemm("base x W^T", M, K, N, e),
        Launch("sgmv shrink", M * K * e + n * r * K * e + M * r * 4, 2.0 * M * K * r, "cublas"),
        Launch("sgmv expand (adds into y)", M * r * 4 + n * N * r * e + 2 * M * N * e, 2.0 * M * N * r, "cublas"),
    ]


def _with_backward(s: Shape, fwd: List[Launch], bwd: List[Launch]) -> List[Launch]:
    if s.op in ("backward", "mixed_backward"):
        return bwd
    if s.op == "forward_backward":
        return fwd + bwd
    return fwd


# ---- Triton plans -------------------------------------------------------------------------------------------------
# Occupancy of the kernels at dd3ed58, as codegen printed it (GPU-REVIEW.md): the "before" plan's kernels no longer
# exist in the tree, so the snapshot cannot have them.
_BEFORE_OCC = {
    "fused_gemm_128": Occupancy(116, 96 * KIB, 8, "codegen dd3ed58 (GPU-REVIEW.md)"),
    "fused_gemm_64": Occupancy(76, 72 * KIB, 8, "codegen dd3ed58 (GPU-REVIEW.md)"),
    "small_m_16": Occupancy(123, 80 * KIB, 4, "codegen dd3ed58 (GPU-REVIEW.md)"),
    "small_m_64": Occupancy(112, 64 * KIB, 8, "codegen dd3ed58 (GPU-REVIEW.md)"),
    "shrink": Occupancy(56, 60 * KIB, 4, "codegen dd3ed58 (GPU-REVIEW.md)"),
    "rows_gemm": Occupancy(64, 30 * KIB, 4, "codegen dd3ed58 (GPU-REVIEW.md)"),
}


_ESTIMATED = Occupancy(64, 60 * KIB, 4, "estimated")  # a config missing from the codegen snapshot


def gemm_tile(M: int, e: int) -> tuple:
    """(BLOCK_M, BLOCK_N, BLOCK_K, stages) of kernels/fused_gemm.py gemm_config (16-bit, no dropout; fp32)."""
    if e == 4:
        return 64, 64, 32, 3
    return (128, 128, 64, 3) if M > 256 else (64, 128, 64, 3)


def fused_gemm(
    name: str, M: int, Kred: int, N: int, R: int, e: int, before: bool, core: str = "tutorial", rank_flops_R: int = None
) -> Launch:
    """out = a b + rank term: a [M, Kred], b [Kred, N], the rank term's operands [M, R] fp32 and [R, N]."""
    bm, bn, bk, stages = gemm_tile(M, e)
    tiles_m, tiles_n = _cdiv(M, bm), _cdiv(N, bn)
    dt = "bf16" if e == 2 else "fp32"
    if before:
        occ = _BEFORE_OCC["fused_gemm_128" if bm == 128 else "fused_gemm_64"]
    elif core == "tma":  # kernels/fused_gemm_tma.py: one more stage, persistent grid (work per SM as below)
        stages += 1
        occ = occupancy.lookup(
            "fused_gemm_tma",
            ["y", "dense", f"BM={bm}", f"BN={bn}", dt],
            Occupancy(142, 128 * KIB, 8, "estimated") if bm == 128 else Occupancy(130, 96 * KIB, 4, "estimated"),
        )
    else:
        occ = occupancy.lookup(
            "fused_gemm",
            ["y", "dense", f"BM={bm}", f"BN={bn}", dt],
            Occupancy(116, 96 * KIB, 8, "estimated") if bm == 128 else Occupancy(76, 72 * KIB, 8, "estimated"),
        )
    rank_R = R if rank_flops_R is None else rank_flops_R
    return Launch(
        name,
        M * Kred * e + Kred * N * e + M * R * 4 + R * N * e + M * N * e,
        2.0 * M * N * Kred + 2.0 * M * N * rank_R,
        "triton",
        programs=tiles_m * tiles_n,
        occupancy=occ,
        in_flight=(stages - 1) * (bm + bn) * bk * e,
        core=core,
    )


def _splits(programs: int, steps: int) -> int:
    if programs >= TARGET_PROGRAMS or steps <= 1:
        return 1
    return max(1, min(steps, MAX_SPLITS, _cdiv(TARGET_PROGRAMS, programs)))


def shrink_launch(name: str, M: int, K: int, R: int, e: int, before: bool, segments: int = 1) -> Launch:
    bk = 128 if e == 2 else 64
    tiles = _cdiv(M, 64) * segments
    splits = 1 if before else _splits(tiles, _cdiv(K, bk))
    occ = _BEFORE_OCC["shrink"] if before else occupancy.lookup("shrink", ["dense", "BR=16", "bf16"], _ESTIMATED)
    partials = 2 * splits * tiles * 64 * 16 * 4 if splits > 1 else 0
    return Launch(
        name,
        M * K * e + R * K * e + M * R * 4,
        2.0 * M * K * R,
        "triton",
        programs=tiles * splits,
        occupancy=occ,
        in_flight=2 * (64 + 16) * bk * e,
        l2_bytes=partials,
        note=f"{splits} K splits" if splits > 1 else "",
    )


def decode_launch(s: Shape, before: bool) -> Launch:
    M, K, N, R, e = s.M, s.K, s.N, s.R, s.e
    bm = 16 if M <= 16 else 64
    bk = (128 if bm == 16 else 64) if e == 2 else (64 if bm == 16 else 32)
    tiles_n, tiles_m = _cdiv(N, 64), _cdiv(M, bm)
    tiles = tiles_n * tiles_m
    stages = 4 if e == 2 else 3
    w_in_flight = (stages - 1) * (64 + bm) * bk * e
    if before:  # small_m: W loop, drain, then a second K loop re-reading x and A for the shrink
        return Launch(
            "small_m: x W^T + (x A^T) B^T",
            M * K * e + N * K * e + R * K * e + N * R * e + M * N * e + M * R * 4,
            2.0 * M * N * K + 2.0 * M * K * R * tiles_n + 2.0 * M * R * N,
            "triton",
            programs=tiles,
            occupancy=_BEFORE_OCC["small_m_16" if bm == 16 else "small_m_64"],
            in_flight=w_in_flight,
        )
    splits = _splits(tiles, _cdiv(K, bk))
    partials = 2 * splits * tiles * (64 * bm + R * bm) * 4 if splits > 1 else 0
    occ = occupancy.lookup(
        "decode", [f"BM={bm}", "bf16" if e == 2 else "fp32"], Occupancy(128, 80 * KIB, 4, "estimated")
    )
    in_pass = R <= 32
    return Launch(
        "decode: split-K x W^T" + (" + shrink in the K loop" if in_pass else ""),
        M * K * e + N * K * e + N * R * e + M * N * e + M * R * 4 + (R * K * e if in_pass else 0),
        2.0 * M * N * K + (2.0 * M * K * R * tiles_n if in_pass else 0) + 2.0 * M * R * N,
        "triton",
        programs=tiles * splits,
        occupancy=occ,
        in_flight=w_in_flight,
        l2_bytes=partials,
        note=f"{splits} K splits" if splits > 1 else "",
    )


def _fused_forward(s: Shape, before: bool, core: str) -> List[Launch]:
    M, K, N, R, e = s.M, s.K, s.N, s.R, s.e
    if s.op == "mixed_forward":
        return _fused_rows(s, before, core)
    if M <= 64:
        launches = [decode_launch(s, before)]
        if not before and R > 32:
            launches.insert(0, shrink_launch("split shrink t = x A^T * s", M, K, R, e, before))
        return launches
    return [
        shrink_launch("shrink t = drop(x) A^T * s", M, K, R, e, before, _cdiv(R, 64) if R > 16 else 1),
        fused_gemm("GEMM, acc starts at t B^T", M, K, N, R, e, before, core),
    ]


def _fused_rows(s: Shape, before: bool, core: str) -> List[Launch]:
    M, K, N, r, e, n = s.M, s.K, s.N, s.r, s.e, s.n_adapters
    if before:
        # rows.py at dd3ed58: row tiles of one adapter each; every tile streams all of W (L2 traffic)
        bm = 16 if M <= 64 else 64
        row_tiles = M // bm + n + 1
        used = min(row_tiles, _cdiv(M, bm) + n)
        group = Launch(
            "group rows (1 program)",
            M * 8 + row_tiles * 12,
            0.0,
            "triton",
            programs=1,
            occupancy=Occupancy(64, 0, 4, "estimated"),
            in_flight=2 * KIB,
        )
        shrink = Launch(
            "rows shrink",
            M * K * e + n * r * K * e + M * r * 4,
            2.0 * M * K * r,
            "triton",
            programs=row_tiles,
            occupancy=_BEFORE_OCC["shrink"],
            in_flight=2 * (bm + 16) * 64 * e,
        )
        bn = 64
        gemm_launch = Launch(
            "rows GEMM (W per row tile)",
            M * K * e + N * K * e + M * r * 4 + n * N * r * e + M * N * e,
            2.0 * used * bm * N * K + 2.0 * M * N * r,
            "triton",
            programs=row_tiles * _cdiv(N, bn),
            occupancy=_BEFORE_OCC["rows_gemm"],
            in_flight=2 * (bm + bn) * 64 * e,
            l2_bytes=used * N * K * e,
            core=core,
        )
        return [group, shrink, gemm_launch]
    # issue 13: plain row tiles whatever adapters they mix; each tile's rank term visits the chunks its rows use
    bm = gemm_tile(M, e)[0]
    present = min(n, bm)  # adapters present in one row tile (sequences spread over the batch)
    if M <= 64:
        return [shrink_launch("per-row shrink", M, K, r, e, False), decode_launch(replace(s, op="forward"), False)]
    return [
        shrink_launch("per-row shrink", M, K, r, e, False),
        fused_gemm(
            "GEMM, acc starts at per-row t B_a^T", M, K, N, r, e, False, core, rank_flops_R=_cdiv(r, 16) * 16 * present
        ),
    ]


def _fused_backward(s: Shape, before: bool, core: str) -> List[Launch]:
    M, K, N, R, e = s.M, s.K, s.N, s.R, s.e
    dx = fused_gemm("dx = dy W + drop'(dS A)", M, N, K, R, e, before, core)
    if before:
        part_db = _cdiv(M, 64) * N * R * 4
        part_da = _cdiv(M, 64) * R * K * 4
        return [
            Launch(
                "dS, dB partials (one read of dy)",
                M * N * e + N * R * e + M * R * 4 + M * R * 4 + part_db,
                4.0 * M * N * R,
                "triton",
                programs=_cdiv(M, 64),
                occupancy=_BEFORE_OCC["shrink"],
                in_flight=2 * 64 * 64 * e,
            ),
            Launch("sum dB partials", part_db + N * R * e, part_db / 4, "torch"),
            Launch(
                "dA partials",
                M * R * 4 + M * K * e + part_da,
                2.0 * M * R * K,
                "triton",
                programs=_cdiv(M, 64) * _cdiv(K, 64),
                occupancy=_BEFORE_OCC["shrink"],
                in_flight=2 * 64 * 64 * e,
            ),
            Launch("sum dA partials", part_da + R * K * e, part_da / 4, "torch"),
            dx,
        ]
    tiles_n = _cdiv(N, 64)
    occ = occupancy.lookup("ds", ["dense", "bf16"], _ESTIMATED)
    ds = Launch(
        "dS = s dy B",
        M * N * e + N * R * e + M * R * 4,
        2.0 * M * N * R,
        "triton",
        programs=max(_cdiv(M, 64), TARGET_PROGRAMS),
        occupancy=occ,
        in_flight=2 * 64 * 64 * e,
    )
    db = Launch(
        "dB = dy^T t",
        M * N * e + M * R * 4 + N * R * e,
        2.0 * M * N * R,
        "triton",
        programs=max(tiles_n, TARGET_PROGRAMS),
        occupancy=occ,
        in_flight=2 * 64 * 64 * e,
    )
    da = Launch(
        "dA = dS^T drop(x)",
        M * R * 4 + M * K * e + R * K * e,
        2.0 * M * R * K,
        "triton",
        programs=max(_cdiv(K, 64), TARGET_PROGRAMS),
        occupancy=occ,
        in_flight=2 * 64 * 64 * e,
    )
    return [ds, db, da, dx]


def own_fused_launches(s: Shape, before: bool = False, core: str = "tutorial") -> List[Launch]:
    if s.op == "mixed_backward":  # per-row rank terms cost about one adapter's: each row takes its own ranks only
        return _fused_backward(replace(s, op="backward", n_adapters=1), before, core)
    fwd = _fused_forward(s, before, core)
    if s.op in ("forward", "mixed_forward"):
        return fwd
    bwd = _fused_backward(s, before, core)
    return bwd if s.op == "backward" else fwd + bwd


def _launch_plan_module():
    try:
        from fused_lora.kernels import launch_plan
    except Exception:  # no Triton, or the module is absent: the own mirror above stands in
        return None
    return launch_plan if hasattr(launch_plan, "plan") and hasattr(launch_plan, "plan_before") else None


def launch_plan_source() -> str:
    """Which plans the "fused" and "fused_before" implementations use."""
    if _launch_plan_module() is not None:
        return (
            "kernels/launch_plan.py (the launchers' own config, grid and split functions; before = its frozen "
            "copy of dd3ed58)"
        )
    return "fused_lora/perf/plans.py (own mirror of the launchers; kernels/launch_plan.py unavailable)"


_OPS = {
    "forward": ["forward"],
    "backward": ["backward"],
    "forward_backward": ["forward", "backward"],
    "mixed_forward": ["rows_forward"],
    "mixed_backward": ["rows_backward"],
}
_TOKENS = {"BLOCK_M": "BM", "BLOCK_N": "BN", "BLOCK_K": "BK", "BLOCK_R": "BR"}


def _occupancy_of(lp_launch, kernel: str, dt: str, stages: int, before: bool) -> Occupancy:
    cfg = lp_launch.config
    if before:
        bm = cfg.get("BLOCK_M", 64)
        known = {
            "small_m": "small_m_16" if bm == 16 else "small_m_64",
            "shrink": "shrink",
            "fused_gemm": "fused_gemm_128" if bm == 128 else "fused_gemm_64",
            "rows_gemm": "rows_gemm",
            "rows_shrink": "shrink",
        }.get(kernel)
        if known:
            return _BEFORE_OCC[known]
    fallback = Occupancy(
        128, stages * lp_launch.step_bytes, int(cfg.get("num_warps", 4)), "estimated (shared = stages x step bytes)"
    )
    tokens = [f"{short}={cfg[key]}" for key, short in _TOKENS.items() if key in cfg]
    if kernel == "decode" and "mode" in cfg:  # its rank modes share tile sizes, not registers or shared memory
        from fused_lora.kernels.decode import MODE_NAMES

        tokens.insert(0, MODE_NAMES[cfg["mode"]])
    for want in (tokens + [dt], tokens[:2] + [dt], [dt]):
        occ = occupancy.lookup(kernel, want, None) if not before else None
        if occ is not None and occ.source != "estimated":
            return occ
    return fallback


def from_launch_plan(lp_launches, e: int, core: str = "tutorial", before: bool = False) -> List[Launch]:
    """kernels/launch_plan.py launches (of one op, in order) as this model's launches."""
    return [_from_launch_plan(lc, e, core, before) for lc in lp_launches]


def _from_launch_plan(lp_launch, e: int, core: str, before: bool) -> Launch:
    """kernels/launch_plan.Launch -> this model's Launch. A GEMM core's tile re-reads through L2 belong to its
    efficiency assumption; every other kernel's L2 -> SM traffic (re-reads, split partials) is bounded by L2."""
    kernel = lp_launch.kernel.replace("_kernel", "").strip("_")
    cfg = lp_launch.config
    stages = int(cfg.get("num_stages", 3))
    gemm_core = kernel == "fused_gemm"
    use_tma = gemm_core and core == "tma" and e == 2 and not before
    name = "fused_gemm_tma" if use_tma else kernel
    occ = _occupancy_of(lp_launch, name, "bf16" if e == 2 else "fp32", stages + (1 if use_tma else 0), before)
    depth = min(stages - 1, lp_launch.steps) if lp_launch.steps else stages - 1
    return Launch(
        f"{name}: {lp_launch.note}" if lp_launch.note else name,
        lp_launch.hbm_bytes,
        lp_launch.flops,
        "triton",
        programs=lp_launch.programs,
        occupancy=occ,
        in_flight=max(1, depth) * lp_launch.step_bytes,
        l2_bytes=0.0 if gemm_core else lp_launch.l2_bytes(e),
        core="tma" if use_tma else "tutorial",
        tail_latencies=lp_launch.tail_latencies,
        tail_bytes=lp_launch.tail_bytes,
        pdl=lp_launch.pdl,
    )


def _launch_plan_launches(lp, s: Shape, before: bool, core: str, pdl: bool = False) -> List[Launch]:
    mixed = s.op.startswith("mixed")
    n = s.n_adapters if mixed else 1
    shape = lp.Shape(
        s.M, s.N, s.K, [s.r] * n, s.dtype, 0.1 if s.dropout else 0.0, lp.interleaved(s.M, n) if mixed else None
    )
    out = []
    for op in _OPS[s.op]:
        launches = lp.plan_before(op, shape) if before else lp.plan(op, shape, pdl=pdl)
        out += from_launch_plan(launches, s.e, core, before)
    return out


def fused_launches(s: Shape, core: str = "tutorial", before: bool = False, pdl: bool = False) -> List[Launch]:
    """The switch: kernels/launch_plan.py's plans when available, this file's own mirror otherwise. pdl: the
    launches as FUSED_LORA_PDL=1 makes them on sm_90 (consumers overlapping their shrink)."""
    lp = _launch_plan_module()
    if lp is not None:
        return _launch_plan_launches(lp, s, before, core, pdl)
    return own_fused_launches(s, before=before, core=core)


def launches(impl: str, s: Shape, core: str = "tutorial", pdl: bool = False) -> List[Launch]:
    if impl == "merged":
        return merged(s)
    if impl == "peft":
        return peft(s)
    if impl == "addmm":
        return addmm(s)
    if impl == "cublas":
        return cublas(s)
    if impl == "vllm":
        if s.op != "mixed_forward":
            raise ValueError("the vLLM plan models mixed batches (op mixed_forward) only")
        return vllm(s)
    if impl == "fused":
        return fused_launches(s, core, pdl=pdl)
    if impl == "fused_before":
        return fused_launches(s, before=True)
    raise ValueError(f"no plan for implementation {impl!r}; expected one of {', '.join(IMPLS)}")


def merge_launches(impl: str, N: int, K: int, r: int, dtype: str) -> List[Launch]:
    e = DTYPE_BYTES[dtype]
    W = N * K * e
    if impl == "fused":
        return [
            Launch(
                "W += s B A, tile by tile",
                2 * W + (N + K) * r * e,
                2.0 * N * K * r,
                "triton",
                programs=_cdiv(N, 64) * _cdiv(K, 128),
                occupancy=Occupancy(220, 12 * KIB, 4, "codegen dd3ed58"),
                in_flight=64 * 128 * e,
            )
        ]
    if impl == "peft":
        return [
            gemm("delta = B A", N, r, K, e),
            elementwise("delta * scaling", W, W, N * K),
            elementwise("W += delta", 2 * W, W, N * K),
        ]
    raise ValueError(f"no merge plan for implementation {impl!r}")
