"""A MODEL of one kernel launch's time on a GPU, from its grid, bytes, FLOPs and occupancy. Not a measurement.

Every number that is not counted from the code is an assumption, named in ASSUMPTIONS and printed by every
table that uses it (`describe_assumptions`). A launch is one of three engines:

    cublas   torch GEMMs (cuBLAS): at the GPU's cuBLAS-reached peak when compute-bound, at mem_eff of copy
             bandwidth when memory-bound; full occupancy assumed (cuBLAS picks its own tiles).
    torch    elementwise torch kernels: memory-bound at mem_eff of copy bandwidth.
    triton   our kernels: programs (the grid), CTAs per SM from the codegen numbers (registers, shared memory,
             warps: `ctas_per_sm`), then
               compute  the busiest SM runs ceil(programs / SMs) programs at peak/SMs x core efficiency
                        (the wave/tail effect: 133 programs on 132 SMs take two program-times);
               memory   each active SM keeps (resident CTAs x bytes in flight per CTA) outstanding; Little's law
                        with the loaded latency gives its bandwidth, capped per SM; the sum is capped by what
                        cuBLAS reaches (mem_eff of copy bandwidth).
             time = max(compute, memory, L2 traffic / L2 bandwidth).
Each launch adds LAUNCH_GAP_S (kernel boundary on a busy stream). Host (Python) time is a separate figure,
compared with the GPU time by the caller: eager calls cost max(GPU, host), CUDA graphs remove host time.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, List, Optional

KIB = 1024
MIB = 2 ** 20


@dataclass(frozen=True)
class Gpu:
    name: str
    sms: int
    bandwidth: float            # bytes/s a copy kernel reaches from HBM
    l2_bandwidth: float         # bytes/s from L2 to the SMs, all SMs together
    peak: Dict[str, float]      # FLOP/s a large cuBLAS GEMM reaches, per dtype
    regs_per_sm: int = 65536
    smem_per_sm: int = 228 * KIB
    max_warps_per_sm: int = 64
    max_ctas_per_sm: int = 32
    source: str = ""


# Published figures (SXM parts), as reached by real kernels rather than the spec sheet (DESIGN.md section 3).
GPUS = {
    "H100": Gpu("H100", 132, 3.0e12, 5.5e12, {"bfloat16": 800e12, "float16": 800e12, "float32": 60e12},
                source="H100 SXM: 132 SMs, 3.0 TB/s copy (spec 3.35), ~5.5 TB/s L2, 800 TFLOP/s bf16 by cuBLAS "
                       "(spec 989), 60 TFLOP/s fp32 without TF32 (spec 67), 64K regs and 228 KiB smem per SM"),
    "A100": Gpu("A100", 108, 1.8e12, 4.0e12, {"bfloat16": 280e12, "float16": 280e12, "float32": 19.5e12},
                smem_per_sm=164 * KIB,
                source="A100 SXM 80GB: 108 SMs, 1.8 TB/s copy (spec 2.04), ~4 TB/s L2, 280 TFLOP/s bf16 by "
                       "cuBLAS (spec 312), 19.5 TFLOP/s fp32, 64K regs and 164 KiB smem per SM"),
}


@dataclass(frozen=True)
class Assumption:
    value: float
    low: float
    high: float
    unit: str
    why: str


# The numbers the model does not count from code. Each has a plausible range; the dispatch treats a modelled
# margin smaller than the spread these ranges imply as "unknown" (and then takes cuBLAS).
ASSUMPTIONS: Dict[str, Assumption] = {
    "triton_core_eff": Assumption(0.80, 0.75, 0.85, "x cuBLAS",
                                  "Triton tutorial GEMM core (cp.async + wgmma, 1 tile per CTA) vs cuBLAS, "
                                  "compute-bound tiles"),
    "tma_core_eff": Assumption(0.90, 0.80, 0.97, "x cuBLAS",
                               "Hopper core (TMA + persistent grid), unmeasured; used only where selected"),
    "mem_eff": Assumption(0.90, 0.85, 0.95, "x copy BW",
                          "memory-bound cuBLAS GEMV / torch elementwise kernels vs a copy"),
    "latency_s": Assumption(0.8e-6, 0.7e-6, 0.9e-6, "s", "loaded HBM latency (Little's law)"),
    "per_sm_bw": Assumption(34e9, 25e9, 45e9, "B/s", "load bandwidth one SM can pull (1.5x its fair share)"),
    "launch_gap_s": Assumption(3e-6, 2e-6, 4e-6, "s", "GPU time a kernel boundary costs on a busy stream"),
    "host_torch_op_s": Assumption(5e-6, 3e-6, 8e-6, "s", "host time of one eager torch op (dispatcher + launch)"),
    "host_triton_launch_s": Assumption(10e-6, 5e-6, 20e-6, "s", "host time of one Triton launch from Python"),
    "host_fused_call_s": Assumption(15e-6, 10e-6, 30e-6, "s",
                                    "fused_lora layer call before its launches: `bench --ops host` measured the "
                                    "plan + eager op path at ~2-3 us over nn.Linear's with the backend stubbed "
                                    "(benchmarks/PERFORMANCE.md, CPU, loaded machine); 150 us before issue 14"),
    "host_peft_call_s": Assumption(45e-6, 40e-6, 50e-6, "s", "PEFT LoRA Linear call (DESIGN.md 6)"),
    "host_linear_call_s": Assumption(9e-6, 8e-6, 10e-6, "s", "nn.Linear call (DESIGN.md 6)"),
}


# the end of each range that favours the cuBLAS composition over our Triton kernels (the dispatch's test)
AGAINST_TRITON = {"triton_core_eff": "low", "tma_core_eff": "low", "mem_eff": "high", "latency_s": "high",
                  "per_sm_bw": "low", "launch_gap_s": "low"}
_overrides: Dict[str, float] = {}


def value(name: str) -> float:
    return _overrides.get(name, ASSUMPTIONS[name].value)


@contextmanager
def scenario(ends: Dict[str, str]):
    """Evaluate with some assumptions at an end of their range: {name: "low" | "high"}."""
    saved = dict(_overrides)
    try:
        for name, end in ends.items():
            a = ASSUMPTIONS[name]
            _overrides[name] = a.low if end == "low" else a.high
        yield
    finally:
        _overrides.clear()
        _overrides.update(saved)


def describe_assumptions(names: Optional[List[str]] = None) -> List[str]:
    """One line per assumption: name = value [low-high] unit: why."""
    lines = []
    for name in names or list(ASSUMPTIONS):
        a = ASSUMPTIONS[name]
        if a.unit == "s":
            text = f"{a.value * 1e6:g} us [{a.low * 1e6:g}-{a.high * 1e6:g}]"
        elif a.unit == "B/s":
            text = f"{a.value / 1e9:g} GB/s [{a.low / 1e9:g}-{a.high / 1e9:g}]"
        else:
            text = f"{a.value:g} [{a.low:g}-{a.high:g}] {a.unit}"
        lines.append(f"{name} = {text}: {a.why}")
    return lines


@dataclass(frozen=True)
class Occupancy:
    """What one CTA of a kernel config uses (from benchmarks/codegen.py), and where it came from."""
    registers: int
    shared: int
    num_warps: int
    source: str  # "codegen sm_90 snapshot" or "estimated"

    def ctas_per_sm(self, gpu: Gpu) -> int:
        # registers are allocated per warp in units of 256 (ptxas rounds to 8 per thread)
        regs_per_warp = math.ceil(max(self.registers, 1) * 32 / 256) * 256
        by_regs = gpu.regs_per_sm // (regs_per_warp * self.num_warps)
        by_smem = gpu.smem_per_sm // max(self.shared + 1024, 1)  # 1 KiB per CTA reserved by the driver
        by_warps = gpu.max_warps_per_sm // self.num_warps
        return max(0, min(by_regs, by_smem, by_warps, gpu.max_ctas_per_sm))


@dataclass(frozen=True)
class Launch:
    """One kernel launch: what it moves and computes, and (Triton) how it is laid out on the GPU."""
    name: str
    bytes: float                 # compulsory HBM traffic (each operand read once, each result written once)
    flops: float
    engine: str                  # "cublas" | "torch" | "triton"
    programs: int = 0            # triton: grid size
    occupancy: Optional[Occupancy] = None
    in_flight: float = 0.0       # triton: bytes one program keeps in flight (pipeline stages x tile loads)
    l2_bytes: float = 0.0        # traffic served by L2 (re-reads of tiles other programs also read)
    core: str = "tutorial"       # triton GEMM core: "tutorial" or "tma" (picks the efficiency assumption)
    note: str = ""


@dataclass(frozen=True)
class LaunchTime:
    seconds: float
    bound: str                   # "compute" | "memory" | "L2" | "launch"
    ctas_per_sm: int = 0
    waves: float = 0.0
    detail: Dict[str, float] = field(default_factory=dict)


def launch_time(launch: Launch, gpu: Gpu, dtype: str) -> LaunchTime:
    peak = gpu.peak[dtype]
    mem_eff = value("mem_eff")
    if launch.engine in ("cublas", "torch"):
        compute = launch.flops / peak if launch.engine == "cublas" else 0.0
        memory = launch.bytes / (gpu.bandwidth * mem_eff)
        seconds = max(compute, memory)
        return LaunchTime(seconds, "compute" if compute >= memory else "memory")
    if launch.engine != "triton":
        raise ValueError(f"unknown engine {launch.engine!r}")
    occ = launch.occupancy or Occupancy(128, 64 * KIB, 4, "estimated")
    ctas = max(1, occ.ctas_per_sm(gpu))
    programs = max(1, launch.programs)
    per_sm_programs = math.ceil(programs / gpu.sms)
    eff = value("tma_core_eff") if launch.core == "tma" else value("triton_core_eff")
    compute = per_sm_programs * (launch.flops / programs) / (peak / gpu.sms * eff)
    active = min(gpu.sms, programs)
    resident = min(ctas, per_sm_programs)
    per_sm = min(value("per_sm_bw"), resident * launch.in_flight / value("latency_s")) if launch.in_flight \
        else value("per_sm_bw")
    bandwidth = min(gpu.bandwidth * mem_eff, active * per_sm)  # no kernel streams faster than cuBLAS does
    memory = launch.bytes / bandwidth
    l2 = launch.l2_bytes / gpu.l2_bandwidth
    seconds = max(compute, memory, l2)
    bound = "compute" if seconds == compute else ("memory" if seconds == memory else "L2")
    return LaunchTime(seconds, bound, ctas, programs / (gpu.sms * ctas),
                      {"compute_s": compute, "memory_s": memory, "l2_s": l2, "bandwidth": bandwidth})


def plan_seconds(launches: List[Launch], gpu: Gpu, dtype: str) -> float:
    """GPU time of a sequence of launches on one stream: their times plus one launch gap each."""
    return sum(launch_time(k, gpu, dtype).seconds for k in launches) + value("launch_gap_s") * len(launches)
