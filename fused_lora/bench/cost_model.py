"""A MODEL, not a measurement: bytes moved, FLOPs and kernel launches per implementation and shape, and the time
they imply on a GPU's published ceilings.

Each implementation is a list of kernels; a kernel costs max(bytes / bandwidth, flops / peak) (its own
roofline), the op costs the sum over its kernels plus LAUNCH_S per launch. Summing per-kernel rooflines (rather
than one max over the totals) keeps PEFT's memory-bound elementwise kernels visible next to a compute-bound
GEMM. Bytes count compulsory DRAM traffic of each kernel (every operand read once, every result written once):
caches, tile re-reads and tensor-core efficiency are not modelled. Activations and weights have the dtype's
size; the fused path's shrink result t is float32, as the op contract says.

Kernel plans (dropout 0, no bias):
  merged  y = x W^T                                             1 launch
  peft    base, lora_A, lora_B, *scaling, + (out of place)      5 launches (6 with a dropout module)
  addmm   out = x W^T; S = x A^T; out.addmm_(S, B^T, alpha=s)   3 launches
  fused   M <= SMALL_M_MAX: one kernel, shrink recomputed per N-tile of BLOCK_N columns  1 launch
          larger M: shrink t = x A^T * s, then a GEMM whose accumulator takes t B^T       2 launches
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List

LAUNCH_S = 4e-6
# mirror kernels/small_m.py (small_m_config): the one-kernel path serves M <= 64 with 64-column tiles
SMALL_M_MAX = 64
SMALL_M_BLOCK_N = 64
MIB = 2 ** 20


@dataclass(frozen=True)
class Gpu:
    name: str
    bandwidth: float        # bytes/s
    peak: Dict[str, float]  # FLOP/s per dtype
    source: str


# Published figures (SXM parts). H100: 3.35 TB/s HBM3 spec, ~3.0 TB/s reached by a copy kernel (DESIGN.md §3);
# 989 TFLOP/s bf16 dense spec, ~800 reached by large cuBLAS GEMMs; fp32 67 TFLOP/s non-tensor (torch's default
# for fp32 matmul is no TF32), taken as 60. A100 80GB SXM: 2.0 TB/s, 312 TFLOP/s bf16 dense, 19.5 TFLOP/s fp32.
GPUS = {
    "H100": Gpu("H100", 3.0e12, {"bfloat16": 800e12, "float16": 800e12, "float32": 60e12},
                "H100 SXM: 3.0 TB/s (copy; spec 3.35), 800 TFLOP/s bf16 dense (spec 989), 60 TFLOP/s fp32 "
                "non-tensor (spec 67)"),
    "A100": Gpu("A100", 2.0e12, {"bfloat16": 312e12, "float16": 312e12, "float32": 19.5e12},
                "A100 SXM 80GB: 2.0 TB/s (spec 2.04), 312 TFLOP/s bf16 dense, 19.5 TFLOP/s fp32 non-tensor"),
}

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Kernel:
    name: str
    bytes: float
    flops: float

    def seconds(self, gpu: Gpu, dtype: str) -> float:
        return max(self.bytes / gpu.bandwidth, self.flops / gpu.peak[dtype])


def _gemm(name: str, M: int, K: int, N: int, e: int, out_bytes: int = None, extra_read: float = 0.0) -> Kernel:
    """[M,K] @ [K,N] -> [M,N]: reads both operands once, writes the result once."""
    out = e if out_bytes is None else out_bytes
    return Kernel(name, M * K * e + K * N * e + M * N * out + extra_read, 2.0 * M * N * K)


def _elementwise(name: str, reads: float, writes: float, elements: float) -> Kernel:
    return Kernel(name, reads + writes, elements)


def forward_kernels(impl: str, M: int, K: int, N: int, r: int, dtype: str) -> List[Kernel]:
    e = DTYPE_BYTES[dtype]
    MN = M * N * e
    if impl == "merged":
        return [_gemm("x W^T", M, K, N, e)]
    if impl == "peft":
        return [_gemm("base x W^T", M, K, N, e), _gemm("lora_A x A^T", M, K, r, e),
                _gemm("lora_B S B^T", M, r, N, e), _elementwise("* scaling", MN, MN, M * N),
                _elementwise("result + lora", 2 * MN, MN, M * N)]
    if impl == "addmm":
        return [_gemm("x W^T", M, K, N, e), _gemm("S = x A^T", M, K, r, e),
                # addmm_ reads out, S and B and writes out: a rank-r GEMM plus a read of the [M,N] output
                _gemm("out.addmm_(S, B^T)", M, r, N, e, extra_read=MN)]
    if impl == "fused":
        if M <= SMALL_M_MAX:
            tiles = math.ceil(N / SMALL_M_BLOCK_N)
            shrink_flops = 2.0 * M * K * r * tiles  # recomputed by every column tile: free while bandwidth-bound
            return [Kernel("one kernel: x W^T + (x A^T) B^T", M * K * e + N * K * e + r * K * e + N * r * e + MN
                           + M * r * 4, 2.0 * M * N * K + shrink_flops + 2.0 * M * r * N)]
        return [_gemm("shrink t = x A^T * s", M, K, r, e, out_bytes=4),
                Kernel("GEMM, acc += t B^T", M * K * e + N * K * e + M * r * 4 + N * r * e + MN,
                       2.0 * M * N * K + 2.0 * M * r * N)]
    raise ValueError(f"no forward model for implementation {impl!r}")


def backward_kernels(impl: str, M: int, K: int, N: int, r: int, dtype: str) -> List[Kernel]:
    """Backward with W frozen: dx for x, dA and dB for the adapter (merged: dx only)."""
    e = DTYPE_BYTES[dtype]
    MK = M * K * e
    dx_base = _gemm("dx = dy W", M, N, K, e)
    accumulate_dx = _elementwise("dx += dx_lora", 2 * MK, MK, M * K)
    if impl == "merged":
        return [dx_base]
    if impl == "peft":
        MN = M * N * e
        return [_elementwise("dT = dy * s", MN, MN, M * N), _gemm("dS = dT B", M, N, r, e),
                _gemm("dB = dT^T S", N, M, r, e), _gemm("dA = dS^T x", r, M, K, e),
                _gemm("dx_lora = dS A", M, r, K, e), dx_base, accumulate_dx]
    if impl == "addmm":
        return [_gemm("dS = s dy B", M, N, r, e), _gemm("dB = s dy^T S", N, M, r, e),
                _gemm("dA = dS^T x", r, M, K, e), _gemm("dx_lora = dS A", M, r, K, e), dx_base, accumulate_dx]
    if impl == "fused":
        # DESIGN.md §1: dS and dB from one read of dy; dA from x; dx = dy W + dS A in one GEMM
        return [Kernel("dS, dB from one read of dy", M * N * e + N * r * e + M * r * 4 + M * r * 4 + N * r * e,
                       4.0 * M * N * r),
                _gemm("dA = dS^T x", r, M, K, e),
                Kernel("dx = dy W + dS A", M * N * e + N * K * e + M * r * 4 + r * K * e + M * K * e,
                       2.0 * M * N * K + 2.0 * M * r * K)]
    raise ValueError(f"no backward model for implementation {impl!r}")


def merge_kernels(impl: str, N: int, K: int, r: int, dtype: str) -> List[Kernel]:
    e = DTYPE_BYTES[dtype]
    W = N * K * e
    if impl == "fused":
        return [Kernel("W += s B A, tile by tile", 2 * W + (N + K) * r * e, 2.0 * N * K * r)]
    if impl == "peft":
        # get_delta_weight: B @ A, * scaling (out of place); then weight += delta
        return [_gemm("delta = B A", N, r, K, e), _elementwise("delta * scaling", W, W, N * K),
                _elementwise("W += delta", 2 * W, W, N * K)]
    raise ValueError(f"no merge model for implementation {impl!r}")


def merge_peak_extra_bytes(impl: str, N: int, K: int, dtype: str) -> int:
    """Temporaries alive at once during a merge on a GPU: PEFT holds B A and its scaled copy (both [N, K] in the
    adapter dtype, here the weight's); the fused merge works tile by tile in registers."""
    if impl == "peft":
        return 2 * N * K * DTYPE_BYTES[dtype]
    if impl == "fused":
        return 0
    raise ValueError(f"no merge model for implementation {impl!r}")


def kernels_for(op: str, impl: str, M: int, K: int, N: int, r: int, dtype: str) -> List[Kernel]:
    if op == "forward":
        return forward_kernels(impl, M, K, N, r, dtype)
    if op == "forward_backward":
        return forward_kernels(impl, M, K, N, r, dtype) + backward_kernels(impl, M, K, N, r, dtype)
    if op == "merge":
        return merge_kernels(impl, N, K, r, dtype)
    raise ValueError(f"no model for op {op!r}")


@dataclass(frozen=True)
class Estimate:
    op: str
    impl: str
    gpu: str
    dtype: str
    M: int
    K: int
    N: int
    r: int
    bytes: float
    flops: float
    launches: int
    seconds: float

    def record(self, ratio_vs_merged) -> dict:
        return {"kind": "MODEL", "op": self.op, "impl": self.impl, "device": self.gpu, "dtype": self.dtype,
                "M": self.M, "K": self.K, "N": self.N, "r": self.r, "bytes": self.bytes, "flops": self.flops,
                "launches": self.launches, "model_s": self.seconds, "ratio_vs_merged": ratio_vs_merged}


def estimate(op: str, impl: str, M: int, K: int, N: int, r: int, dtype: str, gpu: Gpu) -> Estimate:
    kernels = kernels_for(op, impl, M, K, N, r, dtype)
    seconds = sum(k.seconds(gpu, dtype) for k in kernels) + LAUNCH_S * len(kernels)
    return Estimate(op, impl, gpu.name, dtype, M, K, N, r, sum(k.bytes for k in kernels),
                    sum(k.flops for k in kernels), len(kernels), seconds)


def model_records(op: str, impls, M: int, K: int, N: int, r: int, dtype: str) -> List[dict]:
    """MODEL rows for every GPU in GPUS; ratio against the merged row of the same GPU where there is one."""
    rows = []
    for gpu in GPUS.values():
        estimates = {impl: estimate(op, impl, M, K, N, r, dtype, gpu) for impl in impls}
        base = estimates.get("merged")
        for impl, est in estimates.items():
            rows.append(est.record(round(est.seconds / base.seconds, 4) if base else None))
    return rows
