"""Decode forward (M <= 64): y = x W^T + bias + rank term, W streamed once by a launch that fills the GPU.

At small M the forward is bound by reading W. A grid of (column tiles x splits of K) programs streams it: the split
count (config.split_count) brings the launch to at least 2 programs per SM, spread evenly (at N = 1024, K = 4096:
32 column tiles of 32 x 12 splits = 384 programs instead of 16; decode_config picks the tile width). Each program
reduces its share of K into an fp32 partial of the valid cells only (M rows, not the BLOCK_M-row tile:
4 x N x M bytes per split); the last program of a column tile to arrive sums the partials in split order
(kernels/blocks.arrive_last: no float atomics, bit-reproducible), adds the bias, rounds y once and stores it. After
the K loop that program waits for the ticket, then reads the partials at about 4 splits per L2 round trip
(_sum_splits); everything else it needs (IN_PASS: B's tile, the scales) was loaded before the loop.

Swap-AB: every product is computed transposed, y^T = W x^T + B t^T, so W's BLOCK_N rows are the MMA's M
dimension and the few tokens its N. wgmma (sm_90) needs 64 rows per warpgroup; a 16-token tile in the M slot would
fall back to mma.sync, while in the N slot it costs nothing (wgmma N goes down to 8). 32-column tiles (decode_config)
take mma.sync on purpose: fewer splits matter more to a W-streaming kernel than the MMA's width.

Rank term (RANK_MODE):
    IN_PASS   dense, R <= IN_PASS_MAX_RANK: the shrink t^T += A x^T rides in the same K loop on the same x tile, so
              x and W are read once and no shrink launch exists. Each program computes its K share t_s of t for all
              ranks (A's share comes from L2: R / BLOCK_N of the W bytes) and, the rank term being linear in t, adds
              B (s * t_s) to its own partial of y (B's tile and the scales are loaded before the K loop). Column
              tile 0 alone keeps t's partials, reduced in split order and stored as t (the backward needs it).
              Rounding: the rank term is the sum over splits of B round(s * t_s), each t_s rounded to B's dtype
              (t itself is summed in fp32). With dropout the K loop holds a loop over the
              segments (one masked product each), which Triton's software pipeliner does not take: that variant
              (training at M <= 64) streams W without cp.async prefetch.
    DENSE_T   dense, wider ranks: t comes from the split shrink launched before (kernels/shrink.py).
    ROWS_T    per row: compact t from the per-row shrink, placed at each row's adapter ranks (blocks.rank_term).
    NONE      no rank term (every adapter has rank 0).

PDL consumer (USE_GDC; DENSE_T and ROWS_T after their shrink, sm_90 with FUSED_LORA_PDL=1, kernels/config.py):
launched with launch_pdl=True, the programs start while the shrink runs and stream their share of W and x; the
gdc_wait right after the K loop comes before every access to memory the shrink may have written or used (t, the
split partials, which may reuse the shrink's freed partial buffer, and the split counters).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fused_lora.kernels import config
from fused_lora.kernels.blocks import arrive_last, dot_k_range, rank_term, row_adapters, split_range
from fused_lora.kernels.philox import SEG_FIELDS, SEG_HI, SEG_INV_KEEP, SEG_LO, SEG_SALT, SEG_THRESHOLD, keep_mask_tile
from fused_lora.kernels.spec import PDL_CONSUMER_PTX, SPLIT_REDUCTION_PTX, KernelSpec

DECODE_M_MAX = 64
IN_PASS_MAX_RANK = 32  # beyond it, A's L2 re-reads (R / BLOCK_N of W's bytes per program) cost more than a launch

IN_PASS, DENSE_T, ROWS_T, NONE = 0, 1, 2, 3
MODE_NAMES = ("in_pass", "dense_t", "rows_t", "none")  # as codegen spec names spell them
_IN_PASS = tl.constexpr(IN_PASS)
_ROWS_T = tl.constexpr(ROWS_T)
_NONE = tl.constexpr(NONE)


@triton.jit
def decode_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    a_ptr,
    b_ptr,
    scale_ptr,
    table_ptr,
    row_ids_ptr,
    seed_ptr,
    y_ptr,
    t_ptr,
    part_y_ptr,
    part_t_ptr,
    counter_ptr,
    M,
    N,
    K,
    R,
    n_segs,
    n_adapters,
    n_splits,
    split_stride_y,
    split_stride_t,
    stride_xm,
    stride_xk,
    stride_ym,
    stride_tm,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    RANK_MODE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    PACKED: tl.constexpr,
    PRECISION: tl.constexpr,
    USE_GDC: tl.constexpr = False,
):
    pid_n = tl.program_id(0) // n_splits
    split = tl.program_id(0) % n_splits
    pid_m = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows = (pid_m * BLOCK_M + offs_m).to(tl.int64)
    cols = pid_n * BLOCK_N + offs_n
    # wrap out-of-range rows/cols onto valid ones: loads need no M/N mask, the final store masks them
    rows_in = rows % M
    cols_in = (cols % N).to(tl.int64)

    k_begin, k_end = split_range(split, n_splits, tl.cdiv(K, BLOCK_K), BLOCK_K)
    w_ptrs = w_ptr + cols_in[:, None] * K + (k_begin + offs_k)[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    if RANK_MODE == _IN_PASS:
        offs_t = tl.arange(0, BLOCK_R)
        t_ok = offs_t < R
        # issued before the K loop, in flight while W streams: the rank term adds no round trip after it
        bt = tl.load(b_ptr + cols_in[:, None] * R + offs_t[None, :], mask=t_ok[None, :], other=0.0)
        factor = tl.load(scale_ptr + offs_t, mask=t_ok, other=0.0)
        if HAS_DROPOUT:
            for s in range(n_segs):
                seg = table_ptr + s * SEG_FIELDS
                in_seg = (offs_t >= tl.load(seg + SEG_LO)) & (offs_t < tl.load(seg + SEG_HI))
                factor = tl.where(in_seg, factor * tl.load(seg + SEG_INV_KEEP).to(tl.float32, bitcast=True), factor)
        x_ptrs = x_ptr + rows_in[:, None] * stride_xm + (k_begin + offs_k).to(tl.int64)[None, :] * stride_xk
        a_ptrs = a_ptr + offs_t.to(tl.int64)[:, None] * K + (k_begin + offs_k)[None, :]
        t_acc = tl.zeros((BLOCK_R, BLOCK_M), dtype=tl.float32)  # t^T of every rank, this split's share of K
        if HAS_DROPOUT:
            seed = tl.load(seed_ptr)
            row_elem = rows_in * K
        for k0 in range(k_begin, k_end, BLOCK_K):
            k_ok = offs_k < K - k0
            xt = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
            wt = tl.load(w_ptrs, mask=k_ok[None, :], other=0.0)
            acc = tl.dot(wt, tl.trans(xt), acc, input_precision=PRECISION)
            at = tl.load(a_ptrs, mask=t_ok[:, None] & k_ok[None, :], other=0.0)
            if HAS_DROPOUT:
                # one masked product per segment: its ranks only, its adapter's mask on x
                for s in range(n_segs):
                    seg = table_ptr + s * SEG_FIELDS
                    in_seg = (offs_t >= tl.load(seg + SEG_LO)) & (offs_t < tl.load(seg + SEG_HI))
                    threshold = tl.load(seg + SEG_THRESHOLD)
                    xs = xt
                    if threshold > 0:
                        zero = tl.zeros((BLOCK_M,), tl.int32)
                        keep = keep_mask_tile(
                            seed, row_elem, k0, zero + tl.load(seg + SEG_SALT), zero + threshold, BLOCK_K, PACKED
                        )
                        xs = tl.where(keep, xt, 0.0)
                    t_acc = tl.dot(
                        tl.where(in_seg[:, None], at, 0.0), tl.trans(xs.to(at.dtype)), t_acc, input_precision=PRECISION
                    )
            else:
                t_acc = tl.dot(at, tl.trans(xt.to(at.dtype)), t_acc, input_precision=PRECISION)
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K
            a_ptrs += BLOCK_K
    else:
        xt_ptrs = x_ptr + rows_in[None, :] * stride_xm + (k_begin + offs_k).to(tl.int64)[:, None] * stride_xk
        acc = dot_k_range(
            acc,
            w_ptrs,
            xt_ptrs,
            None,
            None,
            k_begin,
            k_end,
            K,
            1,
            stride_xk,
            None,
            None,
            None,
            None,
            False,
            False,
            BLOCK_K,
            PRECISION,
        )

    if RANK_MODE == _IN_PASS:
        # the rank term is linear in t: each split adds B (factor * t_s) to its own partial of y, so the reduction
        # below sums y alone, and only column tile 0 (which stores t) keeps t's partials
        t_acc = t_acc * factor[:, None]
        acc = tl.dot(bt, t_acc.to(bt.dtype), acc, input_precision=PRECISION)
    if USE_GDC:  # PDL consumer: W is streamed; from here on t, partials and counters may be the shrink's
        tl.extra.cuda.gdc_wait()
    out_ok = (cols < N)[:, None] & (rows < M)[None, :]
    last = n_splits == 1
    if n_splits > 1:  # split reduction (blocks.arrive_last); partials hold the valid rows and columns only
        part_y = part_y_ptr + cols.to(tl.int64)[:, None] * M + rows[None, :]
        tl.store(part_y + split.to(tl.int64) * split_stride_y, acc, mask=out_ok)
        if RANK_MODE == _IN_PASS:
            t_part_ok = t_ok[:, None] & (rows < M)[None, :]
            part_t = part_t_ptr + offs_t.to(tl.int64)[:, None] * M + rows[None, :]
            if pid_n == 0:
                tl.store(part_t + split.to(tl.int64) * split_stride_t, t_acc, mask=t_part_ok)
        last = arrive_last(counter_ptr + pid_m * tl.cdiv(N, BLOCK_N) + pid_n, n_splits)
        if last:
            if RANK_MODE == _IN_PASS:  # t's partials (column tile 0) in the same loop: no second chain of trips
                t_rows = M * (pid_n == 0).to(tl.int32)  # column tile 0 alone kept t's partials
                t_sum_ok = t_ok[:, None] & (rows < t_rows)[None, :]
                acc, t_acc = _sum_splits(
                    part_y, out_ok, split_stride_y, part_t, t_sum_ok, split_stride_t, n_splits, True
                )
            else:
                acc, _ = _sum_splits(part_y, out_ok, split_stride_y, part_y, out_ok, 0, n_splits, False)
    if last:
        if RANK_MODE == _IN_PASS:
            if pid_n == 0:
                tl.store(
                    t_ptr + rows[None, :] * stride_tm + offs_t[:, None], t_acc, mask=t_ok[:, None] & (rows < M)[None, :]
                )
        elif RANK_MODE == _ROWS_T:
            row_ok = rows < M
            _, _, row_lo, row_hi = row_adapters(row_ids_ptr, rows, row_ok, n_adapters, table_ptr)
            acc = rank_term(
                acc,
                t_ptr,
                stride_tm,
                b_ptr,
                1,
                R,
                rows,
                row_ok,
                cols_in,
                None,
                0,
                R,
                row_lo,
                row_hi,
                True,
                True,
                BLOCK_R,
                PRECISION,
            )
        elif RANK_MODE != _NONE:
            acc = rank_term(
                acc,
                t_ptr,
                stride_tm,
                b_ptr,
                1,
                R,
                rows_in,
                None,
                cols_in,
                None,
                0,
                R,
                None,
                None,
                False,
                True,
                BLOCK_R,
                PRECISION,
            )
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols_in).to(tl.float32)[:, None]
        y_ptrs = y_ptr + rows[None, :] * stride_ym + cols[:, None]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def _sum_splits(y_ptrs, y_ok, y_stride, t_ptrs, t_ok, t_stride, n_splits, WITH_T: tl.constexpr):
    """(y, t): the sums over s = 0, 1, ..., n_splits - 1 (in that order) of the fp32 partials at y_ptrs + s * y_stride
    and (WITH_T) t_ptrs + s * t_stride, loading only the cells in y_ok / t_ok (a partial holds the valid rows and
    columns, no tile padding).

    The loads depend on no add, but a warp issues in order: ptxas unrolls this loop 4 times and issues 4 splits'
    loads before their adds (sm_90 SASS of the in_pass spec), so the last program waits about one L2 round trip per
    4 splits (launch_plan.PARTIALS_PER_TRIP). Issuing 8 splits' loads before the adds did not survive ptxas: under
    register pressure it moved a third of each batch behind the adds (a second trip per batch)."""
    y = tl.load(y_ptrs, mask=y_ok, other=0.0)
    t = tl.zeros(t_ok.shape, tl.float32)
    if WITH_T:
        t = tl.load(t_ptrs, mask=t_ok, other=0.0)
    for _ in range(1, n_splits):
        y_ptrs += y_stride  # pointer steps, not s * stride: no 32-bit product
        y += tl.load(y_ptrs, mask=y_ok, other=0.0)
        if WITH_T:
            t_ptrs += t_stride
            t += tl.load(t_ptrs, mask=t_ok, other=0.0)
    return y, t


def rank_mode(per_row: bool, R: int, n_segs: int) -> int:
    if R == 0 or n_segs == 0:
        return NONE
    if per_row:
        return ROWS_T
    return IN_PASS if R <= IN_PASS_MAX_RANK else DENSE_T


def decode_config(M: int, dtype_bytes: int, mode: int, has_dropout: bool, device=None, N: int | None = None) -> dict:
    """Static tile table (tuned store over it). BLOCK_N = 64: the MMA's M dimension after the swap, the smallest
    wgmma tile; 32 for M <= 16 where 64-column tiles are fewer than config.target_programs (N < 16896 on an H100,
    N given): twice the column tiles need fewer splits of K (N = 1024: 12 instead of 23; N = 14336: none instead
    of 4), and a split's partials cost the last program L2 round trips after the W stream (_sum_splits). The
    32-row products run on mma.sync instead of wgmma, which a kernel streaming W at 16 tokens does not miss; x and
    A are re-read from L2 once per column tile (twice as often). BLOCK_K shrinks where a dropout mask or 4-byte
    operands would otherwise spill."""
    in_pass_dropout = has_dropout and mode == IN_PASS
    block_m = 16 if M <= 16 else 64
    if block_m == 16:
        block_k = 64 if (dtype_bytes == 4 or in_pass_dropout) else 128
    else:  # 64 token rows: with 4 warps, the dropout mask beside two accumulators spilled on sm_80 and sm_90
        block_k = 32 if (dtype_bytes == 4 or in_pass_dropout) else 64
    block_n = 64
    programs = config.target_programs(device) if device is not None else config.PROGRAMS_PER_SM * config.H100_SMS
    # (not beside an in-pass dropout mask: with 32-rank tiles that variant spilled on sm_90)
    if N is not None and block_m == 16 and not in_pass_dropout and triton.cdiv(N, 64) < programs:
        block_n = 32
    # 3 stages: a split program runs few K steps, and 3 x (W + x + A tiles) lets 3 programs share an SM
    default = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4 if block_m == 16 else 8, num_stages=3)
    shape_class = f"{dtype_bytes * 8}bit:M<={block_m}:mode={mode}:dropout={in_pass_dropout}"
    if block_n != 64:
        shape_class += f":BN={block_n}"
    return config.tuned("decode", shape_class, default, device)


def rank_block(mode: int, R: int) -> int:
    """IN_PASS holds every rank in one tile (16 or 32); the other modes loop over chunks of 16."""
    if mode == IN_PASS:
        return 16 if R <= 16 else 32
    return 16


def decode_grid(M: int, N: int, K: int, cfg: dict, device) -> tuple:
    """((column tiles x splits, row tiles), splits): splits of K bring the launch to config.target_programs."""
    tiles_n = triton.cdiv(N, cfg["BLOCK_N"])
    tiles_m = triton.cdiv(M, cfg["BLOCK_M"])
    splits = config.split_count(tiles_n * tiles_m, triton.cdiv(K, cfg["BLOCK_K"]), device)
    return (tiles_n * splits, tiles_m), splits


def partial_strides(M: int, N: int, R: int, mode: int) -> tuple:
    """Elements of one split's partials: y's [N, M] (every column tile, valid cells only) and, IN_PASS, t's [R, M]
    (column tile 0 only: the other tiles fold their share of the rank term into y's partial)."""
    return N * M, (R * M if mode == IN_PASS else 0)


def pdl_consumer(mode: int, after_shrink: bool) -> bool:
    """Whether a decode launch overlaps its producer where PDL is enabled (config.pdl_enabled): only when it reads
    t and the launch just before it on the stream is the shrink that writes t."""
    return after_shrink and mode in (DENSE_T, ROWS_T)


def launch_decode(
    x,
    weight,
    bias,
    lora_a,
    lora_b,
    scale,
    table,
    n_segs,
    seed,
    y,
    t,
    has_dropout,
    precision,
    *,
    row_ids=None,
    n_adapters=0,
    after_shrink=False,
):
    """y (and t for IN_PASS) of the decode forward. Dense: `table` is the segment table; t is [M, R], written here
    (IN_PASS) or already holding the shrink (wider ranks). Per row (row_ids given): `table` is the adapter table and
    t the compact per-row shrink. M > 0, N > 0. after_shrink: the caller launched the shrink writing t right before
    (on this stream, nothing launched in between but allocations): then this launch may overlap it (PDL)."""
    M, K = x.shape
    N = weight.shape[0]
    R = lora_a.shape[0]
    per_row = row_ids is not None
    mode = rank_mode(per_row, R, n_segs)
    cfg = decode_config(M, x.element_size(), mode, has_dropout, x.device, N)
    block_r = rank_block(mode, R)
    grid, splits = decode_grid(M, N, K, cfg, x.device)
    tiles = grid[1] * triton.cdiv(N, cfg["BLOCK_N"])
    stride_y, stride_t = partial_strides(M, N, R, mode)
    # without a split the partials and counters are never touched: t and table stand in for them
    part_y = x.new_empty((splits * stride_y,), dtype=torch.float32) if splits > 1 else t
    part_t = x.new_empty((splits * stride_t,), dtype=torch.float32) if splits > 1 and stride_t else part_y
    counters = config.split_counters(x.device, tiles) if splits > 1 else table
    pdl = pdl_consumer(mode, after_shrink) and config.pdl_enabled(x.device)
    decode_kernel[grid](
        x,
        weight,
        bias if bias is not None else y,
        lora_a,
        lora_b,
        scale,
        table,
        row_ids if per_row else table,
        seed,
        y,
        t,
        part_y,
        part_t,
        counters,
        M,
        N,
        K,
        R,
        n_segs,
        n_adapters,
        splits,
        stride_y,
        stride_t,
        x.stride(0),
        x.stride(1),
        y.stride(0),
        t.stride(0),
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"],
        BLOCK_R=block_r,
        RANK_MODE=mode,
        HAS_BIAS=bias is not None,
        HAS_DROPOUT=has_dropout and mode == IN_PASS,
        PACKED=has_dropout and K % 4 == 0,
        PRECISION=precision,
        USE_GDC=pdl,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
        **config.pdl_launch(pdl),
    )


def _spec(
    dt: str, M: int, mode: int, R: int, dropout: bool, packed: bool, bias: bool, gdc: bool, N: int | None = None
) -> KernelSpec:
    cfg = decode_config(M, 2, mode, dropout, N=N)
    block_r = rank_block(mode, R)
    sig = {
        "x_ptr": f"*{dt}",
        "w_ptr": f"*{dt}",
        "bias_ptr": f"*{dt}",
        "a_ptr": f"*{dt}",
        "b_ptr": f"*{dt}",
        "scale_ptr": "*fp32",
        "table_ptr": "*i32",
        "row_ids_ptr": "*i64",
        "seed_ptr": "*i64",
        "y_ptr": f"*{dt}",
        "t_ptr": "*fp32",
        "part_y_ptr": "*fp32",
        "part_t_ptr": "*fp32",
        "counter_ptr": "*i32",
        "M": "i32",
        "N": "i32",
        "K": "i32",
        "R": "i32",
        "n_segs": "i32",
        "n_adapters": "i32",
        "n_splits": "i32",
        "split_stride_y": "i32",
        "split_stride_t": "i32",
        "stride_xm": "i32",
        "stride_xk": "constexpr",
        "stride_ym": "i32",
        "stride_tm": "i32",
    }
    const = dict(
        stride_xk=1,
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"],
        BLOCK_R=block_r,
        RANK_MODE=mode,
        HAS_BIAS=bias,
        HAS_DROPOUT=dropout,
        PACKED=packed,
        PRECISION="ieee",
        USE_GDC=gdc,
    )
    sig.update({n: "constexpr" for n in const if n != "stride_xk"})
    mode_name = MODE_NAMES[mode]
    extra = {"ptx_patterns": {**SPLIT_REDUCTION_PTX, **(PDL_CONSUMER_PTX if gdc else {})}}
    if gdc:  # programmatic dependent launch exists from sm_90 on
        extra["arches"] = [90]
    if cfg["BLOCK_N"] < 64:  # fewer than 64 W rows per warpgroup: no wgmma, mma.sync on sm_90 too
        extra["sm90_mma"] = "HMMA"
    return KernelSpec(
        name=(
            f"decode[{mode_name},BM={cfg['BLOCK_M']},BN={cfg['BLOCK_N']},BK={cfg['BLOCK_K']},"
            f"BR={block_r},bias={bias},dropout={dropout},packed={packed},{dt}{',gdc' if gdc else ''}]"
        ),
        fn=decode_kernel,
        signature=sig,
        constexprs=const,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
        extra=extra,
    )


def codegen_specs() -> list[KernelSpec]:
    specs = []
    # (mode, dropout, packed, bias): IN_PASS in every mask variant and both rank tiles, the t-reading modes once;
    # bias is one more load in the epilogue, compiled beside the heaviest variants
    variants = [
        (IN_PASS, False, False, True),
        (IN_PASS, True, True, True),
        (IN_PASS, True, False, False),
        (DENSE_T, False, False, True),
        (ROWS_T, False, False, True),
        (NONE, False, False, False),
    ]
    # (M, N): 64-column tiles at M = 1 (N >= 16896) and M = 64, 32-column tiles at M = 1 (smaller N)
    for dt in ("fp16", "bf16"):
        for M, N in ((1, None), (64, None), (1, 1024)):
            for mode, dropout, packed, bias in variants:
                if dropout and N is not None:  # in-pass dropout keeps 64-column tiles (decode_config)
                    continue
                for R in (16, 32) if mode == IN_PASS else (16,):
                    specs.append(_spec(dt, M, mode, R, dropout, packed, bias, False, N))
            # the t-reading modes as PDL consumers (sm_90 only)
            for mode in (DENSE_T, ROWS_T):
                specs.append(_spec(dt, M, mode, 16, False, False, True, True, N))
    return specs
