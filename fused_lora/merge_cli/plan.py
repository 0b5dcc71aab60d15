"""What happens to each base tensor, decided and shape-checked before anything is written.

Every contribution is turned to the weight's storage orientation: the delta added to the stored matrix
[rows, cols] is B_s diag(scale) A_s with A_s [r, cols], B_s [rows, r]. For a weight stored [in, out]
(GPT-2 Conv1D, fan_in_fan_out; embeddings) that is A_s = B^T, B_s = A^T. Stacking all adapters of one
weight along the rank axis then gives a single merge_ call: one rounding however many adapters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from fused_lora.merge_cli.adapters import PREFIX, Adapter, ModuleDelta
from fused_lora.merge_cli.checkpoint import Checkpoint
from fused_lora.merge_cli.errors import MergeError
from fused_lora.merge_cli.keymap import resolve_names
from fused_lora.merge_cli.safetensors_io import TORCH_DTYPE, Entry, Header


@dataclass
class TensorPlan:
    name: str
    shard: Header
    entry: Entry
    replacement: Optional[torch.Tensor] = None  # full new value (modules_to_save / saved base layer)
    lora_a: list[torch.Tensor] = field(default_factory=list)  # A_s per contribution, [r, cols] float32
    lora_b: list[torch.Tensor] = field(default_factory=list)  # B_s per contribution, [rows, r] float32
    scales: list[torch.Tensor] = field(default_factory=list)  # [r] float64
    bias_terms: list[tuple[torch.Tensor, float]] = field(default_factory=list)  # lora_B.bias, scale
    sources: list[str] = field(default_factory=list)

    @property
    def rank(self) -> int:
        return sum(a.shape[0] for a in self.lora_a)

    def stacked(self):
        return (
            torch.cat(self.lora_a, 0).contiguous(),
            torch.cat(self.lora_b, 1).contiguous(),
            torch.cat(self.scales, 0),
        )


def _mergeable(plan: TensorPlan, file: str, key: str) -> None:
    if plan.entry.dtype not in TORCH_DTYPE:
        raise MergeError(
            plan.shard.path,
            plan.name,
            f"base tensor has dtype {plan.entry.dtype}; merging needs F16, BF16 or F32 (adapter key {key} in {file})",
        )


def _orient(delta: ModuleDelta, plan: TensorPlan) -> tuple[torch.Tensor, torch.Tensor]:
    shape = plan.entry.shape
    n_out, k_in = delta.lora_b.shape[0], delta.lora_a.shape[1]
    if len(shape) != 2 or (shape != (n_out, k_in) and shape != (k_in, n_out)):
        raise MergeError(
            delta.source,
            delta.key,
            f"shape mismatch: adapter delta is [{n_out}, {k_in}] (lora_B {tuple(delta.lora_b.shape)} "
            f"x lora_A {tuple(delta.lora_a.shape)}) but base tensor {plan.name} in "
            f"{plan.shard.path} is {list(shape)}",
        )
    if delta.kind == "embedding":
        transposed = True  # embedding weight [num_embeddings, dim]; PEFT's delta is (B A)^T
        if shape != (k_in, n_out):
            raise MergeError(
                delta.source,
                delta.key,
                f"shape mismatch: embedding {plan.name} is {list(shape)}, adapter expects [{k_in}, {n_out}]",
            )
    elif n_out == k_in:
        transposed = delta.fan_in_fan_out  # square: only the config can tell
    else:
        transposed = shape == (k_in, n_out)
    if transposed:
        return delta.lora_b.T.contiguous(), delta.lora_a.T.contiguous()
    return delta.lora_a, delta.lora_b


def build_plan(adapters: list[Adapter], checkpoint: Checkpoint) -> dict[str, TensorPlan]:
    located = checkpoint.locate()
    needed: list[tuple[str, str, str]] = []
    for adapter in adapters:
        for delta in adapter.deltas.values():
            needed.append((delta.path + ".weight", delta.source, delta.key))
            if delta.bias is not None:
                needed.append((delta.path + ".bias", delta.source, f"{PREFIX}{delta.path}.lora_B.bias"))
        for name, (_t, key) in adapter.replacements.items():
            needed.append((name, adapter.spec.folder, key))
    names = resolve_names(needed, set(located))
    plans: dict[str, TensorPlan] = {}

    def plan_for(name: str) -> TensorPlan:
        target = names[name]
        if target not in plans:
            shard, entry = located[target]
            plans[target] = TensorPlan(target, shard, entry)
        return plans[target]

    for adapter in adapters:
        for name, (t, key) in adapter.replacements.items():
            plan = plan_for(name)
            _mergeable(plan, adapter.spec.folder, key)
            if tuple(t.shape) != plan.entry.shape:
                raise MergeError(
                    adapter.spec.folder,
                    key,
                    f"shape mismatch: replacement {tuple(t.shape)} vs base {plan.name} {list(plan.entry.shape)}",
                )
            if plan.replacement is not None:
                raise MergeError(adapter.spec.folder, key, f"{plan.name} is replaced by two adapters")
            plan.replacement = t
            plan.sources.append(adapter.spec.folder)
    for adapter in adapters:
        for delta in adapter.deltas.values():
            plan = plan_for(delta.path + ".weight")
            _mergeable(plan, delta.source, delta.key)
            a_s, b_s = _orient(delta, plan)
            plan.lora_a.append(a_s)
            plan.lora_b.append(b_s)
            plan.scales.append(delta.scale)
            plan.sources.append(delta.source)
            if delta.bias is not None:
                bias_plan = plan_for(delta.path + ".bias")
                bias_key = f"{PREFIX}{delta.path}.lora_B.bias"
                _mergeable(bias_plan, delta.source, bias_key)
                if bias_plan.entry.shape != tuple(delta.bias.shape):
                    raise MergeError(
                        delta.source,
                        bias_key,
                        f"shape mismatch: {tuple(delta.bias.shape)} vs base "
                        f"{bias_plan.name} {list(bias_plan.entry.shape)}",
                    )
                bias_plan.bias_terms.append((delta.bias, delta.bias_scale))
    return plans
