"""Hopper variant of the fused GEMM: TMA descriptors and a persistent grid, same launcher contract.

    out[M, N] = a[M, K] @ b + bias + rank term        (kernels/fused_gemm.py's semantics, rank term first)

What differs from kernels/fused_gemm.py (the Triton tutorial main loop: cp.async, one tile per CTA):
- a and b come in through TMA descriptors (host-side triton.tools.tensor_descriptor.TensorDescriptor; the copy
  engine fetches whole tiles into shared memory, zero-filled past the tensor's edge, so the K loop has no masks
  and no address arithmetic; on sm_90 the loads compile to UTMALDG, which benchmarks/codegen.py counts);
- a persistent grid: min(tiles, SMs x CTAS_PER_SM) programs loop over the output tiles in grouped order, so
  there is no tail wave of short-lived CTAs and the next tile's loads overlap the current epilogue;
- WARP_SPECIALIZE asks Triton to split the tile loop into producer and consumer warps (tl.range's
  warp_specialize; compiled on sm_90 by the installed Triton, see codegen_specs), off unless tuned.
The rank term (dense or per row, no dropout) is blocks.rank_term with pointer loads: its operands are
[BLOCK_M, R] and [R, BLOCK_N], too small and too oddly strided for descriptors (R = 3 rows are 12 bytes).

Used only where TMA applies and is wanted (`selected_core`): sm_90, 16-bit operands, no dropout on the rank term,
16-byte aligned base pointers and row strides, and either FUSED_LORA_GEMM_CORE=tma or a tuned entry for the shape
class (kernels/tuned.py, kernel "fused_gemm_tma", config {"core": "tma", ...}). Everywhere else
`launch_fused_gemm_selected` calls kernels/fused_gemm.launch_fused_gemm unchanged. Under the interpreter
(CPU tensors) the variant runs when forced, which is how its results are tested without a GPU.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from fused_lora.kernels import config
from fused_lora.kernels.blocks import grouped_tile, rank_term, row_adapters
from fused_lora.kernels.fused_gemm import RANK_CHUNK, launch_fused_gemm
from fused_lora.kernels.spec import KernelSpec

ENV = "FUSED_LORA_GEMM_CORE"
CORES = ("tutorial", "tma")
TUNED_KERNEL = "fused_gemm_tma"


@triton.jit
def fused_gemm_tma_kernel(
    a_desc,
    b_desc,
    bias_ptr,
    lt_ptr,
    lr_ptr,
    table_ptr,
    row_ids_ptr,
    out_ptr,
    M,
    N,
    K,
    R,
    n_adapters,
    n_programs,
    stride_ltm,
    stride_lrn,
    stride_lrr,
    stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
    B_K_MAJOR: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_LORA: tl.constexpr,
    PER_ROW: tl.constexpr,
    PRECISION: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
):
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), tiles_m * tiles_n, n_programs, warp_specialize=WARP_SPECIALIZE):
        pid_m, pid_n = grouped_tile(tile, tiles_m, tiles_n, GROUP_M)
        rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rows_in = rows % M
        cols_in = (cols % N).to(tl.int64)

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if HAS_LORA:
            if PER_ROW:
                row_ok = rows < M
                has, entry, row_lo, row_hi = row_adapters(row_ids_ptr, rows, row_ok, n_adapters, table_ptr)
                acc = rank_term(
                    acc,
                    lt_ptr,
                    stride_ltm,
                    lr_ptr,
                    stride_lrr,
                    stride_lrn,
                    rows,
                    row_ok,
                    cols_in,
                    None,
                    0,
                    R,
                    row_lo,
                    row_hi,
                    True,
                    False,
                    BLOCK_R,
                    PRECISION,
                )
            else:
                acc = rank_term(
                    acc,
                    lt_ptr,
                    stride_ltm,
                    lr_ptr,
                    stride_lrr,
                    stride_lrn,
                    rows_in,
                    None,
                    cols_in,
                    None,
                    0,
                    R,
                    None,
                    None,
                    False,
                    False,
                    BLOCK_R,
                    PRECISION,
                )

        # the descriptors zero-fill past M, N and K: no masks in the main loop
        for k0 in range(0, K, BLOCK_K):
            a = a_desc.load([pid_m * BLOCK_M, k0])
            if B_K_MAJOR:  # b given as its transpose [N, K] (the forward's W)
                b = b_desc.load([pid_n * BLOCK_N, k0]).T
            else:  # b given as [K, N] (dX's W)
                b = b_desc.load([k0, pid_n * BLOCK_N])
            acc = tl.dot(a, b, acc, input_precision=PRECISION)

        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols_in).to(tl.float32)[None, :]
        out_ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(rows < M)[:, None] & (cols < N)[None, :])


def _shape_class(M: int) -> str:
    return "16bit:M>256" if M > 256 else "16bit:M<=256"


def tma_config(M: int, device=None) -> dict:
    """Static tiles (tuned store over them): the tutorial core's tiles with one more stage (TMA frees the
    registers cp.async address math used) and CTAS_PER_SM programs per SM in the persistent grid."""
    if M > 256:
        default = dict(
            core="tutorial",
            BLOCK_M=128,
            BLOCK_N=128,
            BLOCK_K=64,
            GROUP_M=8,
            num_warps=8,
            num_stages=4,
            CTAS_PER_SM=1,
            WARP_SPECIALIZE=False,
        )
    else:
        default = dict(
            core="tutorial",
            BLOCK_M=64,
            BLOCK_N=128,
            BLOCK_K=64,
            GROUP_M=8,
            num_warps=4,
            num_stages=4,
            CTAS_PER_SM=2,
            WARP_SPECIALIZE=False,
        )
    return config.tuned(TUNED_KERNEL, _shape_class(M), default, device)


def forced_core() -> str:
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in ("auto",) + CORES:
        raise ValueError(f"{ENV}={value!r} is not one of auto, {', '.join(CORES)}")
    return value


def _is_sm90(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0)


def selected_core(device, dtype: torch.dtype, M: int) -> str:
    """ "tma" where the Hopper variant is wanted: sm_90 (or CPU tensors, the interpreter) with 16-bit operands,
    and FUSED_LORA_GEMM_CORE=tma or a tuned entry saying so; "tutorial" everywhere else."""
    device = torch.device(device)
    if dtype not in (torch.float16, torch.bfloat16):
        return "tutorial"
    forced = forced_core()
    if forced != "auto":
        return forced if (device.type == "cpu" or _is_sm90(device)) else "tutorial"
    if not _is_sm90(device):
        return "tutorial"
    return "tma" if tma_config(M, device).get("core") == "tma" else "tutorial"


def _aligned(t: torch.Tensor, row_stride: int) -> bool:
    return t.data_ptr() % 16 == 0 and (row_stride * t.element_size()) % 16 == 0


def tma_applies(a, b, b_strides, out, lora_dropout) -> bool:
    """The descriptors' rules: 16-bit, unit stride along each tile row, 16-byte aligned bases and row strides."""
    if lora_dropout or a.dtype not in (torch.float16, torch.bfloat16) or b.dtype != a.dtype:
        return False
    if a.stride(1) != 1 or not _aligned(a, a.stride(0)):
        return False
    stride_k, stride_n = b_strides
    if stride_k == 1:
        return _aligned(b, stride_n)
    return stride_n == 1 and _aligned(b, stride_k)


