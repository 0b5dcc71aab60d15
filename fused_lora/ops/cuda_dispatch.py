"""The CUDA backend's per-shape choice: the fused Triton kernels or the cuBLAS composition, never the slower one.

This module implements the op contract (CONTRACT.md) by forwarding every call to one of two backends:

    fused    fused_lora.ops.triton_backend (the Triton kernels)
    cublas   fused_lora.ops.cublas_backend (cuBLAS base GEMM, rank term added with beta = 1)

Who decides, first match wins (`decide`):
    1. FUSED_LORA_DISPATCH=fused|cublas forces one path for every call (auto, the default, does not); read once
       per process, like kernels/tuned.py's settings (clear_cache() re-reads it).
    2. Tensors not on a CUDA device (the interpreter in tests) take the Triton kernels: nothing to model there.
    3. A measurement: the GPU check kit's tuned file for this GPU (kernels/tuned.py), kernel "dispatch", shape
       class `shape_class(...)`, entry config {"path": "fused" | "cublas"}. Where a GPU has timed a shape class,
       that timing decides.
    4. The cost model (fused_lora/perf/cost_model.compare): the Triton plan is taken only if it is modelled
       faster even with every uncertain assumption at the end of its range that favours cuBLAS (Triton core at
       0.75x cuBLAS, the lowest per-SM bandwidth, ...). A margin inside that uncertainty goes to cuBLAS, so an
       unmeasured shape is never slower than cuBLAS by construction. Memory-bound decode stays fused: one launch
       that reads W once against a GEMV plus four small launches.
Decisions are cached per (op, device, dtype, shape), with M rounded up to a power of two for the model
(`model_tokens`): a call costs one dict lookup after the first of its bucket.
`python -m fused_lora info --explain M N K r dtype` prints a decision and both plans.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from typing import List, Optional

import torch

from fused_lora.ops import cublas_backend

ENV = "FUSED_LORA_DISPATCH"
PATHS = ("fused", "cublas")
TUNED_KERNEL = "dispatch"
OPS = ("forward", "backward", "mixed_forward", "mixed_backward")


@dataclass(frozen=True)
class Decision:
    path: str  # "fused" | "cublas"
    source: str  # "forced" | "not cuda" | "tuned" | "model"
    reason: str


_UNREAD = object()
_forced = _UNREAD


def forced_path() -> Optional[str]:
    """FUSED_LORA_DISPATCH as a path, None for auto; read once per process (clear_cache() re-reads it)."""
    global _forced
    if _forced is _UNREAD:
        value = os.environ.get(ENV, "auto").strip().lower() or "auto"
        if value not in ("auto",) + PATHS:
            raise ValueError(f"{ENV}={value!r} is not one of auto, {', '.join(PATHS)}")
        _forced = None if value == "auto" else value
    return _forced


def _bucket(value: int, edges: List[int], name: str) -> str:
    for edge in edges:
        if value <= edge:
            return f"{name}<={edge}"
    return f"{name}>{edges[-1]}"


def shape_class(
    op: str, dtype: torch.dtype, M: int, N: int, K: int, r: int, dropout: bool, n_adapters: int, adapters_fp32: bool
) -> str:
    """The tuned-file key of a dispatch decision, e.g. "forward:bfloat16:M<=4096:N4096:K4096:r<=16:p0:a1:ad16".

    Tokens buckets: M by 16/64/256/1024/4096, r by 16/64; N and K exact (they are model projections); p1 when any
    adapter has dropout; a = adapters (mixed batches); ad32 for fp32 adapters over a 16-bit model."""
    dt = str(dtype).replace("torch.", "")
    return ":".join(
        [
            op,
            dt,
            _bucket(M, [16, 64, 256, 1024, 4096], "M"),
            f"N{N}",
            f"K{K}",
            _bucket(r, [16, 64], "r"),
            "p1" if dropout else "p0",
            f"a{n_adapters}",
            "ad32" if adapters_fp32 else "ad16",
        ]
    )


def model_gpu(device_name: Optional[str]) -> str:
    """The cost model's GPU for a device name (the model knows H100 and A100; others are modelled as an H100)."""
    name = (device_name or "").upper()
    return "A100" if "A100" in name else "H100"


