"""Dropout masks regenerated from a seed (never stored), bit-identical to fused_lora.reference.dropout_keep.

Device side: `keep_mask(seed, elem, salt, threshold)` is a @triton.jit helper any kernel can call:
    seed      int64 scalar, read from the int64 seed tensor on the device (no host sync)
    elem      int64 block of flat element indices e = m * K + k into the [M, K] input
    salt      int32 scalar, the adapter index in rank_ptr order
    threshold int32 scalar from `dropout_params(p)`; the element is kept iff (word >> 8) >= threshold
It returns a bool block shaped like `elem`.

`keep_mask_tile(...)` is the same mask for a 2-D tile, with a salt and threshold per row (the one tile function
every kernel uses, dense or per row).

Host side: `dropout_params(p) -> (threshold, inv_keep)`; `segment_table(...)`, the per-launch description of rank
segments that dense kernels read on the device; `adapter_table(...)`, the same fields per adapter for per-row
kernels.
"""

from __future__ import annotations

import math
import struct

import torch
import triton
import triton.language as tl

# Row layout of a segment table (int32): ranks [lo, hi) of adapter `salt`, its dropout threshold, and
# 1/(1-p) as float32 bits (read back with a bitcast, so one small tensor carries everything).
SEG_LO = tl.constexpr(0)
SEG_HI = tl.constexpr(1)
SEG_SALT = tl.constexpr(2)
SEG_THRESHOLD = tl.constexpr(3)
SEG_INV_KEEP = tl.constexpr(4)
SEG_FIELDS = tl.constexpr(5)


@triton.jit
def keep_mask(seed, elem, salt, threshold):
    # tl.philox with uint32 counters is exactly the contract's Philox4x32-10 (same round, same key bump,
    # key = (seed & 0xffffffff, seed >> 32)); counter = (q lo, q hi, salt, 0) with q = elem >> 2.
    q = elem >> 2
    c0 = (q & 0xFFFFFFFF).to(tl.uint32)
    c1 = (q >> 32).to(tl.uint32)
    c2 = (c0 * 0) + salt.to(tl.uint32)
    c3 = c0 * 0
    w0, w1, w2, w3 = tl.philox(seed, c0, c1, c2, c3)
    lane = elem & 3
    word = tl.where(lane == 0, w0, tl.where(lane == 1, w1, tl.where(lane == 2, w2, w3)))
    return (word >> 8) >= threshold.to(tl.uint32)


@triton.jit
def _keep_words(w, threshold):
    return ((w >> 8) >= threshold.to(tl.uint32)).to(tl.int8)


