"""Fused GEMM: out = a @ b + bias + (rank term), the rank term summed into the same fp32 accumulator.

Forward:  a = x [M, K], b = W^T (strides of W), rank term = t @ B^T                    -> y, rounded once.
Backward: a = dY [M, N], b = W,                  rank term = drop'(dS @ A) per adapter -> dX.
One fp32 accumulator, output written once. Without dropout on the rank term (the forward, and dX without dropout)
the K loop (blocks.dot_k_range) runs first and the rank term (blocks.rank_term) is added after it, in the
epilogue: the K loop then reads nothing the shrink wrote, which is what lets the launch overlap the shrink (PDL,
below); the order is the same with PDL on or off, so results do not depend on the switch. With dropout (dX only)
the rank term fills the accumulator first, because the masks apply to it alone.
    dense:   every row takes every rank; with dropout (dX only) each segment's product gets its own mask
             (the mask of dX element (m, n) is the forward mask of x[m, n]: dX has x's shape).
    PER_ROW: row m takes only its adapter's ranks (compact t / dS placed at them), and with dropout its own
             adapter's mask. The row tiles are plain tiles of rows in their order, whatever adapters they mix,
             so W is read once per row tile, exactly as for one adapter (Punica/BGMV-style rank term).

PDL consumer (USE_GDC; the forward after its shrink, sm_90 with FUSED_LORA_PDL=1, kernels/config.py): launched with
launch_pdl=True, the programs start while the shrink runs; gdc_wait after the K loop, before the rank term's first
read of t (and of the adapter table), waits for the shrink's completion and memory flush. Never with dropout.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fused_lora.kernels import config
from fused_lora.kernels.blocks import dot_k_range, grouped_tile, rank_term, row_adapters, row_dropout
from fused_lora.kernels.philox import SEG_FIELDS, SEG_HI, SEG_INV_KEEP, SEG_LO, SEG_SALT, SEG_THRESHOLD, keep_mask_tile
from fused_lora.kernels.spec import PDL_CONSUMER_PTX, KernelSpec


@triton.jit
def fused_gemm_kernel(
    a_ptr,
    b_ptr,
    bias_ptr,
    lt_ptr,
    lr_ptr,
    table_ptr,
    row_ids_ptr,
    seed_ptr,
    out_ptr,
    M,
    N,
    K,
    R,
    n_segs,
    n_adapters,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_ltm,
    stride_lrn,
    stride_lrr,
    stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_LORA: tl.constexpr,
    LORA_DROPOUT: tl.constexpr,
    PER_ROW: tl.constexpr,
    PACKED: tl.constexpr,
    PRECISION: tl.constexpr,
    USE_GDC: tl.constexpr = False,
):
    tl.static_assert(not (USE_GDC and LORA_DROPOUT), "a PDL consumer adds its rank term after the K loop")
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # wrap out-of-range rows/cols onto valid ones: loads need no M/N mask, the store masks them
    rows_in = rows % M
    cols_in = (cols % N).to(tl.int64)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_LORA and LORA_DROPOUT:  # dX: the masks apply to the rank term alone, so it fills the accumulator first
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
            salt, threshold, inv_keep = row_dropout(has, entry)
            if tl.max(threshold, 0) > 0:
                keep = keep_mask_tile(tl.load(seed_ptr), rows_in * N, pid_n * BLOCK_N, salt, threshold, BLOCK_N, PACKED)
                acc = tl.where(keep, acc * inv_keep[:, None], 0.0)
        else:
            seed = tl.load(seed_ptr)
            zero = tl.zeros((BLOCK_M,), tl.int32)
            for s in range(n_segs):
                seg = table_ptr + s * SEG_FIELDS
                part = rank_term(
                    tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32),
                    lt_ptr,
                    stride_ltm,
                    lr_ptr,
                    stride_lrr,
                    stride_lrn,
                    rows_in,
                    None,
                    cols_in,
                    None,
                    tl.load(seg + SEG_LO),
                    tl.load(seg + SEG_HI),
                    None,
                    None,
                    False,
                    False,
                    BLOCK_R,
                    PRECISION,
                )
                threshold = tl.load(seg + SEG_THRESHOLD)
                if threshold > 0:
                    keep = keep_mask_tile(
                        seed,
                        rows_in * N,
                        pid_n * BLOCK_N,
                        zero + tl.load(seg + SEG_SALT),
                        zero + threshold,
                        BLOCK_N,
                        PACKED,
                    )
                    part = tl.where(keep, part * tl.load(seg + SEG_INV_KEEP).to(tl.float32, bitcast=True), 0.0)
                acc += part

    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    a_ptrs = a_ptr + rows_in[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + cols_in[None, :] * stride_bn
    acc = dot_k_range(
        acc,
        a_ptrs,
        b_ptrs,
        None,
        None,
        0,
        K,
        K,
        stride_ak,
        stride_bk,
        None,
        None,
        None,
        None,
        False,
        False,
        BLOCK_K,
        PRECISION,
    )

    if USE_GDC:  # PDL consumer: the K loop read only a and b; t (lt) is the shrink's, read from here on
        tl.extra.cuda.gdc_wait()
    if HAS_LORA and not LORA_DROPOUT:  # the rank term on top of the base product, same fp32 accumulator
        if PER_ROW:
            row_ok = rows < M
            _, _, row_lo, row_hi = row_adapters(row_ids_ptr, rows, row_ok, n_adapters, table_ptr)
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

    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols_in).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(rows < M)[:, None] & (cols < N)[None, :])


# rank chunk of the rank term when it goes into the accumulator (no dropout, or per row): 16 keeps the extra
# operand tiles small enough that 128 x 128 tiles do not spill on sm_80; wider ranks simply loop
RANK_CHUNK = 16


def gemm_config(M: int, dtype_bytes: int, lora_dropout: bool, packed: bool = True, device=None) -> dict:
    """Static tile table by shape and dtype (tuned store over it). Kept small: codegen compiles every entry."""
    if dtype_bytes == 4:  # fp32 (tf32 or ieee): smaller tiles keep the FMA fallback from spilling
        default, shape_class = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3), "32bit"
    elif lora_dropout and not packed:  # one Philox call per element (row length % 4 != 0): a smaller tile
        default = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
        shape_class = "16bit:dropout:unpacked"
    elif lora_dropout:  # dX with a masked rank term: Philox states beside the accumulator need the room
        default = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
        shape_class = "16bit:dropout"
    elif M > 256:
        default, shape_class = (
            dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
            "16bit:M>256",
        )
    else:
        # 8 warps, not 4: dX reads W along its rows (a transposed B operand) and with 4 warps the 64 x 128
        # accumulator plus the rank-term operands spilled on sm_80; at M <= 256 there are few programs per SM,
        # so the extra warps also hide more load latency
        default, shape_class = (
            dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
            "16bit:M<=256",
        )
    return config.tuned("fused_gemm", shape_class, default, device)


def gemm_grid(M: int, N: int, cfg: dict) -> tuple:
    return (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)


def pdl_consumer(after_shrink: bool, has_lora: bool, lora_dropout: bool) -> bool:
    """Whether a fused GEMM launch overlaps its producer where PDL is enabled (config.pdl_enabled): the forward
    right after the shrink that writes its t (dX, whose dS comes from launches further back, never does)."""
    return after_shrink and has_lora and not lora_dropout


def launch_fused_gemm(
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
    """out[M, N] = a[M, K] @ b + bias + rank term; b given as (tensor, (stride_k, stride_n)), the rank term's right
    operand lr (R stacked ranks) as (tensor, (stride_n, stride_r)). Dense: `table` is the segment table (read with
    dropout). Per row (row_ids given): `table` is the adapter table and lt is compact. M > 0. after_shrink: the
    caller launched the shrink writing lt right before (same stream, nothing launched in between): then this launch
    may overlap it (PDL, kernels/config.py)."""
    M, K = a.shape
    N = out.shape[1]
    per_row = row_ids is not None
    has_lora = lt is not None and R > 0 and (per_row or n_segs > 0)
    lora_dropout = bool(lora_dropout and has_lora)
    packed = lora_dropout and N % 4 == 0
    cfg = gemm_config(M, a.element_size(), lora_dropout, packed, a.device)
    R = R if has_lora else 0
    lt_arg = lt if has_lora else out
    lr_arg = lr if has_lora else b
    pdl = pdl_consumer(after_shrink, has_lora, lora_dropout) and config.pdl_enabled(a.device)
    fused_gemm_kernel[gemm_grid(M, N, cfg)](
        a,
        b,
        bias if bias is not None else out,
        lt_arg,
        lr_arg,
        table,
        row_ids if per_row else table,
        seed,
        out,
        M,
        N,
        K,
        R,
        n_segs,
        n_adapters,
        a.stride(0),
        a.stride(1),
        b_strides[0],
        b_strides[1],
        lt_arg.stride(0) if has_lora else 0,
        lr_strides[0],
        lr_strides[1],
        out.stride(0),
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"],
        BLOCK_R=block_r if (lora_dropout and not per_row) else RANK_CHUNK,
        GROUP_M=cfg["GROUP_M"],
        HAS_BIAS=bias is not None,
        HAS_LORA=has_lora,
        LORA_DROPOUT=lora_dropout,
        PER_ROW=per_row,
        PACKED=packed,
        PRECISION=precision,
        USE_GDC=pdl,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
        **config.pdl_launch(pdl),
    )


def _spec(dt, M, block_r, backward, dropout, packed, has_bias, per_row=False, gdc=False):
    cfg = gemm_config(M, 2, dropout, packed)
    sig = {
        "a_ptr": f"*{dt}",
        "b_ptr": f"*{dt}",
        "bias_ptr": f"*{dt}",
        "lt_ptr": "*fp32",
        "lr_ptr": f"*{dt}",
        "table_ptr": "*i32",
        "row_ids_ptr": "*i64" if per_row else "*i32",
        "seed_ptr": "*i64",
        "out_ptr": f"*{dt}",
        "M": "i32",
        "N": "i32",
        "K": "i32",
        "R": "i32",
        "n_segs": "i32",
        "n_adapters": "i32",
        "stride_am": "i32",
        "stride_ak": "constexpr",
        "stride_bk": "i32",
        "stride_bn": "constexpr",
        "stride_ltm": "i32",
        "stride_lrn": "i32",
        "stride_lrr": "constexpr",
        "stride_om": "i32",
    }
    const = {"stride_ak": 1}
    if backward:  # b = W read along its rows; lr = A: Rm[r, k] = A[r, k], columns contiguous
        sig["stride_bk"], sig["stride_bn"] = "i32", "constexpr"
        sig["stride_lrn"], sig["stride_lrr"] = "constexpr", "i32"
        const.update(stride_bn=1, stride_lrn=1)
    else:  # b = W^T; lr = B^T: Rm[r, n] = B[n, r], ranks contiguous
        sig["stride_bk"], sig["stride_bn"] = "constexpr", "i32"
        const.update(stride_bk=1, stride_lrr=1)
    block_r = block_r if (dropout and not per_row) else RANK_CHUNK
    flags = dict(
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"],
        BLOCK_R=block_r,
        GROUP_M=cfg["GROUP_M"],
        HAS_BIAS=has_bias,
        HAS_LORA=True,
        LORA_DROPOUT=dropout,
        PER_ROW=per_row,
        PACKED=packed,
        PRECISION="ieee",
        USE_GDC=gdc,
    )
    sig.update({n: "constexpr" for n in flags})
    const.update(flags)
    name = (
        f"fused_gemm[{'dx' if backward else 'y'},{'rows' if per_row else 'dense'},BM={cfg['BLOCK_M']},"
        f"BN={cfg['BLOCK_N']},BK={cfg['BLOCK_K']},BR={block_r},bias={has_bias},dropout={dropout},"
        f"packed={packed},{dt}{',gdc' if gdc else ''}]"
    )
    # a PDL consumer (programmatic dependent launch exists from sm_90 on) must wait between its loop and rank term
    extra = {"arches": [90], "ptx_patterns": PDL_CONSUMER_PTX} if gdc else {}
    return KernelSpec(
        name=name,
        fn=fused_gemm_kernel,
        signature=sig,
        constexprs=const,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
        extra=extra,
    )


def codegen_specs() -> list[KernelSpec]:
    specs = []
    for dt in ("fp16", "bf16"):
        for M in (4096, 128):
            for per_row in (False, True):
                # per row, bias (one more load in the epilogue) is compiled beside the heavier rank term only
                for has_bias in (False, True) if not per_row else (True,):
                    specs.append(_spec(dt, M, RANK_CHUNK, False, False, False, has_bias, per_row))
                specs.append(_spec(dt, M, RANK_CHUNK, True, False, False, False, per_row))
                # the forward as a PDL consumer of its shrink (sm_90 only)
                specs.append(_spec(dt, M, RANK_CHUNK, False, False, False, True, per_row, gdc=True))
        for packed in (True, False):
            for block_r in (16, 64):
                specs.append(_spec(dt, 4096, block_r, True, True, packed, False))
            specs.append(_spec(dt, 4096, RANK_CHUNK, True, True, packed, False, per_row=True))
    return specs