def _tuned_path(device, key: str) -> Optional[str]:
    try:
        from fused_lora.kernels.tuned import tuned_config
    except Exception:  # no Triton: nothing can have been tuned
        return None
    path = tuned_config(TUNED_KERNEL, key, {"path": ""}, device=device).get("path")
    return path if path in PATHS else None


def _plan_shape(
    op: str, M: int, N: int, K: int, r: int, dtype: torch.dtype, dropout: bool, n_adapters: int, adapters_fp32: bool
):
    from fused_lora.perf.plans import Shape

    dt = str(dtype).replace("torch.", "")
    if dt not in ("float32", "float16", "bfloat16"):
        dt = "float32"  # float64 goes to the reference on either path; model it as fp32
    return Shape(op, M, K, N, r, dt, n_adapters, dropout, adapters_fp32 and dt != "float32")


@lru_cache(maxsize=4096)
def _decide(
    op: str,
    device_type: str,
    device_name: Optional[str],
    dtype: torch.dtype,
    M: int,
    N: int,
    K: int,
    r: int,
    dropout: bool,
    n_adapters: int,
    adapters_fp32: bool,
    core: str,
    forced: Optional[str],
    tuned: Optional[str],
) -> Decision:
    if forced is not None:
        return Decision(forced, "forced", f"{ENV}={forced}")
    if device_type != "cuda":
        return Decision(
            "fused",
            "not cuda",
            f"{device_type} tensors run the Triton kernels (the interpreter); the dispatch models CUDA GPUs only",
        )
    if tuned is not None:
        return Decision(
            tuned,
            "tuned",
            f"measured on {device_name} by the GPU check kit (kernels/tuned.py, kernel {TUNED_KERNEL!r})",
        )
    from fused_lora.perf.cost_model import compare

    gpu = model_gpu(device_name)
    cmp = compare(_plan_shape(op, M, N, K, r, dtype, dropout, n_adapters, adapters_fp32), gpu, core)
    modelled = gpu if gpu in (device_name or "").upper() else f"{gpu} (as a stand-in for {device_name})"
    return Decision(cmp.choice, "model", f"MODEL on {modelled}: {cmp.why}")


def decide(
    op: str,
    device,
    dtype: torch.dtype,
    M: int,
    N: int,
    K: int,
    r: int,
    dropout: bool = False,
    n_adapters: int = 1,
    adapters_fp32: bool = False,
) -> Decision:
    """The path for one call (see the module docstring for the order of the rules)."""
    if op not in OPS:
        raise ValueError(f"op must be one of {', '.join(OPS)}, got {op!r}")
    device = torch.device(device)
    return _decide_on(
        op,
        device.type,
        device.index,
        dtype,
        model_tokens(M),
        N,
        K,
        r,
        bool(dropout),
        n_adapters,
        bool(adapters_fp32),
        forced_path(),
    )


@lru_cache(maxsize=4096)
def _decide_on(
    op: str,
    device_type: str,
    index: Optional[int],
    dtype: torch.dtype,
    M: int,
    N: int,
    K: int,
    r: int,
    dropout: bool,
    n_adapters: int,
    adapters_fp32: bool,
    forced: Optional[str],
) -> Decision:
    # M is a power of two here (model_tokens): the tuned classes' edges are powers of two, so the key is M's own
    name, tuned, core = None, None, "tutorial"
    if forced is None and device_type == "cuda":
        device = torch.device(device_type, index if index is not None else torch.cuda.current_device())
        name = torch.cuda.get_device_name(device)
        tuned = _tuned_path(device, shape_class(op, dtype, M, N, K, r, dropout, n_adapters, adapters_fp32))
        core = gemm_core(device, dtype, M)
    return _decide(op, device_type, name, dtype, M, N, K, r, dropout, n_adapters, adapters_fp32, core, forced, tuned)


