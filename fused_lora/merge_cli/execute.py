"""Write the merged checkpoint into a folder: shard by shard, tensor by tensor, then check what is on disk.

Only one touched tensor is in memory at a time (plus its adapters and float64 probe results of a few rows);
untouched tensors are copied byte for byte from the input file.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from typing import Optional

import torch

from fused_lora.functional import merge_
from fused_lora.merge_cli import verify
from fused_lora.merge_cli.checkpoint import INDEX, Checkpoint
from fused_lora.merge_cli.errors import MergeError, one_line, writing
from fused_lora.merge_cli.plan import TensorPlan
from fused_lora.merge_cli.safetensors_io import COPY_CHUNK, Entry, Header, read_header, read_tensor, write_shard

MERGE_CHUNK_ELEMENTS = 1 << 20  # merge_ row blocks: bounds any backend's temporaries, still one rounding each


@dataclass
class Checked:
    name: str
    dtype: torch.dtype
    rel_err: float
    bound: float


def _merge_in_place(plan: TensorPlan, weight: torch.Tensor) -> None:
    a, b, scale = plan.stacked()
    scale32 = scale.to(torch.float32)
    step = max(1, MERGE_CHUNK_ELEMENTS // max(weight.shape[1], 1))
    for i in range(0, weight.shape[0], step):
        try:
            merge_(weight[i : i + step], a, b[i : i + step], scale32, safe=True)
        except ValueError as exc:
            raise MergeError(plan.shard.path, plan.name, f"merge failed: {one_line(exc)}") from exc


def _merge_bias(plan: TensorPlan, bias: torch.Tensor) -> torch.Tensor:
    total = bias.double()
    for vec, s in plan.bias_terms:
        total = total + s * vec.double()
    merged = total.to(bias.dtype)
    if not bool(torch.isfinite(merged).all()):
        raise MergeError(plan.shard.path, plan.name, "merged bias would hold non-finite values")
    return merged


class ShardWriter:
    def __init__(self, plans: dict[str, TensorPlan], verify_on: bool):
        self.plans, self.verify_on = plans, verify_on
        self.expected: dict[str, object] = {}
        self.results: list[Checked] = []

    def tensor_for(self, entry: Entry, shard: Header) -> Optional[torch.Tensor]:
        plan = self.plans.get(entry.name)
        if plan is None or plan.shard is not shard:
            return None
        tensor = read_tensor(shard, entry)
        if plan.replacement is not None:
            replaced = plan.replacement.to(tensor.dtype)
            if not bool(torch.isfinite(replaced).all()):
                raise MergeError(plan.shard.path, plan.name, "replacement from the adapter overflows the base dtype")
            tensor.copy_(replaced)
        if plan.lora_a:
            if self.verify_on:
                a, b, scale = plan.stacked()
                self.expected[entry.name] = verify.expect(entry.name, tensor, a, b, scale)
            _merge_in_place(plan, tensor)
        if plan.bias_terms:
            original = tensor.clone() if self.verify_on else None
            tensor = _merge_bias(plan, tensor)
            if self.verify_on:
                self.expected[entry.name] = original
        return tensor

    def verify_written(self, out_path: str, shard: Header) -> None:
        """Reads each merged tensor back from the written file and checks it against the probes."""
        written = read_header(out_path)
        if [(e.name, e.dtype, e.shape, e.nbytes) for e in written.entries] != [
            (e.name, e.dtype, e.shape, e.nbytes) for e in shard.entries
        ]:
            raise MergeError(out_path, None, "written shard does not list the input's tensors")
        from safetensors import safe_open

        with safe_open(out_path, framework="pt") as f:  # the reference reader must accept the file
            if set(f.keys()) != {e.name for e in shard.entries}:
                raise MergeError(out_path, None, "written shard is not readable by safetensors")
        by_name = written.by_name()
        for name, plan in self.plans.items():
            if plan.shard is not shard or name not in self.expected:
                continue
            merged = read_tensor(written, by_name[name])
            if plan.bias_terms:
                rel, bound, ok = verify.check_bias(self.expected[name], merged, plan.bias_terms)
            else:
                rel, bound, ok = verify.check(self.expected[name], merged)
            if not ok:
                raise MergeError(
                    shard.path,
                    name,
                    f"verification failed: relative error {rel:.3e} exceeds {bound:.3e} ({merged.dtype})",
                )
            self.results.append(Checked(name, merged.dtype, rel, bound))
            del self.expected[name]


def write_checkpoint(
    checkpoint: Checkpoint, plans: dict[str, TensorPlan], out_dir: str, shard_metadata, verify_on: bool, progress=None
) -> list[Checked]:
    for rel in checkpoint.other_files:
        copy_file(os.path.join(checkpoint.folder, rel), os.path.join(out_dir, rel))
    writer = ShardWriter(plans, verify_on)
    for shard in checkpoint.shards:
        out_path = os.path.join(out_dir, os.path.basename(shard.path))
        touched = sorted(name for name, p in plans.items() if p.shard is shard)
        write_shard(
            out_path,
            shard,
            shard_metadata(shard, touched),
            lambda entry, s=shard: writer.tensor_for(entry, s),
            progress,
        )
        if verify_on:
            writer.verify_written(out_path, shard)
    if checkpoint.index is not None:
        index_path = os.path.join(out_dir, INDEX)
        with writing(index_path):
            with open(index_path, "w", encoding="utf-8") as f:
                json.dump(checkpoint.index, f, indent=2, sort_keys=False)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
    return writer.results


def copy_file(src_path: str, dst_path: str) -> None:
    """Copy a non-weight file (config, tokenizer, ...) with its mode and times, as shutil.copy2 does, but with a
    read failure blamed on the input (MergeError) and a write failure on the output (OutputError). copy2 cannot
    tell the two apart, and its sendfile fast path writes behind the file object's back."""
    with writing(os.path.dirname(dst_path), "create"):
        os.makedirs(os.path.dirname(dst_path), exist_ok=True)
    try:
        src = open(src_path, "rb")
    except OSError as exc:
        raise MergeError(src_path, None, f"cannot read: {exc.strerror or exc}") from exc
    with src, writing(dst_path):
        with open(dst_path, "wb") as dst:
            while True:
                try:
                    chunk = src.read(COPY_CHUNK)
                except OSError as exc:
                    raise MergeError(src_path, None, f"cannot read: {exc.strerror or exc}") from exc
                if not chunk:
                    break
                dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())
        shutil.copystat(src_path, dst_path)
