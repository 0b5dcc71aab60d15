"""What the Triton launchers WOULD launch for an op and a shape, without running anything: grids, configs and the
elements each launch loads and writes, computed by the launchers' own config, grid and split functions, so a plan
cannot drift from the launches (tests/test_kernel_counts.py checks plan == interpreter counts on small shapes).
Counts only: no seconds and no bandwidths here. The one timing model is fused_lora/perf (it reads these plans).

    plan(op, shape, *, path=None, device=None, pdl=None) -> list[Launch]   the launchers of today
    plan_before(op, shape) -> list[Launch]                            main at dd3ed58, before issue 13 (a frozen
                                                                      copy of that code's config/grid logic, checked
                                                                      against interpreter counts of that code)
    REGIMES, counts_table()                                           issue 13's regimes and their counts
    op     "forward" | "backward" (dense lora_fwd / lora_bwd with need_dx) | "rows_forward" | "rows_backward"
    shape  Shape(M, N, K, ranks, dtype="bfloat16", dropout=0.0, row_ids=None, bias=False)
           ranks: one rank per adapter (stacked on the rank axis); dropout: one p for all or one per adapter;
           row_ids (rows ops): the adapter of each row (-1 or out of range: none); None = every row adapter 0.
           interleaved(M, n) and single(M) build the usual distributions.
    device None plans for an H100 (132 SMs; config.H100_SMS); a CUDA device plans for that GPU (SM count and
           its tuned configs, kernels/tuned.py).
    pdl    None: what the launchers do on `device` (config.pdl_enabled: off unless a CUDA sm_90+ device and
           FUSED_LORA_PDL=1); True/False: plan as if programmatic dependent launch were on/off. A consumer launch
           that overlaps the launch before it has Launch.pdl True.

Launch (one kernel launch):
    kernel    the @triton.jit function's name (what the interpreter and profilers show)
    grid      (x, y, z); programs = product
    config    the tile config the launcher picks (BLOCK_*, num_warps, num_stages; splits where it splits)
    loads     {tensor: elements loaded}, repeats included: every element each program loads (the L2 -> SM
              traffic). Exact, as the interpreter counts masked-in elements, for x, w, a, b, t, dy, ds.
              Tensors: x w bias a b scale t dy ds part (fp32 split partials).
    writes    {tensor: elements stored}, partials included
    flops     tensor-core work, 2 per multiply-add, tile padding included (what the MMA units execute)
    hbm_bytes compulsory DRAM traffic: each tensor's distinct bytes read once, plus every byte written
    l2_bytes  bytes of `loads` plus bytes of `writes`
    step_bytes, steps   operand bytes one program loads per pipelined K step, and the steps of the longest program
    tail_latencies      dependent memory round trips a program makes after its K loop that a plain GEMM does not
                        make (the split ticket, the partials, t and B of the rank term), and tail_bytes: the bytes
                        moved from the end of the K loop on (partials, t, B, bias, the output)
    pdl       launched with launch_pdl=True: it starts while the launch before it (its shrink) runs and waits for it
              (gdc_wait) right after its K loop, so everything in its tail comes after the producer's completion
Element sizes: x w bias a b y dy dx da db in the shape's dtype; t ds part scale in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import triton

from fused_lora.kernels import config, decode, dense, fused_gemm
from fused_lora.kernels.decode import DENSE_T, IN_PASS, NONE, ROWS_T, decode_config, decode_grid, rank_block, rank_mode
from fused_lora.kernels.fused_gemm import RANK_CHUNK, gemm_config, gemm_grid
from fused_lora.kernels.lora_backward import da_config, db_config, ds_config, rank_chunk, split_grid
from fused_lora.kernels.philox import segment_rows
from fused_lora.kernels.rows import rank_max
from fused_lora.kernels.shrink import per_row_block_r, shrink_config, shrink_grid

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
_FP32_TENSORS = ("t", "ds", "part", "scale")


@dataclass(frozen=True)
class Shape:
    M: int
    N: int
    K: int
    ranks: Sequence[int]
    dtype: str = "bfloat16"
    dropout: object = 0.0  # float for every adapter, or one per adapter
    row_ids: Optional[Sequence[int]] = None
    bias: bool = False

    @property
    def rank_ptr(self) -> list:
        ptr = [0]
        for r in self.ranks:
            ptr.append(ptr[-1] + int(r))
        return ptr

    @property
    def R(self) -> int:
        return sum(int(r) for r in self.ranks)

    @property
    def dropout_p(self) -> list:
        if isinstance(self.dropout, (int, float)):
            return [float(self.dropout)] * len(self.ranks)
        return [float(p) for p in self.dropout]

    @property
    def e(self) -> int:
        return DTYPE_BYTES[self.dtype]

    def adapter_of(self, m: int) -> int:
        """Row m's adapter, -1 for none (rows ops)."""
        a = 0 if self.row_ids is None else int(self.row_ids[m])
        return a if 0 <= a < len(self.ranks) else -1


def interleaved(M: int, n: int) -> list:
    """Row m takes adapter m % n: every tile mixes all n adapters (the worst case for grouping by adapter)."""
    return [m % n for m in range(M)]