def model_tokens(M: int) -> int:
    """The token count the model decides for: M rounded up to a power of two. Serving sees many distinct M; this
    keeps the cache small and plans cheap, and the decode/prefill boundary (64) is a power of two."""
    return 1 if M <= 1 else 1 << (M - 1).bit_length()


def gemm_core(device, dtype: torch.dtype, M: int) -> str:
    """Which fused GEMM core the Triton path would launch (kernels/fused_gemm_tma.py decides; "tutorial" when
    that module is absent)."""
    try:
        from fused_lora.kernels.fused_gemm_tma import selected_core
    except Exception:
        return "tutorial"
    return selected_core(device, dtype, M)


def clear_cache() -> None:
    """Forget every decision and re-read FUSED_LORA_DISPATCH (after changing it, a tuned file or
    FUSED_LORA_GEMM_CORE)."""
    global _forced
    _forced = _UNREAD
    _decide.cache_clear()
    _decide_on.cache_clear()


# ---- the op contract ------------------------------------------------------------------------------------------
def _triton():
    from fused_lora.ops import triton_backend

    return triton_backend


def _backend(decision: Decision):
    return cublas_backend if decision.path == "cublas" else _triton()


def _adapters_fp32(x, lora_a) -> bool:
    return lora_a.dtype == torch.float32 and x.dtype != torch.float32


def _dropout(dropout_p) -> bool:
    return any(float(p) > 0.0 for p in dropout_p)


def _max_rank(rank_ptr) -> int:
    return max([0] + [rank_ptr[i + 1] - rank_ptr[i] for i in range(len(rank_ptr) - 1)])


def lora_fwd(x, weight, bias, lora_a, lora_b, scale, rank_ptr, dropout_p, seed):
    d = decide(
        "forward",
        x.device,
        x.dtype,
        x.shape[0],
        weight.shape[0],
        x.shape[1],
        lora_a.shape[0],
        _dropout(dropout_p),
        1,
        _adapters_fp32(x, lora_a),
    )
    return _backend(d).lora_fwd(x, weight, bias, lora_a, lora_b, scale, rank_ptr, dropout_p, seed)


def lora_bwd(dy, x, weight, lora_a, lora_b, scale, t, rank_ptr, dropout_p, seed, need_dx):
    d = decide(
        "backward",
        x.device,
        x.dtype,
        x.shape[0],
        weight.shape[0],
        x.shape[1],
        lora_a.shape[0],
        _dropout(dropout_p),
        1,
        _adapters_fp32(x, lora_a),
    )
    return _backend(d).lora_bwd(dy, x, weight, lora_a, lora_b, scale, t, rank_ptr, dropout_p, seed, need_dx)


def lora_rows_fwd(x, weight, bias, lora_a, lora_b, scale, rank_ptr, row_ids, dropout_p, seed):
    d = decide(
        "mixed_forward",
        x.device,
        x.dtype,
        x.shape[0],
        weight.shape[0],
        x.shape[1],
        _max_rank(rank_ptr),
        _dropout(dropout_p),
        len(rank_ptr) - 1,
        _adapters_fp32(x, lora_a),
    )
    return _backend(d).lora_rows_fwd(x, weight, bias, lora_a, lora_b, scale, rank_ptr, row_ids, dropout_p, seed)


def lora_rows_bwd(dy, x, weight, lora_a, lora_b, scale, t, rank_ptr, row_ids, dropout_p, seed, need_dx):
    d = decide(
        "mixed_backward",
        x.device,
        x.dtype,
        x.shape[0],
        weight.shape[0],
        x.shape[1],
        _max_rank(rank_ptr),
        _dropout(dropout_p),
        len(rank_ptr) - 1,
        _adapters_fp32(x, lora_a),
    )
    return _backend(d).lora_rows_bwd(
        dy, x, weight, lora_a, lora_b, scale, t, rank_ptr, row_ids, dropout_p, seed, need_dx
    )


