"""The contract suite's case table and the backends it runs on (tests/test_contract.py runs every case on every
backend; tests/conftest.py prints the per-backend tally from `summary_lines`).

A case is data only: shapes, dtypes, memory layouts, options and, for inputs the API must refuse, the error type
and a pattern the message must match (it names the argument). Names read as `<api>/<dtypes>/<what>`.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from math import prod
from typing import Optional

import torch

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
INTERPRETER_BF16 = "the Triton interpreter corrupts bfloat16 (triton-lang/triton#11584)"


@dataclass(frozen=True)
class Case:
    name: str
    api: str = "linear"  # linear | rows | merge | unmerge
    lead: tuple[int, ...] = (5,)  # leading dims of x; rows M = prod(lead)
    K: int = 37
    N: int = 23
    ranks: tuple[int, ...] = (5,)  # one adapter per entry, stacked along the rank axis
    dtype: torch.dtype = F32  # x, weight and bias
    adapter_dtype: Optional[torch.dtype] = None  # None: dtype
    x_dtype: Optional[torch.dtype] = None  # None: dtype (autocast cases and refusals differ)
    bias: Optional[str] = "contig"  # None | contig | strided ([::2] of a 2N vector)
    bias_dtype: Optional[torch.dtype] = None
    bias_device: Optional[str] = None  # e.g. "meta": must be refused
    x_layout: str = "contig"  # contig | row_pad | col_step | transposed (checks.strided_like)
    w_layout: str = "contig"
    ad_layout: str = "contig"  # lora_a and lora_b
    dy_layout: str = "contig"  # grad_output handed to backward
    scaling: tuple[float, ...] = (0.75,)  # one per adapter (exact in float32)
    per_rank_scale: bool = False  # pass a float32 tensor [R] instead (AdaLoRA-style)
    dropout: tuple[float, ...] = (0.0,)
    training: bool = False
    row_ids: Optional[tuple[int, ...]] = None  # per row of x.reshape(-1, K), or per sample (lead[0])
    check_ids: Optional[bool] = None  # None: not passed
    x_grad: bool = True  # False: backward without dx
    train_base: bool = False  # weight and bias require grad too
    autocast: Optional[torch.dtype] = None
    fan_in_fan_out: bool = False
    safe: bool = False
    overflow: bool = False  # merge: make one merged value overflow the weight's dtype
    weight_dtype: Optional[torch.dtype] = None  # merge refusals (integer weights)
    error: Optional[tuple] = None  # (exception type(s), regex the message must match)

    @property
    def M(self) -> int:
        return prod(self.lead)

    @property
    def rank_splits(self) -> Optional[list[int]]:
        return list(self.ranks) if len(self.ranks) > 1 or self.api == "rows" else None

    def dtypes_in_kernels(self) -> set:
        """Every dtype a kernel would load (the autocast dtype replaces the others under autocast); none for inputs
        refused before any kernel runs (a safe merge that overflows is refused by the kernel's own check)."""
        if self.error is not None and not self.overflow:
            return set()
        if self.autocast is not None:
            return {self.autocast}
        return {self.dtype, self.adapter_dtype or self.dtype, self.x_dtype or self.dtype}


def _case(name: str, **kw) -> Case:
    return Case(name=name, **kw)


_ODD = dict(lead=(5,), K=37, N=23)
DTYPE_NAMES = {F32: "fp32", F16: "fp16", BF16: "bf16", F64: "f64"}

CASES: list[Case] = []
# ---- lora_linear: forward and backward through autograd ----
for dt in (F32, F16, BF16, F64):
    CASES.append(_case(f"linear/{DTYPE_NAMES[dt]}/odd_shape", dtype=dt))
for dt in (F16, BF16, F64):
    CASES.append(_case(f"linear/fp32_adapters_over_{DTYPE_NAMES[dt]}/odd_shape", dtype=dt, adapter_dtype=F32))
for dt in (F32, F16, BF16):
    CASES.append(
        _case(
            f"linear/{DTYPE_NAMES[dt]}/row_strided_nan_pad_all_operands",
            dtype=dt,
            x_layout="row_pad",
            w_layout="row_pad",
            ad_layout="row_pad",
            dy_layout="row_pad",
        )
    )
CASES += [
    _case(
        "linear/fp32_adapters_over_bf16/row_strided_nan_pad_all_operands",
        dtype=BF16,
        adapter_dtype=F32,
        x_layout="row_pad",
        w_layout="row_pad",
        ad_layout="row_pad",
        dy_layout="row_pad",
    ),
    _case(
        "linear/fp32_adapters_over_fp16/row_strided_nan_pad_all_operands",
        dtype=F16,
        adapter_dtype=F32,
        x_layout="row_pad",
        w_layout="row_pad",
        ad_layout="row_pad",
        dy_layout="row_pad",
    ),
    _case("linear/bf16/row_strided_large_m", lead=(70,), dtype=BF16, x_layout="row_pad", dy_layout="row_pad"),
    _case("linear/fp32/column_strided_x", x_layout="col_step"),
    _case("linear/bf16/column_strided_x", dtype=BF16, x_layout="col_step"),
    _case("linear/fp32/transposed_views", x_layout="transposed", w_layout="transposed", ad_layout="transposed"),
    _case(
        "linear/fp16/transposed_views", dtype=F16, x_layout="transposed", w_layout="transposed", ad_layout="transposed"
    ),
    _case("linear/fp32/3d_input", lead=(2, 3)),
    _case("linear/fp16/3d_input_row_strided", lead=(2, 3), dtype=F16, x_layout="row_pad", dy_layout="row_pad"),
    _case("linear/fp32/noncontiguous_bias", bias="strided"),
    _case("linear/fp16/noncontiguous_bias", dtype=F16, bias="strided"),
    _case("linear/bf16/noncontiguous_bias", dtype=BF16, bias="strided"),
    _case("linear/fp32/noncontiguous_bias_large_m", lead=(70,), bias="strided"),
    _case("linear/fp32/no_bias", bias=None),
    _case("linear/fp32/m0", lead=(0,)),
    _case("linear/fp16/m0_3d", lead=(0, 4), dtype=F16),
    _case("linear/fp32/k0", K=0),
    _case("linear/fp16/k0", K=0, dtype=F16),
    _case("linear/fp32/n0", N=0),
    _case("linear/fp32/rank1", ranks=(1,)),
    _case("linear/fp16/rank1", ranks=(1,), dtype=F16),
    _case("linear/fp32/rank20_wider_than_16", ranks=(20,)),
    _case("linear/fp32/three_adapters_rank_splits", ranks=(1, 5, 3), scaling=(0.5, 2.0, 1.25)),
    _case("linear/bf16/three_adapters_rank_splits", ranks=(1, 5, 3), scaling=(0.5, 2.0, 1.25), dtype=BF16),
    _case("linear/fp32/per_rank_scale", ranks=(2, 5), per_rank_scale=True),
    _case("linear/fp32/no_dx", x_grad=False),
    _case("linear/fp32/trainable_weight_and_bias", train_base=True),
    _case("linear/fp32/dropout", dropout=(0.3,), training=True),
    _case("linear/fp16/dropout", dropout=(0.3,), training=True, dtype=F16),
    _case("linear/bf16/dropout", dropout=(0.3,), training=True, dtype=BF16),
    _case("linear/f64/dropout", dropout=(0.3,), training=True, dtype=F64),
    _case(
        "linear/fp32/dropout_per_adapter",
        ranks=(1, 5, 3),
        scaling=(0.5, 2.0, 1.25),
        dropout=(0.0, 0.25, 0.6),
        training=True,
    ),
    _case("linear/fp32/dropout_in_eval_is_off", dropout=(0.5,), training=False),
    _case(
        "linear/fp32/large_m_dropout_three_adapters",
        lead=(70,),
        ranks=(1, 5, 3),
        scaling=(0.5, 2.0, 1.25),
        dropout=(0.0, 0.25, 0.6),
        training=True,
        x_layout="row_pad",
    ),
    _case("linear/fp16/large_m", lead=(70,), dtype=F16),
    # autocast: low-precision x (as o_proj gets it), fp32 weights and adapters; nn.Linear's dtype rules
    _case("linear/autocast_bf16/bf16_x_fp32_weights", x_dtype=BF16, autocast=BF16),
    _case("linear/autocast_fp16/fp16_x_fp32_weights", x_dtype=F16, autocast=F16),
    _case("linear/autocast_bf16/fp32_x_fp32_weights", autocast=BF16),
    _case("linear/autocast_bf16/bf16_x_trainable_fp32_weight_and_bias", x_dtype=BF16, autocast=BF16, train_base=True),
    _case("linear/autocast_fp16/fp16_x_trainable_fp32_weight_and_bias", x_dtype=F16, autocast=F16, train_base=True),
    _case(
        "linear/autocast_bf16/bf16_x_dropout_three_adapters",
        x_dtype=BF16,
        autocast=BF16,
        ranks=(1, 5, 3),
        scaling=(0.5, 2.0, 1.25),
        dropout=(0.0, 0.25, 0.6),
        training=True,
    ),
    # refused: the message names the argument
    _case(
        "linear/refused/fp16_x_over_fp32_weight",
        x_dtype=F16,
        error=(TypeError, r"x \(shape \(5, 37\), torch\.float16.*weight"),
    ),
    _case(
        "linear/refused/fp32_x_over_bf16_weight",
        dtype=BF16,
        x_dtype=F32,
        error=(TypeError, r"x \(shape \(5, 37\), torch\.float32.*weight"),
    ),
    _case(
        "linear/refused/fp16_adapters_over_bf16",
        dtype=BF16,
        adapter_dtype=F16,
        error=(TypeError, r"lora_a .*torch\.float16"),
    ),
    _case(
        "linear/refused/fp16_bias_over_fp32_weight",
        bias_dtype=F16,
        error=(TypeError, r"bias \(shape \(23,\), torch\.float16"),
    ),
    _case(
        "linear/refused/bias_on_meta",
        bias_device="meta",
        error=((ValueError, TypeError), r"bias \(shape \(23,\), torch\.float32, meta"),
    ),
]
# ---- lora_linear_rows: one adapter (or none) per row ----
_ROWS = dict(api="rows", lead=(6,), ranks=(3, 5), scaling=(0.5, 1.5), row_ids=(0, -1, 1, 1, -1, 0))
for dt in (F32, F16, BF16, F64):
    CASES.append(_case(f"rows/{DTYPE_NAMES[dt]}/ids_with_minus1", dtype=dt, **_ROWS))
CASES += [
    _case("rows/fp32_adapters_over_bf16/ids_with_minus1", dtype=BF16, adapter_dtype=F32, **_ROWS),
    _case("rows/fp32_adapters_over_fp16/ids_with_minus1", dtype=F16, adapter_dtype=F32, **_ROWS),
    _case(
        "rows/fp32/row_strided_nan_pad_all_operands",
        x_layout="row_pad",
        w_layout="row_pad",
        ad_layout="row_pad",
        dy_layout="row_pad",
        **_ROWS,
    ),
    _case("rows/fp32/noncontiguous_bias", bias="strided", **_ROWS),
    _case(
        "rows/bf16/row_strided_nan_pad",
        dtype=BF16,
        x_layout="row_pad",
        ad_layout="row_pad",
        dy_layout="row_pad",
        **_ROWS,
    ),
    _case("rows/fp32/3d_input_ids_per_sample", **{**_ROWS, "lead": (2, 3), "row_ids": (1, 0)}),
    _case("rows/fp32/dropout", dropout=(0.3, 0.5), training=True, **_ROWS),
    _case("rows/fp32/rank1_and_rank5", **{**_ROWS, "ranks": (1, 5)}),
    _case("rows/fp16/large_m", **{**_ROWS, "lead": (70,), "row_ids": tuple((m % 3) - 1 for m in range(70))}, dtype=F16),
    _case(
        "rows/fp16/noncontiguous_bias_large_m",
        **{**_ROWS, "lead": (70,), "row_ids": tuple((m % 3) - 1 for m in range(70))},
        dtype=F16,
        bias="strided",
    ),
    _case("rows/fp32/m0", **{**_ROWS, "lead": (0,), "row_ids": ()}),
    _case("rows/fp32/k0", K=0, **_ROWS),
    _case("rows/fp32/n0", N=0, **_ROWS),
    _case(
        "rows/fp32/out_of_range_ids_unchecked_act_as_minus1",
        **{**_ROWS, "row_ids": (0, 2, -1, 7, 1, -3)},
        check_ids=False,
    ),
    _case(
        "rows/fp32/out_of_range_id_checked",
        **{**_ROWS, "row_ids": (0, 7, -1, 1, 1, 0)},
        check_ids=True,
        error=(ValueError, r"(row_ids|adapter_ids).*\b7\b"),
    ),
    _case(
        "rows/fp32/below_minus1_id_checked",
        **{**_ROWS, "row_ids": (0, -3, -1, 1, 1, 0)},
        check_ids=True,
        error=(ValueError, r"(row_ids|adapter_ids).*-3"),
    ),
    _case("rows/fp32/valid_ids_checked", check_ids=True, **_ROWS),
    _case("rows/autocast_bf16/bf16_x_fp32_weights", x_dtype=BF16, autocast=BF16, **_ROWS),
    _case("rows/autocast_fp16/fp16_x_fp32_weights", x_dtype=F16, autocast=F16, **_ROWS),
]
# ---- merge_ / unmerge_: in place, one rounding ----
_MERGE = dict(api="merge", ranks=(5,), scaling=(0.75,))
for dt in (F32, F16, BF16, F64):
    CASES.append(_case(f"merge/{DTYPE_NAMES[dt]}/rounded_once", dtype=dt, **_MERGE))
for dt in (F16, BF16):
    CASES.append(
        _case(f"merge/fp32_adapters_over_{DTYPE_NAMES[dt]}/rounded_once", dtype=dt, adapter_dtype=F32, **_MERGE)
    )
CASES += [
    _case("merge/bf16/fan_in_fan_out", dtype=BF16, fan_in_fan_out=True, **_MERGE),
    _case(
        "merge/fp16/fan_in_fan_out_three_adapters",
        dtype=F16,
        fan_in_fan_out=True,
        **{**_MERGE, "ranks": (1, 5, 3), "scaling": (0.5, 2.0, 1.25)},
    ),
    _case("merge/fp32/rank1_strided_adapters", ad_layout="row_pad", **{**_MERGE, "ranks": (1,)}),
    _case("merge/fp16/per_rank_scale", dtype=F16, per_rank_scale=True, **{**_MERGE, "ranks": (2, 5)}),
    _case("merge/fp16/k0", K=0, dtype=F16, **_MERGE),
    _case("merge/fp32/n0", N=0, **_MERGE),
    _case("merge/bf16/safe_no_overflow_writes", dtype=BF16, safe=True, **_MERGE),
    _case("unmerge/fp16/rounded_once", api="unmerge", dtype=F16),
    _case("unmerge/bf16/fan_in_fan_out", api="unmerge", dtype=BF16, fan_in_fan_out=True),
    _case(
        "unmerge/fp32_adapters_over_fp16/three_adapters",
        api="unmerge",
        dtype=F16,
        adapter_dtype=F32,
        ranks=(1, 5, 3),
        scaling=(0.5, 2.0, 1.25),
    ),
    # refused: the weight stays bit-identical
    _case(
        "merge/fp16/safe_overflow_refused",
        dtype=F16,
        safe=True,
        overflow=True,
        error=(ValueError, r"weight \(shape \(23, 37\), torch\.float16.*non-finite"),
        **_MERGE,
    ),
    _case(
        "merge/fp32/safe_overflow_refused",
        dtype=F32,
        safe=True,
        overflow=True,
        error=(ValueError, r"weight \(shape \(23, 37\), torch\.float32.*non-finite"),
        **_MERGE,
    ),
    _case(
        "unmerge/bf16/safe_overflow_refused",
        api="unmerge",
        dtype=BF16,
        safe=True,
        overflow=True,
        error=(ValueError, r"weight \(shape \(23, 37\), torch\.bfloat16.*non-finite"),
    ),
    _case("merge/refused/int8_weight", weight_dtype=torch.int8, error=(TypeError, r"weight .*torch\.int8"), **_MERGE),
    _case(
        "merge/refused/int32_weight", weight_dtype=torch.int32, error=(TypeError, r"weight .*torch\.int32"), **_MERGE
    ),
    _case("merge/refused/bool_weight", weight_dtype=torch.bool, error=(TypeError, r"weight .*torch\.bool"), **_MERGE),
    _case(
        "merge/refused/row_strided_weight",
        w_layout="row_pad",
        error=(ValueError, r"weight \(shape \(23, 37\).*contiguous"),
        **_MERGE,
    ),
]

_names = [c.name for c in CASES]
assert len(_names) == len(set(_names)), "case names must be unique"


# ---- backends ----
@dataclass(frozen=True)
class Backend:
    name: str  # the test id: reference, cpp[<isa>], cublas, triton, cuda, cuda[cublas]
    env: str  # FUSED_LORA_BACKEND while the case runs
    device: str = "cpu"
    isa: Optional[str] = None  # cpp: the ISA path forced for the case (cpp_backend.use_isa)
    interpreter: bool = False  # Triton kernels run by TRITON_INTERPRET=1
    unavailable: Optional[str] = None  # why it cannot run here (its cases skip, or fail on CI)
    env_extra: tuple[tuple[str, str], ...] = ()  # further environment switches while the case runs
    only_16bit: bool = False  # a variant of the 16-bit base GEMM of lora_linear(_rows): runs only those cases
    only_gemm: bool = False  # a variant of the base GEMM of lora_linear(_rows): runs only those cases

    def runs(self, case: Case) -> bool:
        if self.only_gemm and case.api not in ("linear", "rows"):
            return False
        if not self.only_16bit:
            return True
        return case.api in ("linear", "rows") and bool(case.dtypes_in_kernels() & {F16, BF16})

    def skip_reason(self, case: Case) -> Optional[str]:
        """Only what this backend cannot run on this machine: bf16 through the Triton interpreter, an autocast dtype
        this torch does not autocast to on the device."""
        if self.interpreter and BF16 in case.dtypes_in_kernels():
            return INTERPRETER_BF16
        if case.autocast is not None and not autocast_supported(self.device, case.autocast):
            return f"torch {torch.__version__} has no {self.device} autocast to {case.autocast}"
        return None


def autocast_supported(device: str, dtype: torch.dtype) -> bool:
    """Whether torch.autocast(device, dtype) really autocasts (torch disables it, with a warning, otherwise)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.autocast(device, dtype=dtype):
            return torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == dtype


def _cpp_backends() -> list[Backend]:
    from fused_lora.ops.backends import _import_cpp

    module, why = _import_cpp()
    if module is None:
        return [Backend("cpp", "cpp", unavailable=f"C++ backend not built ({why})")]
    if not hasattr(module, "isa_paths"):  # before ISA switching exists: the one path the machine picks
        return [Backend("cpp", "cpp")]
    out = []
    for isa in module.isa_paths():
        out.append(Backend(f"cpp[{isa}]", "cpp", isa=isa))
        # the other 16-bit base GEMM of each dtype (CONTRACT.md): fp16 with two roundings, bf16 with one
        out.append(
            Backend(
                f"cpp[{isa},alt_16bit_gemm]",
                "cpp",
                isa=isa,
                only_16bit=True,
                env_extra=(("FUSED_LORA_CPU_FP16_FAST", "1"), ("FUSED_LORA_CPU_BF16_EXACT", "1")),
            )
        )
        if hasattr(module, "BASE_GEMMS"):  # each base GEMM forced (csrc/gemm_choice.h), whatever the rule picks here
            for gemm in module.BASE_GEMMS:
                out.append(
                    Backend(
                        f"cpp[{isa},gemm={gemm}]",
                        "cpp",
                        isa=isa,
                        only_gemm=True,
                        only_16bit=gemm == "mixed",
                        env_extra=(("FUSED_LORA_CPU_GEMM", gemm),),
                    )
                )
    return out


def available_backends(device_option: str = "cpu") -> list[Backend]:
    """Every backend this run covers, in order; unavailable ones carry the reason. `device_option` is pytest's
    --device: "cpu" runs Triton under the interpreter on CPU tensors, "cuda" runs the compiled kernels on CUDA
    tensors (the interpreter is off for the whole process then, see tests/conftest.py)."""
    out = [Backend("reference", "reference")]
    out += _cpp_backends()
    # the cuBLAS composition the CUDA dispatch may pick per shape: plain torch ops, so it runs on CPU tensors too
    out.append(Backend("cublas", "cublas"))
    try:
        import triton  # noqa: F401

        triton_missing = None
    except ImportError as exc:
        triton_missing = f"triton not installed ({exc})"
    if device_option == "cuda":
        out.append(Backend("cuda", "triton", device="cuda", unavailable=triton_missing))
        out.append(Backend("cuda[cublas]", "cublas", device="cuda"))
    elif os.environ.get("TRITON_INTERPRET") == "1":
        out.append(Backend("triton", "triton", interpreter=True, unavailable=triton_missing))
    return out


def not_run_lines(device_option: str = "cpu") -> list[str]:
    if device_option == "cuda":
        return ["triton (CPU tensors, interpreter): not run (--device cuda turns the interpreter off)"]
    why = "no CUDA device" if not torch.cuda.is_available() else "run pytest with --device cuda"
    return [f"cuda (compiled Triton, CUDA tensors): not run ({why})"]


# ---- the per-backend tally printed at the end of a run (tests/conftest.py) ----
BACKEND_PROPERTY = "contract_backend"


def summary_lines(stats: dict, device_option: str = "cpu") -> list[str]:
    """One line per backend: cases run and their outcomes (from the reports' user_properties)."""
    tally: dict[str, dict[str, int]] = {}
    for outcome in ("passed", "failed", "skipped", "error"):
        for rep in stats.get(outcome, []):
            backend = dict(getattr(rep, "user_properties", ())).get(BACKEND_PROPERTY)
            if backend is None or (outcome == "passed" and getattr(rep, "when", "call") != "call"):
                continue
            counts = tally.setdefault(backend, {})
            counts[outcome] = counts.get(outcome, 0) + 1
    if not tally:
        return []
    lines = []
    for backend in sorted(tally, key=list(tally).index):
        counts = tally[backend]
        detail = ", ".join(f"{counts[k]} {k}" for k in ("passed", "failed", "error", "skipped") if counts.get(k))
        lines.append(f"{backend}: {sum(counts.values())} cases: {detail}")
    return lines + not_run_lines(device_option)
