"""A MODEL of kernel launches' time on a GPU, from grids, bytes, FLOPs and occupancy. Not a measurement.

Every number not counted from the code is an assumption, named in ASSUMPTIONS with its range and its evidence and
printed by every table that uses it (`describe_assumptions`). One rule times every launch, cuBLAS's and ours:

    compute  the busiest SM runs ceil(programs / SMs) of the launch's programs (co-resident programs share its
             tensor cores), each at  peak / SMs x gemm_eff x core factor.  peak: what cuBLAS reaches at its best
             shape (Gpu.peak); gemm_eff: what a cuBLAS-class GEMM keeps of it at these shapes; core factor: 1 for
             cuBLAS, triton_core_eff / tma_core_eff for our GEMM cores (1 at "parity", issue 13's premise).
             cuBLAS's programs: its 128 x 128 output tiles (`cublas_programs`), split along K when the output has
             too few tiles to fill the SMs. A GEMM's tile re-reads through L2 are inside these factors, not a
             separate bound (see the evidence of gemm_eff).
    memory   compulsory HBM bytes at mem_eff of copy bandwidth. Triton launches also need the SMs to keep enough
             bytes in flight: each SM pulls min(per_sm_bw, resident programs x bytes in flight / latency), and the
             busiest SM must move its ceil(programs / SMs) programs' bytes at that rate.
    L2       (Triton) bytes re-read through L2 outside a GEMM core's tiles (split partials, whole-W re-reads of the
             plans before issue 13) at the L2 bandwidth.
    tail     (Triton) dependent round trips after the K loop that a plain GEMM does not make (the split-K ticket,
             the partials, the rank term's t and B): exposed once, at the end of the last programs.
    time = max(compute, memory, L2) + tail; each launch adds launch_gap_s on the stream.
Programmatic dependent launch (PDL, `overlap`): a consumer launched with launch_pdl overlaps its producer; the pair
costs the longest of: producer + pdl_release_s + the consumer's tail (and its store) after the producer's end;
pdl_start_s + the consumer alone; both launches' bytes at the consumer's bandwidth; both launches' compute.
Host (Python) time is a separate figure compared with GPU time by the caller: eager calls cost max(GPU, host),
CUDA graphs remove host time.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional

KIB = 1024
MIB = 2**20


@dataclass(frozen=True)
class Gpu:
    name: str
    sms: int
    bandwidth: float  # bytes/s a copy kernel reaches from HBM
    l2_bandwidth: float  # bytes/s from L2 to the SMs, all SMs together
    peak: Dict[str, float]  # FLOP/s a large cuBLAS GEMM reaches at its best shape, per dtype
    regs_per_sm: int = 65536
    smem_per_sm: int = 228 * KIB
    max_warps_per_sm: int = 64
    max_ctas_per_sm: int = 32
    source: str = ""


# Published figures (SXM parts), as reached by real kernels rather than the spec sheet (DESIGN.md section 3).
GPUS = {
    "H100": Gpu(
        "H100",
        132,
        3.0e12,
        5.5e12,
        {"bfloat16": 800e12, "float16": 800e12, "float32": 60e12},
        source="H100 SXM: 132 SMs; 3.0 TB/s reached by copies (spec 3.35); 800 TFLOP/s bf16, the best "
        "cuBLAS shape (794.5 TFLOP/s measured by stas00/ml-engineering's mamf-finder, spec 989); "
        "60 TFLOP/s fp32 without TF32 (spec 67); ~5.5 TB/s L2 (Chips and Cheese's H100 PCIe "
        "measurement: a floor for the SXM part, used only for re-reads outside GEMM tiles); 64K "
        "registers and 228 KiB shared memory per SM",
    ),
    "A100": Gpu(
        "A100",
        108,
        1.8e12,
        4.0e12,
        {"bfloat16": 280e12, "float16": 280e12, "float32": 19.5e12},
        smem_per_sm=164 * KIB,
        source="A100 SXM 80GB: 108 SMs, 1.8 TB/s copy (spec 2.04), ~4 TB/s L2, 280 TFLOP/s bf16 by "
        "cuBLAS (271 measured by mamf-finder, spec 312), 19.5 TFLOP/s fp32, 64K regs and 164 KiB "
        "smem per SM",
    ),
}

# cuBLAS's output tile on sm_90 for these bf16/fp16 shapes: its kernels are named ..._tilesize128x128x64_... in
# public profiles (triton-lang/triton#5726, H100); 128 x 256 tiles also exist, the wave rule treats both alike
CUBLAS_TILE = (128, 128)
# an output with fewer tiles than SMs is split along K (cuBLAS's split-K / stream-K kernels) down to splits of this
# length: an assumption about cuBLAS's heuristics, which also pick smaller tiles for small outputs
CUBLAS_MIN_SPLIT_K = 256


@dataclass(frozen=True)
class Assumption:
    value: float
    low: float
    high: float
    unit: str
    why: str


# The numbers the model does not count from code. Each has a plausible range and the evidence for it; the dispatch
# treats a modelled margin smaller than the spread these ranges imply as "unknown" (and then takes cuBLAS).
ASSUMPTIONS: Dict[str, Assumption] = {
    "gemm_eff": Assumption(
        0.80,
        0.70,
        0.95,
        "x peak",
        "cuBLAS-class GEMM at K ~ 4096 vs the best-shape peak, beyond tile waves: H100 cuBLAS "
        "fp16 at M=2048, N=K=2048/4096/8192 measured 515/614/722 TFLOP/s (triton-lang/triton"
        "#2339), 0.73/0.81/0.94 of this rule at 1.0 once a 3 us launch gap is taken out; an "
        "L2-bound rule (128x128 tiles re-read at 5.5 TB/s: 352 TFLOP/s) is refuted by the same "
        "numbers",
    ),
    "triton_core_eff": Assumption(
        0.80,
        0.75,
        0.85,
        "x cuBLAS",
        "Triton tutorial GEMM core (cp.async + wgmma, 128x128 tiles, no multicast, 1 tile "
        "per CTA) vs cuBLAS: 70-85% on H100 at M >= 2048 (issue 15); tutorial 03 measured "
        "0.90 at 3072^3, 0.38 at 2048^3 (triton-lang/triton#3672); 1.0 = parity",
    ),
    "tma_core_eff": Assumption(
        0.90,
        0.80,
        0.97,
        "x cuBLAS",
        "Hopper core (TMA + persistent grid), unmeasured; used only where selected: "
        "tritonbench's TMA persistent bf16 GEMM 666 TFLOP/s at 8192x8192x4096",
    ),
    "mem_eff": Assumption(
        0.90,
        0.85,
        0.95,
        "x copy BW",
        "memory-bound GEMV / split-K / elementwise kernels vs a copy; also the ceiling of ours",
    ),
    "latency_s": Assumption(0.8e-6, 0.7e-6, 0.9e-6, "s", "loaded HBM latency (Little's law for bytes in flight)"),
    "per_sm_bw": Assumption(
        34e9,
        25e9,
        45e9,
        "B/s",
        "load bandwidth one SM can pull: 1.5x its fair share of 3.0 TB/s (a copy reaches the "
        "copy rate on about two thirds of the SMs)",
    ),
    "epilogue_rt_s": Assumption(
        0.5e-6,
        0.3e-6,
        0.8e-6,
        "s",
        "one dependent round trip after a K loop (split ticket atomic, partials just "
        "written, t, B: L2-resident, the W stream over): above an unloaded L2 hit (200-300 "
        "cycles), at most a loaded HBM trip (latency_s)",
    ),
    "launch_gap_s": Assumption(
        3e-6,
        2e-6,
        4e-6,
        "s",
        "GPU time a kernel boundary costs on a busy stream (launch, ramp-up, drain): 2 us in "
        "GPU-REVIEW.md, 3 us in issue 15's model; unmeasured here",
    ),
    "pdl_start_s": Assumption(
        1.0e-6,
        0.5e-6,
        2.0e-6,
        "s",
        "PDL: a consumer's first programs start this long after its producer's (scheduled "
        "onto the SMs the producer leaves free); unmeasured, FUSED_LORA_PDL is off by default",
    ),
    "pdl_release_s": Assumption(
        0.5e-6,
        0.3e-6,
        1.0e-6,
        "s",
        "PDL: the consumer's gdc_wait returns this long after the producer's last program "
        "ends (completion and memory flush, the part of a launch gap PDL cannot hide); "
        "unmeasured",
    ),
    "host_torch_op_s": Assumption(5e-6, 3e-6, 8e-6, "s", "host time of one eager torch op (dispatcher + launch)"),
    "host_triton_launch_s": Assumption(10e-6, 5e-6, 20e-6, "s", "host time of one Triton launch from Python"),
    "host_fused_call_s": Assumption(
        15e-6,
        10e-6,
        30e-6,
        "s",
        "fused_lora layer call before its launches: `bench --ops host` measured the "
        "plan + eager op path at ~2-3 us over nn.Linear's with the backend stubbed "
        "(benchmarks/PERFORMANCE.md, CPU, loaded machine); 150 us before issue 14",
    ),
    "host_peft_call_s": Assumption(45e-6, 40e-6, 50e-6, "s", "PEFT LoRA Linear call (DESIGN.md 6)"),
    "host_linear_call_s": Assumption(9e-6, 8e-6, 10e-6, "s", "nn.Linear call (DESIGN.md 6)"),
}


# the end of each range that favours the cuBLAS composition over our Triton kernels (the dispatch's test)
AGAINST_TRITON = {
    "gemm_eff": "low",
    "triton_core_eff": "low",
    "tma_core_eff": "low",
    "mem_eff": "high",
    "latency_s": "high",
    "per_sm_bw": "low",
    "epilogue_rt_s": "high",
    "launch_gap_s": "low",
    "pdl_start_s": "high",
    "pdl_release_s": "high",
}
# issue 13's targets are stated with the GEMM core at parity: our cores as fast as cuBLAS on the same tiles
PARITY = {"triton_core_eff": 1.0, "tma_core_eff": 1.0}
_overrides: Dict[str, float] = {}


def value(name: str) -> float:
    return _overrides.get(name, ASSUMPTIONS[name].value)


@contextmanager
def assumed(values: Dict[str, float]) -> Iterator[None]:
    """Evaluate with some assumptions set to given values ({name: value}), e.g. PARITY."""
    saved = dict(_overrides)
    try:
        for name, v in values.items():
            if name not in ASSUMPTIONS:
                raise KeyError(f"no assumption named {name!r}; known: {', '.join(ASSUMPTIONS)}")
            _overrides[name] = float(v)
        yield
    finally:
        _overrides.clear()
        _overrides.update(saved)


@contextmanager
def scenario(ends: Dict[str, str]) -> Iterator[None]:
    """Evaluate with some assumptions at an end of their range: {name: "low" | "high"}."""
    with assumed(
        {name: ASSUMPTIONS[name].low if end == "low" else ASSUMPTIONS[name].high for name, end in ends.items()}
    ):
        yield


def parity():
    """Our GEMM cores at cuBLAS's efficiency (issue 13's "GEMM core at parity")."""
    return assumed(PARITY)


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
    """One kernel launch: what it moves and computes, and how it is laid out on the GPU."""

    name: str
    bytes: float  # compulsory HBM traffic (each operand read once, each result written once)
    flops: float
    engine: str  # "cublas" | "torch" | "triton"
    programs: int = 0  # triton: the grid; cublas: its tiles (cublas_programs); 0: fills the GPU
    occupancy: Optional[Occupancy] = None
    in_flight: float = 0.0  # triton: bytes one program keeps in flight (pipeline stages x tile loads)
    l2_bytes: float = 0.0  # triton: traffic served by L2 outside a GEMM core's tiles
    core: str = "tutorial"  # triton GEMM core: "tutorial" or "tma" (picks the efficiency assumption)
    note: str = ""
    tail_latencies: int = 0  # triton: dependent round trips after the K loop (kernels/launch_plan.Launch)
    tail_bytes: float = 0.0  # triton: bytes moved from the end of the K loop on
    pdl: bool = False  # overlaps the launch before it (programmatic dependent launch)


@dataclass(frozen=True)
class LaunchTime:
    seconds: float
    bound: str  # "compute" | "memory" | "L2"
    ctas_per_sm: int = 0
    waves: float = 0.0
    detail: Dict[str, float] = field(default_factory=dict)

    @property
    def bandwidth(self) -> float:
        """Bytes/s the launch streams at (the memory rule's rate)."""
        return self.detail["bandwidth"]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def cublas_programs(M: int, N: int, K: int, sms: int = 132) -> int:
    """cuBLAS's programs for an [M, K] x [K, N] GEMM: its CUBLAS_TILE output tiles, split along K (split-K /
    stream-K kernels) while that fills more of the SMs and leaves each split CUBLAS_MIN_SPLIT_K or more of K."""
    tiles = _cdiv(max(M, 1), CUBLAS_TILE[0]) * _cdiv(max(N, 1), CUBLAS_TILE[1])
    splits = max(1, min(sms // tiles if tiles < sms else 1, K // CUBLAS_MIN_SPLIT_K))
    return tiles * splits


def _core_factor(launch: Launch) -> float:
    if launch.engine != "triton":
        return 1.0
    return value("tma_core_eff") if launch.core == "tma" else value("triton_core_eff")


def compute_seconds(launch: Launch, gpu: Gpu, dtype: str) -> float:
    """The busiest SM's share of the FLOPs at its tensor-core rate (the wave rule)."""
    if launch.engine == "torch" or not launch.flops:
        return 0.0
    programs = max(1, launch.programs or gpu.sms)
    per_sm_rate = gpu.peak[dtype] / gpu.sms * value("gemm_eff") * _core_factor(launch)
    return math.ceil(programs / gpu.sms) * (launch.flops / programs) / per_sm_rate


def launch_time(launch: Launch, gpu: Gpu, dtype: str) -> LaunchTime:
    if launch.engine not in ("cublas", "torch", "triton"):
        raise ValueError(f"unknown engine {launch.engine!r}")
    compute = compute_seconds(launch, gpu, dtype)
    ceiling = gpu.bandwidth * value("mem_eff")  # no kernel streams faster than a good GEMV does
    if launch.engine != "triton":
        memory = launch.bytes / ceiling
        seconds = max(compute, memory)
        return LaunchTime(
            seconds,
            "compute" if compute >= memory else "memory",
            0,
            0.0,
            {"compute_s": compute, "memory_s": memory, "l2_s": 0.0, "tail_s": 0.0, "bandwidth": ceiling},
        )
    occ = launch.occupancy or Occupancy(128, 64 * KIB, 4, "estimated")
    ctas = max(1, occ.ctas_per_sm(gpu))
    programs = max(1, launch.programs)
    per_sm_programs = math.ceil(programs / gpu.sms)
    resident = min(ctas, per_sm_programs)
    per_sm = (
        min(value("per_sm_bw"), resident * launch.in_flight / value("latency_s"))
        if launch.in_flight
        else value("per_sm_bw")
    )
    bandwidth = min(ceiling, min(gpu.sms, programs) * per_sm)
    memory = max(launch.bytes / bandwidth, per_sm_programs * (launch.bytes / programs) / per_sm)
    l2 = launch.l2_bytes / gpu.l2_bandwidth
    tail = launch.tail_latencies * value("epilogue_rt_s")
    body = max(compute, memory, l2)
    bound = "compute" if body == compute else ("memory" if body == memory else "L2")
    return LaunchTime(
        body + tail,
        bound,
        ctas,
        programs / (gpu.sms * ctas),
        {
            "compute_s": compute,
            "memory_s": memory,
            "l2_s": l2,
            "tail_s": tail,
            "bandwidth": launch.bytes / memory if memory else bandwidth,
        },
    )


def overlap(producer: Launch, consumer: Launch, gpu: Gpu, dtype: str) -> dict:
    """A producer and the PDL consumer that overlaps it, from the producer's start to the consumer's end (launch
    gaps not included). The longest of:
        dependency  producer alone + pdl_release + the consumer's tail round trips and its store (epilogue_rt_s
                    each) + its tail bytes at the memory ceiling: nothing after the consumer's gdc_wait can
                    start before the producer has completed and flushed
        consumer    pdl_start + the consumer alone
        HBM         both launches' bytes at the consumer's own streaming rate (they share HBM)
        compute     both launches' tensor-core time, L2 both launches' L2 bytes
    Returns {"seconds", "bound": the longest term's name, "terms"}."""
    alone_p, alone_c = launch_time(producer, gpu, dtype), launch_time(consumer, gpu, dtype)
    after = (consumer.tail_latencies + 1) * value("epilogue_rt_s") + consumer.tail_bytes / (
        gpu.bandwidth * value("mem_eff")
    )
    terms = {
        "dependency": alone_p.seconds + value("pdl_release_s") + after,
        "consumer": value("pdl_start_s") + alone_c.seconds,
        "HBM": (producer.bytes + consumer.bytes) / alone_c.bandwidth,
        "compute": alone_p.detail["compute_s"] + alone_c.detail["compute_s"],
        "L2": (alone_p.detail["l2_s"] + alone_c.detail["l2_s"]),
    }
    bound = max(terms, key=terms.get)
    return {"seconds": terms[bound], "bound": bound, "terms": terms}


def plan_seconds(launches: List[Launch], gpu: Gpu, dtype: str) -> float:
    """GPU time of launches on one stream: each launch plus a launch gap; a PDL consumer (Launch.pdl) has no gap of
    its own and overlaps the launch before it (`overlap`)."""
    total = 0.0
    for i, lc in enumerate(launches):
        if i + 1 < len(launches) and launches[i + 1].pdl:
            continue  # the pair is counted at its consumer
        if lc.pdl and i > 0:
            total += overlap(launches[i - 1], lc, gpu, dtype)["seconds"]
        else:
            total += launch_time(lc, gpu, dtype).seconds
        total += value("launch_gap_s")
    return total
