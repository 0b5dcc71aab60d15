"""What benchmarks/codegen.py needs to compile a kernel ahead of time, without a GPU.

Every kernel module in this package exposes ``codegen_specs() -> list[KernelSpec]`` that lists each
@triton.jit kernel at every config its launcher can pick, for fp16 and bf16 inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# What a split reduction (kernels/blocks.py arrive_last) must compile to, checked in the PTX by the codegen gate:
# every thread's partial stores, then a CTA barrier, then the gpu-scope acq_rel ticket with no global access in
# between (release), and the ticket broadcast through a barrier before any partial is read back (acquire).
_NO_GLOBAL_ACCESS = r"(?:(?![ \t]*(?:@\S+\s+)?(?:ld|st)\.global)[^\n]*\n)"
SPLIT_REDUCTION_PTX = {
    "release: bar.sync then atom.acq_rel.gpu": r"bar\.sync[^\n]*\n" + _NO_GLOBAL_ACCESS + r"{0,40}?[^\n]*"
    r"atom\.global\.gpu\.acq_rel\.add",
    "acquire: atom.acq_rel.gpu then bar.sync": r"atom\.global\.gpu\.acq_rel\.add[^\n]*\n"
    + _NO_GLOBAL_ACCESS
    + r"{0,40}?[^\n]*bar\.sync",
}


@dataclass(frozen=True)
class KernelSpec:
    name: str  # unique, human readable: "fused_gemm[BM=128,BN=128,BK=64,fp16]"
    fn: object  # the @triton.jit function
    signature: dict  # arg name -> triton type string ("*fp16", "i32", "fp32", "constexpr")
    constexprs: dict  # constexpr arg name -> value
    num_warps: int = 4
    num_stages: int = 3
    uses_tensor_cores: bool = True  # a GEMM that must show HMMA (sm_80) / HGMMA (sm_90)
    extra: dict = field(default_factory=dict)


# Programmatic dependent launch (kernels/config.py), checked in the PTX of the sm_90 specs that use it. A consumer
# must wait (griddepcontrol.wait) after its K loop's MMAs and before the rank term's; before the wait it may read
# global memory only through the K loop's pipelined copies (cp.async of x and W): no plain load (t, the tables,
# partials) and no atomic (the split counters may be the producer's). A producer must signal.
PDL_PRODUCER_PTX = {"griddepcontrol.launch_dependents": r"griddepcontrol\.launch_dependents"}
PDL_CONSUMER_PTX = {
    "griddepcontrol.wait between the K loop's MMAs and the rank term's": r"mma[\s\S]*griddepcontrol\.wait[\s\S]*mma",
    "no ld.global or atom before griddepcontrol.wait": r"\A(?:(?!ld\.global|atom\.)[\s\S])*griddepcontrol\.wait",
}