def launch_fused_gemm_tma(
    a,
    b,
    b_strides,
    bias,
    lt,
    lr,
    lr_strides,
    R,
    table,
    n_segs,
    seed,
    out,
    block_r,
    lora_dropout,
    precision,
    *,
    row_ids=None,
    n_adapters=0,
    cfg=None,
):
    """kernels/fused_gemm.launch_fused_gemm's contract on the Hopper core; falls back to it where TMA does not
    apply (tma_applies). cfg: a tma_config-shaped dict (the tuner's candidates), default tma_config(M)."""
    if not tma_applies(a, b, b_strides, out, lora_dropout):
        return launch_fused_gemm(
            a,
            b,
            b_strides,
            bias,
            lt,
            lr,
            lr_strides,
            R,
            table,
            n_segs,
            seed,
            out,
            block_r,
            lora_dropout,
            precision,
            row_ids=row_ids,
            n_adapters=n_adapters,
        )
    from triton.tools.tensor_descriptor import TensorDescriptor

    M, K = a.shape
    N = out.shape[1]
    per_row = row_ids is not None
    has_lora = lt is not None and R > 0 and (per_row or n_segs > 0)
    cfg = dict(cfg or tma_config(M, a.device))
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    a_desc = TensorDescriptor(a, [M, K], [a.stride(0), 1], [bm, bk])
    stride_k, stride_n = b_strides
    if stride_k == 1:
        b_desc = TensorDescriptor(b, [N, K], [stride_n, 1], [bn, bk])
    else:
        b_desc = TensorDescriptor(b, [K, N], [stride_k, 1], [bk, bn])
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    n_programs = max(1, min(tiles, config.sm_count(a.device) * cfg["CTAS_PER_SM"]))
    lt_arg = lt if has_lora else out
    lr_arg = lr if has_lora else b
    fused_gemm_tma_kernel[(n_programs,)](
        a_desc,
        b_desc,
        bias if bias is not None else out,
        lt_arg,
        lr_arg,
        table,
        row_ids if per_row else table,
        out,
        M,
        N,
        K,
        R if has_lora else 0,
        n_adapters,
        n_programs,
        lt_arg.stride(0) if has_lora else 0,
        lr_strides[0],
        lr_strides[1],
        out.stride(0),
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        BLOCK_R=RANK_CHUNK,
        GROUP_M=cfg["GROUP_M"],
        B_K_MAJOR=stride_k == 1,
        HAS_BIAS=bias is not None,
        HAS_LORA=has_lora,
        PER_ROW=per_row,
        PRECISION=precision,
        WARP_SPECIALIZE=bool(cfg["WARP_SPECIALIZE"]),
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )


def launch_fused_gemm_selected(
    a,
    b,
    b_strides,
    bias,
    lt,
    lr,
    lr_strides,
    R,
    table,
    n_segs,
    seed,
    out,
    block_r,
    lora_dropout,
    precision,
    *,
    row_ids=None,
    n_adapters=0,
    after_shrink=False,
):
    """The one entry the launchers call: the Hopper core where `selected_core` says so, else the tutorial core.
    after_shrink (the launch may overlap the shrink by PDL, kernels/config.py) is the tutorial core's only: the
    Hopper core reads the rank term before its K loop, so it is never a PDL consumer."""
    if selected_core(a.device, a.dtype, a.shape[0]) == "tma":
        return launch_fused_gemm_tma(
            a,
            b,
            b_strides,
            bias,
            lt,
            lr,
            lr_strides,
            R,
            table,
            n_segs,
            seed,
            out,
            block_r,
            lora_dropout,
            precision,
            row_ids=row_ids,
            n_adapters=n_adapters,
        )
    return launch_fused_gemm(
        a,
        b,
        b_strides,
        bias,
        lt,
        lr,
        lr_strides,
        R,
        table,
        n_segs,
        seed,
        out,
        block_r,
        lora_dropout,
        precision,
        row_ids=row_ids,
        n_adapters=n_adapters,
        after_shrink=after_shrink,
    )


# ---- ahead-of-time compilation (benchmarks/codegen.py): the gate requires UTMALDG and HGMMA on sm_90 ------------
def _spec(dt: str, M: int, backward: bool, per_row: bool, has_bias: bool, warp_specialize: bool) -> KernelSpec:
    cfg = tma_config(M)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    b_block = f"[{bk}, {bn}]" if backward else f"[{bn}, {bk}]"
    sig = {
        "a_desc": f"tensordesc<{dt}[{bm}, {bk}]>",
        "b_desc": f"tensordesc<{dt}{b_block}>",
        "bias_ptr": f"*{dt}",
        "lt_ptr": "*fp32",
        "lr_ptr": f"*{dt}",
        "table_ptr": "*i32",
        "row_ids_ptr": "*i64" if per_row else "*i32",
        "out_ptr": f"*{dt}",
        "M": "i32",
        "N": "i32",
        "K": "i32",
        "R": "i32",
        "n_adapters": "i32",
        "n_programs": "i32",
        "stride_ltm": "i32",
        "stride_lrn": "i32",
        "stride_lrr": "i32",
        "stride_om": "i32",
    }
    const = {}
    if backward:  # lr = A: Rm[r, k] = A[r, k], columns contiguous
        sig["stride_lrn"] = "constexpr"
        const["stride_lrn"] = 1
    else:  # lr = B^T: Rm[r, n] = B[n, r], ranks contiguous
        sig["stride_lrr"] = "constexpr"
        const["stride_lrr"] = 1
    flags = dict(
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        BLOCK_R=RANK_CHUNK,
        GROUP_M=cfg["GROUP_M"],
        B_K_MAJOR=not backward,
        HAS_BIAS=has_bias,
        HAS_LORA=True,
        PER_ROW=per_row,
        PRECISION="ieee",
        WARP_SPECIALIZE=warp_specialize,
    )
    sig.update({n: "constexpr" for n in flags})
    const.update(flags)
    name = (
        f"fused_gemm_tma[{'dx' if backward else 'y'},{'rows' if per_row else 'dense'},BM={bm},BN={bn},BK={bk},"
        f"bias={has_bias},ws={warp_specialize},{dt}]"
    )
    # TMA exists from sm_90 on; for sm_80 Triton lowers the descriptors to plain loads (that spill): never launched
    return KernelSpec(
        name=name,
        fn=fused_gemm_tma_kernel,
        signature=sig,
        constexprs=const,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
        extra={"arches": [90], "requires_tma": True},
    )


