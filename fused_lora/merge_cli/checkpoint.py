"""The base checkpoint folder: which files are weight shards, their headers, and the index that maps keys to
shards (checked both ways, so a key missing from the index or from its shard is caught before any work)."""

from __future__ import annotations

import fnmatch
import json
import os
from dataclasses import dataclass
from typing import Optional

from fused_lora.merge_cli.errors import MergeError, blame
from fused_lora.merge_cli.safetensors_io import Entry, Header, read_header

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
# weights in other formats (or safetensors outside the index): copying them would ship unmerged weights
# that another loader might pick up, so they are left out and named in the summary
STALE_WEIGHTS = (
    "*.safetensors",
    "pytorch_model*.bin",
    "model*.bin",
    "*.pth",
    "*.pt",
    "*.ckpt",
    "*.h5",
    "*.msgpack",
    "*.gguf",
    "pytorch_model*.bin.index.json",
    "*.safetensors.index.json",
)


@dataclass
class Checkpoint:
    folder: str
    shards: list[Header]  # in index order (or the single file)
    index: Optional[dict]  # the parsed index.json, None for a single file
    other_files: list[str]  # relative paths of everything else, copied as they are
    skipped_files: list[str]  # weight files in other formats, not copied

    def locate(self) -> dict[str, tuple[Header, Entry]]:
        """Every tensor name -> (its shard, its entry)."""
        found: dict[str, tuple[Header, Entry]] = {}
        for shard in self.shards:
            for e in shard.entries:
                found[e.name] = (shard, e)
        return found


def open_checkpoint(folder: str) -> Checkpoint:
    if not os.path.isdir(folder):
        raise MergeError(folder, None, "base checkpoint folder does not exist")
    index_path = os.path.join(folder, INDEX)
    if os.path.exists(index_path):
        index, shard_names = _read_index(index_path)
    elif os.path.exists(os.path.join(folder, SINGLE)):
        index, shard_names = None, [SINGLE]
    else:
        bins = [n for n in os.listdir(folder) if n.endswith(".bin")]
        hint = (
            f" (found {', '.join(sorted(bins))}: pickle checkpoints are not read; convert to safetensors)"
            if bins
            else ""
        )
        raise MergeError(folder, None, f"no {SINGLE} or {INDEX}{hint}")
    shards = [read_header(os.path.join(folder, name)) for name in shard_names]
    if index is not None:
        _check_index(index_path, index["weight_map"], shards, shard_names)
    seen: dict[str, str] = {}
    for shard in shards:
        for e in shard.entries:
            if e.name in seen:
                raise MergeError(shard.path, e.name, f"tensor also stored in {seen[e.name]}")
            seen[e.name] = shard.path
    weight_files = set(shard_names) | ({INDEX} if index is not None else set())
    other, skipped = [], []
    for root, _dirs, files in os.walk(folder):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), folder)
            if rel in weight_files:
                continue
            stale = any(fnmatch.fnmatch(name, pattern) for pattern in STALE_WEIGHTS)
            (skipped if stale else other).append(rel)
    return Checkpoint(folder, shards, index, sorted(other), sorted(skipped))


def _read_index(index_path: str) -> tuple[dict, list[str]]:
    with blame(index_path, None, "unreadable index"):
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise MergeError(index_path, "weight_map", "index has no weight_map")
    names: list[str] = []
    for key, shard in weight_map.items():
        if not isinstance(shard, str) or os.path.basename(shard) != shard or not shard:
            raise MergeError(index_path, key, f"weight_map entry {shard!r} is not a file name in the folder")
        if shard not in names:
            names.append(shard)
    for name in names:
        if not os.path.isfile(os.path.join(os.path.dirname(index_path), name)):
            key = next(k for k, v in weight_map.items() if v == name)
            raise MergeError(index_path, key, f"shard {name} listed in the index does not exist")
    return index, names


def _check_index(index_path: str, weight_map: dict, shards: list[Header], names: list[str]) -> None:
    for name, shard in zip(names, shards):
        present = {e.name for e in shard.entries}
        for e in shard.entries:
            if weight_map.get(e.name) != name:
                where = weight_map.get(e.name)
                raise MergeError(
                    index_path,
                    e.name,
                    f"missing index entry for a tensor stored in {name}"
                    if where is None
                    else f"index maps it to {where} but it is stored in {name}",
                )
        for key, mapped in weight_map.items():
            if mapped == name and key not in present:
                raise MergeError(shard.path, key, f"tensor listed in {INDEX} is missing from the shard")