def lora_merge_(weight, lora_a, lora_b, scale, sign, fan_in_fan_out, safe):
    # one pass over W either way; the fused merge has no full-size temporary, so it is never worse
    return _triton().lora_merge_(weight, lora_a, lora_b, scale, sign, fan_in_fan_out, safe)


def dropout_keep(seed, M, K, p, salt):
    return _triton().dropout_keep(seed, M, K, p, salt)


# ---- explanation (python -m fused_lora info --explain) -------------------------------------------------------------
def explain(
    M: int,
    N: int,
    K: int,
    r: int,
    dtype: torch.dtype,
    n_adapters: int = 1,
    dropout: bool = False,
    adapters_fp32: bool = False,
) -> str:
    """The decision for each op at this shape, why, and both plans launch by launch (MODEL figures)."""
    import textwrap

    from fused_lora.perf import cost_model

    cuda = torch.cuda.is_available()
    device = torch.device("cuda") if cuda else None
    device_name = torch.cuda.get_device_name(device) if cuda else None
    gpu = model_gpu(device_name)
    where = device_name if cuda else f"no CUDA device here: the decision a CUDA {gpu} would take (MODEL)"
    lines = textwrap.wrap(
        f"dispatch at M={M} N={N} K={K} r={r} {str(dtype).replace('torch.', '')}"
        + (f", {n_adapters} adapters per row" if n_adapters > 1 else "")
        + (", dropout" if dropout else "")
        + f" on {where}",
        width=100,
        subsequent_indent="    ",
    )
    ops = ("mixed_forward", "mixed_backward") if n_adapters > 1 else ("forward", "backward")
    for op in ops:
        if cuda:
            d = decide(op, device, dtype, M, N, K, r, dropout, n_adapters, adapters_fp32)
            core = gemm_core(device, dtype, M)
        else:
            core = "tutorial"
            d = _decide(
                op,
                "cuda",
                f"{gpu} (modelled)",
                dtype,
                M,
                N,
                K,
                r,
                dropout,
                n_adapters,
                adapters_fp32,
                core,
                forced_path(),
                None,
            )
        lines.append("")
        lines += textwrap.wrap(f"{op}: {d.path} ({d.source}) - {d.reason}", width=100, subsequent_indent="    ")
        lines.append(
            f"  tuned-file key: {TUNED_KERNEL} / "
            f"{shape_class(op, dtype, M, N, K, r, dropout, n_adapters, adapters_fp32)}"
        )
        shape = _plan_shape(op, M, N, K, r, dtype, dropout, n_adapters, adapters_fp32)
        for impl, label in (("fused", f"Triton plan (GEMM core {core})"), ("cublas", "cuBLAS composition")):
            est = cost_model.estimate(impl, shape, gpu, core)
            lines.append(
                f"  {label}: MODEL {est.gpu_s * 1e6:.1f} us GPU, {len(est.launches)} launches, host "
                f"{est.host_s * 1e6:.0f} us (assumed)"
            )
            for text in cost_model.explain_launches(est):
                lines += textwrap.wrap(text, width=100, initial_indent="    - ", subsequent_indent="      ")
    lines.append("")
    lines += textwrap.wrap(
        "MODEL assumptions: `python -m fused_lora bench --model-only`; force a path with "
        f"{ENV}=fused|cublas; a measured decision comes from kernels/tuned/<gpu>.json "
        f"(kernel {TUNED_KERNEL!r}).",
        width=100,
    )
    return "\n".join(lines)


# ---- the GPU check kit's tune step: measure the decision itself (kernels/tuned.py: TuneCase) ----------------------
TUNE_SHAPES = (  # (op, M, N, K, r, adapters, quick)
    ("forward", 16, 4096, 4096, 16, 1, True),
    ("forward", 512, 4096, 4096, 16, 1, False),
    ("forward", 2048, 4096, 4096, 16, 1, True),
    ("forward", 8192, 4096, 4096, 16, 1, False),
    ("forward", 2048, 14336, 4096, 16, 1, False),
    ("backward", 2048, 4096, 4096, 16, 1, True),
    ("mixed_forward", 16, 4096, 4096, 16, 16, True),
    ("mixed_forward", 512, 4096, 4096, 16, 16, False),
)


