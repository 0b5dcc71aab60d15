"""What benchmarks/codegen.py needs to compile a kernel ahead of time, without a GPU.

Every kernel module in this package exposes ``codegen_specs() -> list[KernelSpec]`` that lists each
@triton.jit kernel at every config its launcher can pick, for fp16 and bf16 inputs.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class KernelSpec:
    name: str                      # unique, human readable: "fused_gemm[BM=128,BN=128,BK=64,fp16]"
    fn: object                     # the @triton.jit function
    signature: dict                # arg name -> triton type string ("*fp16", "i32", "fp32", "constexpr")
    constexprs: dict               # constexpr arg name -> value
    num_warps: int = 4
    num_stages: int = 3
    uses_tensor_cores: bool = True  # a GEMM that must show HMMA (sm_80) / HGMMA (sm_90)
    extra: dict = field(default_factory=dict)