@triton.jit
def keep_mask_tile(seed, row_elem, col0, salt, threshold, BLOCK_COLS: tl.constexpr, PACKED: tl.constexpr):
    """Keep mask of the [rows, BLOCK_COLS] tile whose element (i, j) has flat index row_elem[i] + col0 + j.

    The one dropout-tile function of the package. salt and threshold are per row ([rows] int32): a dense kernel
    passes one adapter's values broadcast over its rows, a per-row kernel each row's own adapter (threshold 0
    keeps the whole row). PACKED (valid when the row length and col0 are multiples of 4): one Philox call yields
    the 4 words of 4 consecutive elements, so the tile costs a quarter of the Philox work and registers.
    """
    salt2 = salt[:, None].to(tl.uint32)
    threshold2 = threshold[:, None]
    if PACKED:
        quads = (row_elem[:, None] + col0 + 4 * tl.arange(0, BLOCK_COLS // 4)[None, :]) >> 2
        c0 = (quads & 0xFFFFFFFF).to(tl.uint32)
        zero = c0 * 0
        w0, w1, w2, w3 = tl.philox(seed, c0, (quads >> 32).to(tl.uint32), zero + salt2, zero)
        # join(join(w0, w2), join(w1, w3)) has [.., a, b] = word 2a + b: reshaping puts word l at column 4j + l
        k = tl.join(
            tl.join(_keep_words(w0, threshold2), _keep_words(w2, threshold2)),
            tl.join(_keep_words(w1, threshold2), _keep_words(w3, threshold2)),
        )
        return tl.reshape(k, (row_elem.shape[0], BLOCK_COLS)) != 0
    else:
        return keep_mask(seed, row_elem[:, None] + col0 + tl.arange(0, BLOCK_COLS)[None, :], salt2, threshold2)


def dropout_params(p: float) -> tuple[int, float]:
    """(threshold, inv_keep) of the contract: threshold in float64 math, 1/(1-p) in float32; (0, 1.0) for p == 0."""
    p = float(p)
    if p <= 0.0:
        return 0, 1.0
    threshold = min(1 << 24, math.ceil(p * (1 << 24)))
    p32 = torch.tensor(p, dtype=torch.float32)
    inv_keep = (torch.tensor(1.0, dtype=torch.float32) / (1.0 - p32)).item()
    return threshold, inv_keep


def _f32_bits(value: float) -> int:
    return struct.unpack("<i", struct.pack("<f", value))[0]


def segment_runs(rank_ptr, dropout_p) -> list[list]:
    """[lo, hi, salt, p] per run of ranks sharing one mask: consecutive adapters without dropout share a run
    (so kernels read x once for all of them); every adapter with dropout is a run of its own."""
    runs = []
    for i in range(len(rank_ptr) - 1):
        lo, hi, p = int(rank_ptr[i]), int(rank_ptr[i + 1]), float(dropout_p[i])
        if hi <= lo:
            continue
        if runs and p <= 0.0 and runs[-1][3] <= 0.0 and runs[-1][1] == lo:
            runs[-1][1] = hi
        else:
            runs.append([lo, hi, i, p])
    return runs


_TABLES: dict = {}


def _device_table(key, make_rows, device) -> tuple[torch.Tensor, int]:
    """(int32 device tensor of make_rows(), row count), made once per key: after the first call no host-to-device
    copy happens, which keeps launches asynchronous and CUDA-graph capturable. Never empty (a zero row stands in)."""
    hit = _TABLES.get(key)
    if hit is None:
        rows = make_rows()
        table = torch.tensor(rows if rows else [[0, 0, 0, 0, _f32_bits(1.0)]], dtype=torch.int32, device=device)
        hit = (table, len(rows))
        if len(_TABLES) > 256:  # bound the cache for long-running processes with many layer shapes
            _TABLES.clear()
        _TABLES[key] = hit
    return hit


def segment_rows(rank_ptr, dropout_p, block_r: int) -> list:
    """[lo, hi, salt, threshold, inv_keep bits] per segment: each run of segment_runs cut into block_r pieces."""
    rows = []
    for lo_run, hi_run, salt, p in segment_runs(rank_ptr, dropout_p):
        threshold, inv_keep = dropout_params(p)
        for lo in range(lo_run, hi_run, block_r):
            rows.append([lo, min(lo + block_r, hi_run), salt, threshold, _f32_bits(inv_keep)])
    return rows


def segment_table(rank_ptr, dropout_p, block_r: int, device) -> tuple[torch.Tensor, int]:
    """segment_rows as an int32 [S, SEG_FIELDS] device tensor, and S (0: no adapter has a rank)."""
    key = ("segments", str(device), tuple(int(r) for r in rank_ptr), tuple(float(p) for p in dropout_p), int(block_r))
    return _device_table(key, lambda: segment_rows(rank_ptr, dropout_p, block_r), device)


def adapter_rows(rank_ptr, dropout_p) -> list:
    """One row per adapter i (rank 0 included), in the segment layout: ranks [lo, hi), salt i, threshold, 1/(1-p)."""
    rows = []
    for i in range(len(rank_ptr) - 1):
        threshold, inv_keep = dropout_params(dropout_p[i])
        rows.append([int(rank_ptr[i]), int(rank_ptr[i + 1]), i, threshold, _f32_bits(inv_keep)])
    return rows


def adapter_table(rank_ptr, dropout_p, device) -> torch.Tensor:
    """adapter_rows as an int32 device tensor: per-row kernels look row m's adapter up at row row_ids[m]."""
    key = ("adapters", str(device), tuple(int(r) for r in rank_ptr), tuple(float(p) for p in dropout_p))
    return _device_table(key, lambda: adapter_rows(rank_ptr, dropout_p), device)[0]


@triton.jit
def _dropout_keep_kernel(seed_ptr, out_ptr, numel, salt, threshold, BLOCK: tl.constexpr):
    elem = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    keep = keep_mask(tl.load(seed_ptr), elem, salt, threshold)
    tl.store(out_ptr + elem, keep.to(tl.int8), mask=elem < numel)


DROPOUT_KEEP_BLOCK = 1024


def codegen_specs():
    from fused_lora.kernels.spec import KernelSpec

    sig = {
        "seed_ptr": "*i64",
        "out_ptr": "*i8",
        "numel": "i64",
        "salt": "i32",
        "threshold": "i32",
        "BLOCK": "constexpr",
    }
    return [
        KernelSpec(
            name=f"dropout_keep[BLOCK={DROPOUT_KEEP_BLOCK}]",
            fn=_dropout_keep_kernel,
            signature=sig,
            constexprs={"BLOCK": DROPOUT_KEEP_BLOCK},
            num_warps=4,
            num_stages=1,
            uses_tensor_cores=False,
        )
    ]