def _tune_make(op: str, M: int, N: int, K: int, r: int, n: int):
    def make(device: torch.device, tiny: bool):
        from fused_lora import reference
        from fused_lora.kernels.tuned import TuneRun

        m, nn, k, rr = (20, 48, 40, 4) if tiny else (M, N, K, r)
        dtype = torch.float32 if tiny else torch.bfloat16  # the interpreter corrupts bf16
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(m, k, generator=gen).to(device, dtype)
        w = (torch.randn(nn, k, generator=gen) * k**-0.5).to(device, dtype)
        a = (torch.randn(n * rr, k, generator=gen) * k**-0.5).to(device, dtype)
        b = (torch.randn(nn, n * rr, generator=gen) * rr**-0.5).to(device, dtype)
        scale = torch.full((n * rr,), 2.0, dtype=torch.float32, device=device)
        rank_ptr = [i * rr for i in range(n + 1)]
        seed = torch.zeros(1, dtype=torch.int64, device=device)
        row_ids = torch.arange(m, device=device) % n
        dy = torch.randn(m, nn, generator=gen).to(device, dtype)
        f64 = [v.double() for v in (x, w, a, b, scale, dy)]
        if op == "backward":
            t = reference.lora_fwd(f64[0], f64[1], None, f64[2], f64[3], f64[4], rank_ptr, [0.0] * n, seed)[1]
            expected = reference.lora_bwd(
                f64[5], f64[0], f64[1], f64[2], f64[3], f64[4], t, rank_ptr, [0.0] * n, seed, True
            )[0]
        elif op == "mixed_forward":
            expected = reference.lora_rows_fwd(
                f64[0], f64[1], None, f64[2], f64[3], f64[4], rank_ptr, row_ids, [0.0] * n, seed
            )[0]
        else:
            expected = reference.lora_fwd(f64[0], f64[1], None, f64[2], f64[3], f64[4], rank_ptr, [0.0] * n, seed)[0]
        t32 = reference.lora_fwd(x, w, None, a, b, scale, rank_ptr, [0.0] * n, seed)[1] if op == "backward" else None

        def launch(cfg: dict) -> torch.Tensor:
            backend = cublas_backend if cfg["path"] == "cublas" else _triton()
            if op == "backward":
                return backend.lora_bwd(dy, x, w, a, b, scale, t32, rank_ptr, [0.0] * n, seed, True)[0]
            if op == "mixed_forward":
                return backend.lora_rows_fwd(x, w, None, a, b, scale, rank_ptr, row_ids, [0.0] * n, seed)[0]
            return backend.lora_fwd(x, w, None, a, b, scale, rank_ptr, [0.0] * n, seed)[0]

        return TuneRun(
            launch=launch,
            reference=expected,
            atol=1.6e-2 if dtype == torch.bfloat16 else 1e-4,
            shape=dict(M=m, N=nn, K=k, r=rr, adapters=n),
        )

    return make


def tune_space() -> list:
    """The decision measured: the cuBLAS composition is the default, the fused path a candidate that must beat it
    by kernels/tuned.TUNE_MARGIN; the winner is written as {"path": ...} under kernel "dispatch" and the key
    `shape_class` gives, which `decide` reads. (The kit's tune step scans fused_lora.kernels; this module lives in
    fused_lora.ops because it composes two backends, so the step must list it explicitly.)"""
    from fused_lora.kernels.tuned import TuneCase

    cases = []
    for op, M, N, K, r, n, quick in TUNE_SHAPES:
        key = shape_class(op, torch.bfloat16, M, N, K, r, False, n, False)
        cases.append(
            TuneCase(
                TUNED_KERNEL,
                key,
                {"path": "cublas"},
                [{"path": "fused"}],
                _tune_make(op, M, N, K, r, n),
                description=("quick: " if quick else "") + f"dispatch {op} M={M} N={N} K={K} r={r} adapters={n} bf16",
            )
        )
    return cases