def single(M: int) -> list:
    return [0] * M


@dataclass
class Launch:
    kernel: str
    grid: tuple
    config: dict
    loads: dict = field(default_factory=dict)
    writes: dict = field(default_factory=dict)
    flops: float = 0.0
    hbm_bytes: float = 0.0
    note: str = ""
    step_bytes: int = 0  # operand bytes one program loads per pipelined step (what stays in flight)
    steps: int = 0  # pipelined steps of the longest program
    pdl: bool = False  # overlaps the launch before it (programmatic dependent launch)
    tail_bytes: float = 0.0  # bytes moved after the K loop (partials, t, B, bias, output)
    tail_latencies: int = 0  # dependent round trips after the K loop that a plain GEMM does not make

    @property
    def programs(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    def elem_bytes(self, tensor: str, e: int) -> int:
        return 4 if tensor in _FP32_TENSORS else e

    def l2_bytes(self, e: int) -> float:
        return sum(v * self.elem_bytes(k, e) for k, v in self.loads.items()) + sum(
            v * self.elem_bytes(k, e) for k, v in self.writes.items()
        )


def _launch(
    kernel, grid, cfg, shape: Shape, loads, writes, flops, reads_distinct, note="", step_bytes=0, steps=0
) -> Launch:
    """reads_distinct: {tensor: distinct elements read}; writes count fully towards DRAM."""
    grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
    e = shape.e
    launch = Launch(
        kernel,
        grid,
        dict(cfg),
        {k: int(v) for k, v in loads.items() if v},
        {k: int(v) for k, v in writes.items() if v},
        float(flops),
        0.0,
        note,
        int(step_bytes),
        int(steps),
    )
    launch.hbm_bytes = float(
        sum(v * launch.elem_bytes(k, e) for k, v in reads_distinct.items())
        + sum(v * launch.elem_bytes(k, e) for k, v in launch.writes.items())
    )
    return launch


def _rows_of_tile(shape: Shape, tile: int, block_m: int) -> range:
    return range(tile * block_m, min(shape.M, (tile + 1) * block_m))


def _row_ranks(shape: Shape, m: int) -> tuple:
    a = shape.adapter_of(m)
    if a < 0:
        return 0, 0
    ptr = shape.rank_ptr
    return ptr[a], ptr[a + 1]


def _touched_chunks(shape: Shape, rows, block_r: int) -> list:
    """Stacked-rank chunks [c0, c0 + block_r) that some row of `rows` uses (per-row kernels visit only these)."""
    used = set()
    for m in rows:
        lo, hi = _row_ranks(shape, m)
        for c in range(lo // block_r, triton.cdiv(hi, block_r)):
            used.add(c)
    return sorted(used)


def _used_ranks(shape: Shape, rows) -> int:
    """Elements of a compact per-row operand loaded for `rows`: each row its own rank."""
    return sum(hi - lo for lo, hi in (_row_ranks(shape, m) for m in rows))


def _chunk_width(c: int, block_r: int, R: int) -> int:
    return max(0, min(R, (c + 1) * block_r) - c * block_r)


# ---------------------------------------------------------------------------------------------------------------
# today's launchers
# ---------------------------------------------------------------------------------------------------------------


def _plan_shrink(shape: Shape, device, per_row: bool) -> Launch:
    M, K, R, e = shape.M, shape.K, shape.R, shape.e
    has_dropout = any(p > 0 for p in shape.dropout_p)
    cfg = shrink_config(e, has_dropout, has_dropout and K % 4 == 0, device)
    if per_row:
        block_r = per_row_block_r(R)
        groups = triton.cdiv(R, block_r)
        widths = None
    else:
        block_r = dense.segment_block(shape.rank_ptr, shape.dropout_p)
        segs = segment_rows(shape.rank_ptr, shape.dropout_p, block_r)
        groups = len(segs)
        widths = [hi - lo for lo, hi, _, _, _ in segs]
    grid = shrink_grid(M, K, groups, cfg, device)
    tiles_m, _, splits = grid
    bm = cfg["BLOCK_M"]
    x = a = t_w = 0
    for tile in range(tiles_m):
        rows = _rows_of_tile(shape, tile, bm)
        if per_row:
            chunks = _touched_chunks(shape, rows, block_r)
            x += len(chunks) * len(rows) * K
            a += sum(_chunk_width(c, block_r, R) for c in chunks) * K
            t_w += len(rows) * rank_max(shape.rank_ptr)  # each compact cell once: its value or its zero
        else:
            x += groups * len(rows) * K
            a += sum(widths) * K
            t_w += len(rows) * R
    tile_elems = bm * block_r
    part = splits * tiles_m * groups * tile_elems if splits > 1 else 0
    flops = 2.0 * tiles_m * bm * block_r * triton.cdiv(K, cfg["BLOCK_K"]) * cfg["BLOCK_K"] * groups
    return _launch(
        "shrink_kernel",
        grid,
        {**cfg, "BLOCK_R": block_r, "splits": splits},
        shape,
        {"x": x, "a": a, "scale": 0, "part": part},
        {"t": t_w, "part": part},
        flops,
        {"x": M * K, "a": R * K},
        f"{'per-row ' if per_row else ''}shrink, {splits} split(s) of K",
        (bm + block_r) * cfg["BLOCK_K"] * e,
        triton.cdiv(triton.cdiv(K, cfg["BLOCK_K"]), splits),
    )


def _tail(launch: Launch, e: int, tensors: Sequence[str], latencies: int) -> None:
    """Record the work after the launch's K loop: `tensors` moved in `latencies` dependent round trips."""
    launch.tail_bytes = float(
        sum(v * launch.elem_bytes(k, e) for k, v in launch.loads.items() if k in tensors)
        + sum(v * launch.elem_bytes(k, e) for k, v in launch.writes.items() if k in tensors)
    )
    launch.tail_latencies = latencies


# the decode's last program sums the split partials in one ordered loop (decode._sum_splits). In the sm_90 SASS of
# decode[in_pass,BM=16,BN=32|64,...] ptxas issues split 0's loads and (peeled) split 1's together, then runs the rest
# unrolled 4 times, then a pair, then a single: each block's loads go out before its adds, and the next block's
# loads wait behind those adds (a warp issues in order)
PARTIALS_PER_TRIP = 4


def partial_trips(splits: int) -> int:
    """Dependent L2 round trips the last program of a split decode tile waits for to read every split's partial."""
    if splits <= 1:
        return 0
    blocks, rest = divmod(splits - 2, PARTIALS_PER_TRIP)
    return 1 + blocks + (rest >= 2) + (rest % 2)


def _plan_decode(shape: Shape, device, per_row: bool, after_shrink: bool = False, pdl: bool = False) -> Launch:
    M, N, K, R, e = shape.M, shape.N, shape.K, shape.R, shape.e
    has_dropout = any(p > 0 for p in shape.dropout_p)
    n_segs = len(segment_rows(shape.rank_ptr, shape.dropout_p, dense.segment_block(shape.rank_ptr, shape.dropout_p)))
    mode = rank_mode(per_row, R, len(shape.ranks) if per_row else n_segs)
    cfg = decode_config(M, e, mode, has_dropout, device, N)
    block_r = rank_block(mode, R)
    grid, splits = decode_grid(M, N, K, cfg, device)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    tiles_n, tiles_m = triton.cdiv(N, bn), grid[1]
    tiles = tiles_n * tiles_m
    loads = {"x": tiles * bm * K, "w": tiles * bn * K}
    k_pad = triton.cdiv(K, bk) * bk
    flops = 2.0 * tiles * bn * bm * k_pad
    reads = {"x": M * K, "w": N * K}
    writes = {"y": M * N}
    if mode == IN_PASS:
        loads["a"] = tiles * R * K
        loads["b"] = tiles * splits * bn * R  # every program: B's tile before its K loop, its split's rank term
        dots = n_segs if has_dropout else 1
        flops += 2.0 * tiles * block_r * bm * k_pad * dots + 2.0 * tiles * splits * bn * bm * block_r
        reads.update(a=R * K, b=N * R)
        writes["t"] = M * R
    elif mode == DENSE_T:
        loads["t"] = tiles * bm * R
        loads["b"] = tiles * bn * R
        flops += 2.0 * tiles * bn * bm * triton.cdiv(R, block_r) * block_r
        reads.update(t=M * R, b=N * R)
    elif mode == ROWS_T:
        t_loads = b_loads = chunks_total = 0
        for tile in range(tiles_m):
            rows = _rows_of_tile(shape, tile, bm)
            chunks = _touched_chunks(shape, rows, block_r)
            t_loads += _used_ranks(shape, rows) * tiles_n
            b_loads += sum(_chunk_width(c, block_r, R) for c in chunks) * bn * tiles_n
            chunks_total += len(chunks) * tiles_n
        loads.update(t=t_loads, b=b_loads)
        flops += 2.0 * bn * bm * block_r * chunks_total
        reads.update(t=M * rank_max(shape.rank_ptr), b=N * R)
    part = 0
    if splits > 1:  # valid cells only: y's [N, M] per split, and t's [R, M] per split in column tile 0
        part = splits * sum(decode.partial_strides(M, N, R, mode))
        loads["part"] = part
    if shape.bias:
        loads["bias"] = tiles * bn
        reads["bias"] = N
    writes["part"] = part
    mode_name = {
        IN_PASS: "shrink in the K loop",
        DENSE_T: "t from the shrink launch",
        ROWS_T: "per-row t",
        NONE: "no rank term",
    }[mode]
    launch = _launch(
        "decode_kernel",
        grid,
        {**cfg, "BLOCK_R": block_r, "splits": splits, "mode": mode},
        shape,
        loads,
        writes,
        flops,
        reads,
        f"decode, {splits} split(s) of K, {mode_name}",
        (bn + bm + (block_r if mode == IN_PASS else 0)) * bk * e,
        triton.cdiv(triton.cdiv(K, bk), splits),
    )
    # after the K loop: store the partial and take the ticket, (last program) read the partials, y. IN_PASS loaded
    # B before its K loop and has t in registers; DENSE_T and ROWS_T read t and B after the partials (one more trip)
    reads_t = mode in (DENSE_T, ROWS_T)
    trips = 1 + partial_trips(splits) if splits > 1 else 0
    _tail(launch, e, ("part", "t", "bias", "y") + (("b",) if reads_t else ()), trips + reads_t)
    launch.pdl = pdl and decode.pdl_consumer(mode, after_shrink)  # its gdc_wait sits right after the K loop
    return launch


def _plan_fused_gemm(
    shape: Shape, device, per_row: bool, backward: bool, after_shrink: bool = False, pdl: bool = False
) -> Launch:
    """Forward: out = x W^T (+ t B^T); backward: dX = dY W (+ drop'(dS A)). Reduction length K_red."""
    M, R, e = shape.M, shape.R, shape.e
    n_out, k_red = (shape.K, shape.N) if backward else (shape.N, shape.K)
    dropout = backward and any(p > 0 for p in shape.dropout_p)
    has_lora = R > 0
    lora_dropout = dropout and has_lora
    packed = lora_dropout and n_out % 4 == 0
    cfg = gemm_config(M, e, lora_dropout, packed, device)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    grid = gemm_grid(M, n_out, cfg)
    tiles_m, tiles_n = triton.cdiv(M, bm), triton.cdiv(n_out, bn)
    tiles = tiles_m * tiles_n
    lhs, rhs, a_name = ("ds", "a", "dy") if backward else ("t", "b", "x")
    loads = {a_name: tiles * bm * k_red, "w": tiles * bn * k_red}
    flops = 2.0 * tiles * bm * bn * triton.cdiv(k_red, bk) * bk
    reads = {a_name: M * k_red, "w": shape.N * shape.K}
    if has_lora and per_row:
        lhs_loads = rhs_loads = chunks_total = 0
        for tile in range(tiles_m):
            rows = _rows_of_tile(shape, tile, bm)
            chunks = _touched_chunks(shape, rows, RANK_CHUNK)
            lhs_loads += _used_ranks(shape, rows) * tiles_n
            rhs_loads += sum(_chunk_width(c, RANK_CHUNK, R) for c in chunks) * bn * tiles_n
            chunks_total += len(chunks) * tiles_n
        loads.update({lhs: lhs_loads, rhs: rhs_loads})
        flops += 2.0 * bm * bn * RANK_CHUNK * chunks_total
        reads.update({lhs: M * rank_max(shape.rank_ptr), rhs: R * n_out})
    elif has_lora:
        loads.update({lhs: tiles * bm * R, rhs: tiles * bn * R})
        flops += 2.0 * tiles * bm * bn * triton.cdiv(R, RANK_CHUNK) * RANK_CHUNK
        reads.update({lhs: M * R, rhs: R * n_out})
    if shape.bias and not backward:
        loads["bias"] = tiles * bn
        reads["bias"] = n_out
    launch = _launch(
        "fused_gemm_kernel",
        grid,
        cfg,
        shape,
        loads,
        {"dx" if backward else "y": M * n_out},
        flops,
        reads,
        f"fused GEMM {'dX' if backward else 'y'}{' per row' if per_row else ''}",
        (bm + bn) * bk * e,
        triton.cdiv(k_red, bk),
    )
    # the rank term after the K loop (no dropout on it): t and B^T in one round trip, then the tile's store
    _tail(launch, e, ("t", "b", "bias", "y"), int(has_lora and not lora_dropout))
    launch.pdl = pdl and fused_gemm.pdl_consumer(after_shrink, has_lora, lora_dropout)
    return launch


def _plan_ds(shape: Shape, device, per_row: bool) -> Launch:
    M, N, R = shape.M, shape.N, shape.R
    cfg = ds_config(shape.e, device)
    block_r = rank_chunk(R)
    grid = split_grid(triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(R, block_r), N, cfg["BLOCK_N"], device)
    tiles_m, chunks, splits = grid
    dy = b = visited = 0
    for tile in range(tiles_m):
        rows = _rows_of_tile(shape, tile, cfg["BLOCK_M"])
        mine = _touched_chunks(shape, rows, block_r) if per_row else range(chunks)
        visited += len(mine)
        dy += len(mine) * len(rows) * N
        b += sum(_chunk_width(c, block_r, R) for c in mine) * N
    part = splits * tiles_m * chunks * cfg["BLOCK_M"] * block_r if splits > 1 else 0
    flops = 2.0 * visited * cfg["BLOCK_M"] * block_r * triton.cdiv(N, cfg["BLOCK_N"]) * cfg["BLOCK_N"]
    return _launch(
        "ds_kernel",
        grid,
        {**cfg, "BLOCK_R": block_r, "splits": splits},
        shape,
        {"dy": dy, "b": b, "part": part},
        {"ds": M * (rank_max(shape.rank_ptr) if per_row else R), "part": part},
        flops,
        {"dy": M * N, "b": N * R},
        f"dS, {splits} split(s) of N",
        (cfg["BLOCK_M"] + block_r) * cfg["BLOCK_N"] * shape.e,
        triton.cdiv(triton.cdiv(N, cfg["BLOCK_N"]), splits),
    )


def _plan_db(shape: Shape, device, per_row: bool) -> Launch:
    M, N, R = shape.M, shape.N, shape.R
    cfg = db_config(shape.e, device)
    block_r = rank_chunk(R)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    grid = split_grid(triton.cdiv(N, bn), triton.cdiv(R, block_r), M, bm, device)
    tiles_n, chunks, splits = grid
    dy = t = visited = 0
    for band in range(triton.cdiv(M, bm)):
        rows = _rows_of_tile(shape, band, bm)
        mine = _touched_chunks(shape, rows, block_r) if per_row else range(chunks)
        visited += len(mine)
        dy += len(mine) * len(rows) * N
        if per_row:
            t += (
                sum(
                    sum(max(0, min(hi, (c + 1) * block_r) - max(lo, c * block_r)) for c in mine)
                    for lo, hi in (_row_ranks(shape, m) for m in rows)
                )
                * tiles_n
            )
        else:
            t += len(rows) * R * tiles_n
    part = splits * tiles_n * chunks * bn * block_r if splits > 1 else 0
    return _launch(
        "db_kernel",
        grid,
        {**cfg, "BLOCK_R": block_r, "splits": splits},
        shape,
        {"dy": dy, "t": t, "part": part},
        {"db": N * R, "part": part},
        2.0 * visited * tiles_n * bn * bm * block_r,
        {"dy": M * N, "t": M * R},
        f"dB, {splits} split(s) of M",
        bm * bn * shape.e + bm * block_r * 4,
        triton.cdiv(triton.cdiv(M, bm), splits),
    )


def _plan_da(shape: Shape, device, per_row: bool) -> Launch:
    M, K, R = shape.M, shape.K, shape.R
    has_dropout = any(p > 0 for p in shape.dropout_p)
    packed = has_dropout and K % 4 == 0
    cfg = da_config(shape.e, has_dropout, packed, device)
    bm, bk = cfg["BLOCK_M"], cfg["BLOCK_K"]
    if per_row:
        block_r = rank_chunk(R)
        groups = triton.cdiv(R, block_r)
    else:
        block_r = dense.segment_block(shape.rank_ptr, shape.dropout_p)
        groups = len(segment_rows(shape.rank_ptr, shape.dropout_p, block_r))
    grid = split_grid(triton.cdiv(K, bk), groups, M, bm, device)
    tiles_k, _, splits = grid
    x = ds = visited = 0
    for band in range(triton.cdiv(M, bm)):
        rows = _rows_of_tile(shape, band, bm)
        mine = len(_touched_chunks(shape, rows, block_r)) if per_row else groups
        visited += mine
        x += mine * len(rows) * K
        # dS: each row's own ranks (per row), every rank (dense), once per K tile
        ds += (_used_ranks(shape, rows) if per_row else len(rows) * R) * tiles_k
    part = splits * tiles_k * groups * bk * block_r if splits > 1 else 0
    return _launch(
        "da_kernel",
        grid,
        {**cfg, "BLOCK_R": block_r, "splits": splits},
        shape,
        {"x": x, "ds": ds, "part": part},
        {"da": R * K, "part": part},
        2.0 * visited * tiles_k * bk * bm * block_r,
        {"x": M * K, "ds": M * R},
        f"dA, {splits} split(s) of M",
        bm * bk * shape.e + bm * block_r * 4,
        triton.cdiv(triton.cdiv(M, bm), splits),
    )


def plan(op: str, shape: Shape, *, path: Optional[str] = None, device=None, pdl: Optional[bool] = None) -> list:
    """The launches today's launchers make for `op` at `shape` (see the module docstring)."""
    device = "cpu" if device is None else device
    pdl = config.pdl_enabled(device) if pdl is None else bool(pdl)
    M, N, K, R = shape.M, shape.N, shape.K, shape.R
    if M == 0:
        return []
    if op == "forward":
        n_segs = len(
            segment_rows(shape.rank_ptr, shape.dropout_p, dense.segment_block(shape.rank_ptr, shape.dropout_p))
        )
        if dense.forward_path(M, path) == "small_m" and N > 0:
            shrunk = rank_mode(False, R, n_segs) == DENSE_T
            out = [_plan_shrink(shape, device, False)] if shrunk else []
            return out + [_plan_decode(shape, device, False, shrunk, pdl)]
        out = [_plan_shrink(shape, device, False)] if n_segs else []
        return out + ([_plan_fused_gemm(shape, device, False, False, n_segs > 0, pdl)] if N else [])
    if op == "rows_forward":
        out = [_plan_shrink(shape, device, True)] if R else []
        if N and M <= dense.DECODE_M_MAX:
            out.append(_plan_decode(shape, device, True, R > 0, pdl))
        elif N:
            out.append(_plan_fused_gemm(shape, device, True, False, R > 0, pdl))
        return out
    if op in ("backward", "rows_backward"):
        per_row = op == "rows_backward"
        out = []
        if R:
            out.append(_plan_ds(shape, device, per_row))
            if N:
                out.append(_plan_db(shape, device, per_row))
            if K:
                out.append(_plan_da(shape, device, per_row))
        if K:
            out.append(_plan_fused_gemm(shape, device, per_row, True))
        return out
    raise ValueError(f"op must be forward, backward, rows_forward or rows_backward, got {op!r}")


# ---------------------------------------------------------------------------------------------------------------
# before: main at dd3ed58 (frozen copy of its config/grid logic; the kernels themselves are gone)
# ---------------------------------------------------------------------------------------------------------------

_BEFORE_TARGET_PROGRAMS = 264  # lora_backward.TARGET_PROGRAMS then


def _before_small_m(shape: Shape) -> Launch:
    M, N, K, R, e = shape.M, shape.N, shape.K, shape.R, shape.e
    has_dropout = any(p > 0 for p in shape.dropout_p)
    bm = 16 if M <= 16 else 64
    if bm == 16:
        bk = 64 if (e == 4 or has_dropout) else 128
    else:
        bk = 32 if (e == 4 or has_dropout) else 64
    cfg = dict(BLOCK_M=bm, BLOCK_N=64, BLOCK_K=bk, num_warps=4 if bm == 16 else 8, num_stages=4 if e == 2 else 3)
    tiles_n, tiles_m = triton.cdiv(N, 64), triton.cdiv(M, bm)
    tiles = tiles_n * tiles_m
    n_segs = len(segment_rows(shape.rank_ptr, shape.dropout_p, dense.segment_block(shape.rank_ptr, shape.dropout_p)))
    k_pad = triton.cdiv(K, bk) * bk
    # the W loop reads x once, then the shrink loop reads x again per segment
    loads = {"x": tiles * bm * K * (1 + n_segs), "w": tiles * 64 * K, "a": tiles * R * K, "b": tiles * 64 * R}
    flops = 2.0 * tiles * 64 * bm * k_pad + 2.0 * tiles * n_segs * 16 * bm * k_pad + 2.0 * tiles * 64 * bm * R
    launch = _launch(
        "small_m_kernel",
        (tiles_n, tiles_m),
        cfg,
        shape,
        loads,
        {"y": M * N, "t": M * R},
        flops,
        {"x": M * K, "w": N * K, "a": R * K, "b": N * R},
        "decode, one program per 64 columns",
        (64 + bm) * bk * e,
        triton.cdiv(K, bk) * (1 + n_segs),
    )
    # after the W loop and its drain: the shrink loop over x and A (num_stages - 1 steps in flight), then B
    launch.tail_latencies = triton.cdiv(triton.cdiv(K, bk) * n_segs, cfg["num_stages"] - 1) + 1
    launch.tail_bytes = float((tiles * bm * K * n_segs + tiles * R * K + tiles * 64 * R) * e)
    return launch


def _before_shrink(shape: Shape) -> Launch:
    M, K, R, e = shape.M, shape.K, shape.R, shape.e
    has_dropout = any(p > 0 for p in shape.dropout_p)
    bk = 64 if (e == 4 or has_dropout) else 128
    block_r = dense.segment_block(shape.rank_ptr, shape.dropout_p)
    n_segs = len(segment_rows(shape.rank_ptr, shape.dropout_p, block_r))
    cfg = dict(BLOCK_M=64, BLOCK_K=bk, BLOCK_R=block_r, num_warps=4, num_stages=3)
    return _launch(
        "shrink_kernel",
        (triton.cdiv(M, 64), n_segs),
        cfg,
        shape,
        {"x": n_segs * M * K, "a": R * K * triton.cdiv(M, 64)},
        {"t": M * R},
        2.0 * triton.cdiv(M, 64) * 64 * block_r * triton.cdiv(K, bk) * bk * n_segs,
        {"x": M * K, "a": R * K},
        "shrink, one program per 64 rows and segment",
        (64 + block_r) * bk * e,
        triton.cdiv(K, bk),
    )


def _before_fused_gemm(shape: Shape, backward: bool) -> Launch:
    # gemm_config's table is unchanged by issue 13 (the tuned store aside): reuse its static entries
    launch = _plan_fused_gemm(
        Shape(shape.M, shape.N, shape.K, shape.ranks, shape.dtype, shape.dropout, None, shape.bias),
        "cpu",
        False,
        backward,
    )
    launch.note += " (as today)"
    return launch


def _before_rows(shape: Shape, backward: bool) -> list:
    M, N, K, R, e = shape.M, shape.N, shape.K, shape.R, shape.e
    n = len(shape.ranks)
    rows_per_adapter = M / max(1, n)
    size = "small" if rows_per_adapter <= 32 else ("medium" if rows_per_adapter <= 256 else "large")
    # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the grouped GEMM and of the rank kernels
    gemm = {"small": (16, 64, 64, 4, 4), "medium": (64, 128, 64, 4, 3), "large": (128, 128, 64, 8, 3)}[size]
    if e == 4:
        gemm = (gemm[0], gemm[1], 32, gemm[3], 3)
    rank = (16, 64, 128, 4, 3) if size == "small" else (64, 64, 64, 4, 3)
    counts = {}
    for m in range(M):
        counts[shape.adapter_of(m)] = counts.get(shape.adapter_of(m), 0) + 1

    def tiles(block):  # tiles of rows sorted by adapter: never mixing adapters
        return sum(triton.cdiv(c, block) for c in counts.values()), M // block + n + 1

    used_g, grid_g = tiles(gemm[0])
    used_r, grid_r = tiles(rank[0])
    r_max = rank_max(shape.rank_ptr)
    block_r = 16 if r_max <= 16 else 64
    n_out, k_red = (K, N) if backward else (N, K)
    out = [_launch("_group_rows_kernel", (1,), {}, shape, {}, {}, 0.0, {}, "one-program counting sort")]
    if not backward:
        out.append(
            _launch(
                "_rows_shrink_kernel",
                (grid_r, triton.cdiv(r_max, block_r)),
                dict(BLOCK_M=rank[0], BLOCK_K=rank[2], BLOCK_R=block_r, num_warps=4, num_stages=3),
                shape,
                {"x": M * K},
                {"t": M * r_max},
                2.0 * used_r * rank[0] * block_r * K,
                {"x": M * K, "a": R * K},
                "per-row shrink",
                (rank[0] + block_r) * rank[2] * e,
                triton.cdiv(K, rank[2]),
            )
        )
    else:
        out.append(
            _launch(
                "_rows_bwd_db_ds_kernel",
                (grid_r, triton.cdiv(N, rank[1])),
                dict(BLOCK_M=rank[0], BLOCK_N=rank[1], BLOCK_R=16, num_warps=4, num_stages=3),
                shape,
                {"dy": M * N},
                {},
                4.0 * M * N * R,
                {"dy": M * N},
                "dB, dS by fp32 atomics",
                rank[0] * rank[1] * e,
                1,
            )
        )
        out.append(
            _launch(
                "_rows_bwd_da_kernel",
                (grid_r, triton.cdiv(K, rank[2])),
                dict(BLOCK_M=rank[0], BLOCK_K=rank[2], BLOCK_R=16, num_warps=4, num_stages=3),
                shape,
                {"x": M * K},
                {},
                2.0 * M * K * R,
                {"x": M * K},
                "dA by fp32 atomics",
                rank[0] * rank[2] * e,
                1,
            )
        )
    # every non-empty tile streams all of W (columns masked to N): W once per adapter present in a tile
    out.append(
        _launch(
            "_rows_gemm_kernel",
            (grid_g, triton.cdiv(n_out, gemm[1])),
            dict(BLOCK_M=gemm[0], BLOCK_N=gemm[1], BLOCK_K=gemm[2], num_warps=gemm[3], num_stages=gemm[4]),
            shape,
            {"w": used_g * N * K, "dy" if backward else "x": M * k_red * triton.cdiv(n_out, gemm[1])},
            {"dx" if backward else "y": M * n_out},
            2.0 * used_g * gemm[0] * triton.cdiv(n_out, gemm[1]) * gemm[1] * k_red,
            {"w": N * K},
            "tiles never mix adapters",
            (gemm[0] + gemm[1]) * gemm[2] * e,
            triton.cdiv(k_red, gemm[2]),
        )
    )
    return out


def plan_before(op: str, shape: Shape) -> list:
    """The launches of main at dd3ed58 (before issue 13) for `op` at `shape`, on an H100 (static configs)."""
    M, N, K, R = shape.M, shape.N, shape.K, shape.R
    if M == 0:
        return []
    if op == "forward":
        if M <= 64 and N > 0:
            return [_before_small_m(shape)]
        return ([_before_shrink(shape)] if R else []) + ([_before_fused_gemm(shape, False)] if N else [])
    if op == "backward":
        out = []
        block_r = dense.segment_block(shape.rank_ptr, shape.dropout_p)
        n_segs = len(segment_rows(shape.rank_ptr, shape.dropout_p, block_r))
        if R:
            tiles_m = triton.cdiv(M, 64)
            out.append(
                _launch(
                    "ds_db_kernel",
                    (tiles_m, triton.cdiv(R, block_r)),
                    dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
                    shape,
                    {"dy": M * N * triton.cdiv(R, block_r)},
                    {"ds": M * R, "part": tiles_m * N * R},
                    2.0 * 2 * M * N * R,
                    {"dy": M * N, "b": N * R},
                    "partials [M/64, N, R] fp32",
                    (64 + block_r) * 64 * shape.e,
                    triton.cdiv(N, 64),
                )
            )
            out.append(
                _launch(
                    "sum_partials_kernel",
                    (triton.cdiv(N * R, 1024),),
                    dict(BLOCK=1024, num_warps=4, num_stages=1),
                    shape,
                    {"part": tiles_m * N * R},
                    {"db": N * R},
                    0.0,
                    {"part": tiles_m * N * R},
                    "int32 offsets s * X",
                    1024 * 4,
                    tiles_m,
                )
            )
            if K:
                bk = 64 if shape.e == 2 else 32
                tiles_k = triton.cdiv(K, bk)
                splits = max(1, min(tiles_m, _BEFORE_TARGET_PROGRAMS // max(1, tiles_k * n_segs)))
                rows_per_split = triton.cdiv(tiles_m, splits) * 64
                splits = triton.cdiv(M, rows_per_split)
                out.append(
                    _launch(
                        "da_partial_kernel",
                        (tiles_k, n_segs, splits),
                        dict(BLOCK_M=64, BLOCK_K=bk, num_warps=4, num_stages=3),
                        shape,
                        {"x": M * K * n_segs},
                        {"part": splits * R * K},
                        2.0 * M * K * R,
                        {"x": M * K},
                        "split over M",
                        64 * bk * shape.e + 64 * block_r * 4,
                        triton.cdiv(triton.cdiv(M, 64), splits),
                    )
                )
                out.append(
                    _launch(
                        "sum_partials_kernel",
                        (triton.cdiv(R * K, 1024),),
                        dict(BLOCK=1024, num_warps=4, num_stages=1),
                        shape,
                        {"part": splits * R * K},
                        {"da": R * K},
                        0.0,
                        {"part": splits * R * K},
                        "",
                        1024 * 4,
                        splits,
                    )
                )
        if K:
            out.append(_before_fused_gemm(shape, True))
        return out
    if op == "rows_forward":
        return _before_rows(shape, False)
    if op == "rows_backward":
        return _before_rows(shape, True)
    raise ValueError(f"op must be forward, backward, rows_forward or rows_backward, got {op!r}")


def summary(launches: list, e: int) -> dict:
    """Totals of a plan: launches, programs of the biggest launch, W elements loaded, HBM and L2 bytes, FLOPs."""
    return {
        "launches": len(launches),
        "programs": [lc.programs for lc in launches],
        "w_loads": sum(lc.loads.get("w", 0) for lc in launches),
        "hbm_bytes": sum(lc.hbm_bytes for lc in launches),
        "l2_bytes": sum(lc.l2_bytes(e) for lc in launches),
        "flops": sum(lc.flops for lc in launches),
    }


# ---------------------------------------------------------------------------------------------------------------
# issue 13's regimes (bf16, K = 4096): the shapes its table is about; fused_lora/perf times them
# ---------------------------------------------------------------------------------------------------------------


def issue13_regimes() -> list:
    """(name, op, shape) of every regime of issue 13's table."""
    out = [
        (f"decode M={M} N={N}", "forward", Shape(M, N, 4096, [16])) for M in (1, 16, 64) for N in (1024, 4096, 14336)
    ]
    out.append(
        ("mixed decode 16 x 16 ad", "rows_forward", Shape(16, 4096, 4096, [16] * 16, row_ids=interleaved(16, 16)))
    )
    out.append(
        ("mixed prefill 2048 x 4 ad", "rows_forward", Shape(2048, 4096, 4096, [16] * 4, row_ids=interleaved(2048, 4)))
    )
    out += [(f"prefill M={M}", "forward", Shape(M, 4096, 4096, [16])) for M in (512, 2048, 8192)]
    out += [(f"backward M={M} r={r}", "backward", Shape(M, 14336, 4096, [r])) for M, r in ((8192, 16), (65536, 64))]
    return out


def grids(launches: list) -> str:
    """ "kernel: programs" per launch, "(PDL)" after a launch that overlaps the one before it."""
    return ", ".join(
        f"{lc.kernel.replace('_kernel', '').strip('_')}: {lc.programs}{' (PDL)' if lc.pdl else ''}" for lc in launches
    )


def partial_bytes(launches: list) -> int:
    """Bytes of fp32 split partials the launches write."""
    return 4 * sum(lc.writes.get("part", 0) for lc in launches)


def counts_table() -> str:
    """Issue 13's regimes before (dd3ed58), after, and after with PDL: launches, programs, W loads, partials. Exact
    counts (tests/test_kernel_counts.py); the MODEL times of the same plans: `python -m fused_lora bench
    --model-only` (fused_lora/perf)."""
    lines = [
        "Counts (exact, from the launchers' own config/grid/split functions); MODEL times: "
        "`python -m fused_lora bench --model-only`.",
        "| regime | version | launches: programs | W loads / W | partials MiB |",
        "|---|---|---|---|---|",
    ]
    for name, op, shape in issue13_regimes():
        versions = [("before", plan_before(op, shape)), ("after", plan(op, shape, pdl=False))]
        with_pdl = plan(op, shape, pdl=True)
        if any(lc.pdl for lc in with_pdl):
            versions.append(("after, PDL", with_pdl))
        for version, launches in versions:
            w = sum(lc.loads.get("w", 0) for lc in launches) / (shape.N * shape.K)
            lines.append(
                f"| {name} | {version} | {grids(launches)} | {w:.2f} | {partial_bytes(launches) / 2**20:.1f} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    print(counts_table())