def codegen_specs() -> list[KernelSpec]:
    specs = []
    for dt in ("fp16", "bf16"):
        for M in (4096, 128):
            specs.append(_spec(dt, M, backward=False, per_row=False, has_bias=False, warp_specialize=False))
            specs.append(_spec(dt, M, backward=False, per_row=False, has_bias=True, warp_specialize=False))
            specs.append(_spec(dt, M, backward=True, per_row=False, has_bias=False, warp_specialize=False))
            specs.append(_spec(dt, M, backward=False, per_row=True, has_bias=False, warp_specialize=False))
        specs.append(_spec(dt, 4096, backward=False, per_row=False, has_bias=False, warp_specialize=True))
    return specs


# ---- the GPU check kit's tune step (kernels/tuned.py: TuneCase) ----------------------------------------------------
def _tune_make(M: int, K: int, N: int, R: int):
    def make(device: torch.device, tiny: bool):
        from fused_lora.kernels.philox import segment_table
        from fused_lora.kernels.tuned import TuneRun

        m, k, n, r = (20, 40, 48, 4) if tiny else (M, K, N, R)
        dtype = torch.float16 if tiny else torch.bfloat16  # the interpreter corrupts bf16
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(m, k, generator=gen).to(device, dtype)
        w = (torch.randn(n, k, generator=gen) * k**-0.5).to(device, dtype)
        t = torch.randn(m, r, generator=gen).to(device)
        b = (torch.randn(n, r, generator=gen) * r**-0.5).to(device, dtype)
        table, n_segs = segment_table([0, r], [0.0], 16, device)
        seed = torch.zeros(1, dtype=torch.int64, device=device)
        out = torch.empty(m, n, dtype=dtype, device=device)
        args = (
            x,
            w,
            (w.stride(1), w.stride(0)),
            None,
            t,
            b,
            (b.stride(0), b.stride(1)),
            r,
            table,
            n_segs,
            seed,
            out,
            16,
            False,
            "ieee",
        )

        def launch(cfg: dict) -> torch.Tensor:
            if cfg.get("core") == "tma":
                launch_fused_gemm_tma(*args, cfg=cfg)
            else:
                launch_fused_gemm(*args)
            return out

        reference = x.double() @ w.double().T + t.double() @ b.double().T
        return TuneRun(launch=launch, reference=reference, atol=8e-3, shape=dict(M=m, K=k, N=n, R=r))

    return make


def tune_space() -> list:
    """Per shape class: the tutorial core (default) against the Hopper core at a few tilings. The tuner keeps a
    Hopper config only where it beats the tutorial core by kernels/tuned.TUNE_MARGIN on this GPU; that entry is
    what `selected_core` reads."""
    from fused_lora.kernels.tuned import TuneCase

    cases = []
    for M, quick in ((4096, True), (128, False)):
        default = dict(tma_config(M), core="tutorial")
        tilings = (
            [(128, 128, 64, 8, 4, 1), (128, 256, 64, 8, 3, 1), (128, 128, 64, 8, 3, 2)]
            if M > 256
            else [(64, 128, 64, 4, 4, 2), (64, 128, 64, 4, 3, 3), (64, 256, 64, 8, 3, 1)]
        )
        candidates = [
            dict(default, core="tma", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=s, CTAS_PER_SM=c)
            for bm, bn, bk, w, s, c in tilings
        ]
        candidates.append(dict(candidates[0], WARP_SPECIALIZE=True))
        cases.append(
            TuneCase(
                TUNED_KERNEL,
                _shape_class(M),
                default,
                candidates,
                _tune_make(M, 4096, 4096, 16),
                description=("quick: " if quick else "") + f"fused GEMM core, M={M} K=N=4096 r=16 bf16",
            )
        )
    return cases
