"""What the device-aware tests run on each device (`pytest --device cpu|cuda`, tests/conftest.py).

cpu (default): the Triton kernels under the interpreter, float32 and float16. bfloat16 cases are collected and
    skipped: the interpreter corrupts bf16 loads and dots silently (triton-lang/triton#11584).
cuda: compiled kernels, bfloat16 included, on the cases marked for the GPU. Each distinct kernel specialization
    compiles in 2-6 s on first use, so the GPU list is kept to a few dozen specializations;
    FUSED_LORA_GPU_TESTS=all runs every case there.
Inputs are drawn on the CPU (the same numbers on every device) and moved with their strides; the float64
reference and PyTorch's same-dtype result stay on the CPU, so the judgement (tests/checks.py) is the same rule.
"""

from __future__ import annotations

import os
from typing import Callable, Iterable, Optional, Sequence

import pytest
import torch

BF16_UNDER_INTERPRETER = (
    "the Triton interpreter corrupts bfloat16 silently (triton-lang/triton#11584); bf16 runs with --device cuda"
)


def move(t: Optional[torch.Tensor], device: torch.device) -> Optional[torch.Tensor]:
    """t on `device` with the same sizes and strides (a plain .to() makes sliced tensors contiguous)."""
    if t is None or t.device.type == torch.device(device).type:
        return t
    out = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device)
    out.copy_(t)
    return out


def cpu(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.detach().cpu()


def device_params(
    config, cases: Sequence, ids: Sequence[str], on_gpu: Iterable[bool], dtype_of: Callable[[object], torch.dtype]
) -> list:
    """pytest.param list for --device: every case on cpu (bf16 ones skipped), the GPU-marked ones on cuda."""
    cuda = config.getoption("--device") == "cuda"
    every_case = os.environ.get("FUSED_LORA_GPU_TESTS", "").strip().lower() == "all"
    params = []
    for case, case_id, gpu in zip(cases, ids, on_gpu):
        if cuda and not (gpu or every_case):
            continue
        marks = (
            [pytest.mark.skip(reason=BF16_UNDER_INTERPRETER)] if (not cuda and dtype_of(case) == torch.bfloat16) else []
        )
        params.append(pytest.param(case, id=case_id, marks=marks))
    return params


def dtypes_for(config, dtypes: Sequence[torch.dtype]) -> list:
    """pytest.param list of dtypes, bf16 skipped on cpu (for tests parametrized by dtype alone)."""
    cuda = config.getoption("--device") == "cuda"
    return [
        pytest.param(
            dt,
            id=str(dt).replace("torch.", ""),
            marks=[pytest.mark.skip(reason=BF16_UNDER_INTERPRETER)] if (not cuda and dt == torch.bfloat16) else [],
        )
        for dt in dtypes
    ]
