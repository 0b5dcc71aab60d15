"""The implementations compared, each set up once per case as a zero-argument callable.

    merged  F.linear with a weight of the same shape: what a merged model costs (the floor)
    peft    the real peft package: peft.tuners.lora.layer.Linear around an nn.Linear
    addmm   the cuBLAS composition Unsloth publishes: out = x W^T; out.addmm_(x A^T, B^T, alpha=s)
    fused   fused_lora (lora_linear / lora_linear_rows / merge_), on whichever backend serves the device

All use the same W, A, B (adapters in x's dtype), no bias (Llama projections have none), dropout 0, and 2-D x
of M tokens ([S, M/S, K] for mixed batches, where PEFT selects adapters per sample).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

import fused_lora

OPS = ("forward", "forward_backward", "merge", "mixed_forward")
IMPLS = ("merged", "peft", "addmm", "fused")
LORA_ALPHA = 16.0


@dataclass(frozen=True)
class Case:
    op: str
    M: int
    K: int
    N: int
    r: int
    dtype: torch.dtype
    n_adapters: int = 1

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")

    @property
    def label(self) -> str:
        tokens = "" if self.op == "merge" else f" M={self.M}"
        text = f"{self.op} {self.dtype_name}{tokens} {self.K}->{self.N} r={self.r}"
        return text + (f" adapters={self.n_adapters}" if self.op == "mixed_forward" else "")


@dataclass
class Setup:
    fns: Dict[str, Callable[[], object]]
    baseline: Optional[str]
    after_each: Dict[str, Callable[[], object]] = field(default_factory=dict)


def _tensors(case: Case, device: torch.device, n_adapters: int = 1):
    gen = torch.Generator(device="cpu").manual_seed(0)
    K, N, r = case.K, case.N, case.r

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=case.dtype)

    weight = rand(N, K, scale=K**-0.5)
    lora_a = rand(n_adapters * r, K, scale=K**-0.5)
    lora_b = rand(N, n_adapters * r, scale=r**-0.5)
    x = rand(case.M, K)
    return x, weight, lora_a, lora_b


def _peft_layer(weight: torch.Tensor, adapters: List[tuple], r: int):
    """A PEFT LoRA Linear around nn.Linear(weight), one adapter per (name, A, B)."""
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as PeftLoraLinear

    base = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        base.weight.copy_(weight)
    base.weight.requires_grad_(False)
    config = LoraConfig(r=r, lora_alpha=LORA_ALPHA, lora_dropout=0.0, init_lora_weights=False)
    name0, _, _ = adapters[0]
    layer = PeftLoraLinear(base, name0, config=config, r=r, lora_alpha=LORA_ALPHA)
    for name, _, _ in adapters[1:]:
        layer.update_layer(name, r, lora_alpha=LORA_ALPHA, config=config)
    layer.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        for name, a, b in adapters:
            layer.lora_A[name].weight.copy_(a)
            layer.lora_B[name].weight.copy_(b)
    layer.set_adapter([name for name, _, _ in adapters])
    return layer


def _forward(case: Case, device: torch.device) -> Setup:
    x, weight, lora_a, lora_b = _tensors(case, device)
    s = LORA_ALPHA / case.r
    merged_weight = weight.clone()  # the same shape and dtype is all the floor needs
    peft = _peft_layer(weight, [("default", lora_a, lora_b)], case.r).eval()

    def merged():
        with torch.no_grad():
            return F.linear(x, merged_weight)

    def peft_call():
        with torch.no_grad():
            return peft(x)

    def addmm():
        with torch.no_grad():
            out = F.linear(x, weight)
            return out.addmm_(x @ lora_a.T, lora_b.T, alpha=s)

    def fused():
        with torch.no_grad():
            return fused_lora.lora_linear(x, weight, None, lora_a, lora_b, s)

    return Setup({"merged": merged, "peft": peft_call, "addmm": addmm, "fused": fused}, baseline="merged")


def _forward_backward(case: Case, device: torch.device) -> Setup:
    """W frozen, A and B trainable, x requires grad (a layer inside a network): grads are reset, not summed."""
    x0, weight, a0, b0 = _tensors(case, device)
    s = LORA_ALPHA / case.r
    gen = torch.Generator(device="cpu").manual_seed(1)
    dy = torch.randn(case.M, case.N, generator=gen).to(device=device, dtype=case.dtype)
    merged_weight = weight.clone()
    peft = _peft_layer(weight, [("default", a0, b0)], case.r).train()
    peft_params = [peft.lora_A["default"].weight, peft.lora_B["default"].weight]
    xs = {name: x0.clone().requires_grad_(True) for name in IMPLS}
    lora_a = a0.clone().requires_grad_(True)
    lora_b = b0.clone().requires_grad_(True)

    def step(name, forward, params):
        x = xs[name]

        def call():
            x.grad = None
            for p in params:
                p.grad = None
            forward(x).backward(dy)

        return call

    def addmm_forward(x):
        out = F.linear(x, weight)
        return out.addmm_(x @ lora_a.T, lora_b.T, alpha=s)

    fns = {
        "merged": step("merged", lambda x: F.linear(x, merged_weight), []),
        "peft": step("peft", peft, peft_params),
        "addmm": step("addmm", addmm_forward, [lora_a, lora_b]),
        "fused": step(
            "fused",
            lambda x: fused_lora.lora_linear(x, weight, None, lora_a, lora_b, s, training=True),
            [lora_a, lora_b],
        ),
    }
    return Setup(fns, baseline="merged")


def _mixed_forward(case: Case, device: torch.device) -> Setup:
    """Mixed batch: S sequences, sequence i uses adapter i % n (PEFT's adapter_names, our per-row ids)."""
    n = case.n_adapters
    x2, weight, lora_a, lora_b = _tensors(case, device, n_adapters=n)
    s = LORA_ALPHA / case.r
    sequences = min(16, case.M)
    if case.M % sequences:
        raise ValueError(f"mixed batch needs M ({case.M}) divisible by the number of sequences ({sequences})")
    x = x2.reshape(sequences, case.M // sequences, case.K)
    names = [f"adapter{i}" for i in range(n)]
    r = case.r
    peft = _peft_layer(
        weight, [(names[i], lora_a[i * r : (i + 1) * r], lora_b[:, i * r : (i + 1) * r]) for i in range(n)], r
    ).eval()
    per_sequence = [i % n for i in range(sequences)]
    adapter_names = [names[i] for i in per_sequence]
    row_ids = torch.tensor(per_sequence, dtype=torch.int64, device=device)
    merged_weight = weight.clone()

    def merged():
        with torch.no_grad():
            return F.linear(x, merged_weight)

    def peft_call():
        with torch.no_grad():
            return peft(x, adapter_names=adapter_names)

    def fused():
        with torch.no_grad():
            return fused_lora.lora_linear_rows(x, weight, None, lora_a, lora_b, s, [r] * n, row_ids)

    return Setup({"merged": merged, "peft": peft_call, "fused": fused}, baseline="merged")


def _merge(case: Case, device: torch.device) -> Setup:
    """In-place merge of one adapter into W; W is restored (untimed) after every call."""
    _, weight, lora_a, lora_b = _tensors(case, device)
    s = LORA_ALPHA / case.r
    original = weight.clone()
    peft = _peft_layer(weight, [("default", lora_a, lora_b)], case.r).eval()
    peft_weight = peft.get_base_layer().weight

    def restore_peft():
        with torch.no_grad():
            peft_weight.data.copy_(original)
        peft.merged_adapters.clear()

    def restore_fused():
        weight.copy_(original)

    fns = {"peft": lambda: peft.merge(), "fused": lambda: fused_lora.merge_(weight, lora_a, lora_b, s)}
    return Setup(fns, baseline=None, after_each={"peft": restore_peft, "fused": restore_fused})


_BUILDERS = {
    "forward": _forward,
    "forward_backward": _forward_backward,
    "mixed_forward": _mixed_forward,
    "merge": _merge,
}


def build(case: Case, device: torch.device) -> Setup:
    if case.op not in _BUILDERS:
        raise ValueError(f"unknown op {case.op!r}; expected one of {', '.join(OPS)}")
    return _BUILDERS[case.op](case, device)
