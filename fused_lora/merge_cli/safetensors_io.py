"""Streaming safetensors: parse and check a header, read one tensor, write a shard tensor by tensor.

The writer copies the bytes of untouched tensors straight from the input file (bit-exact, never held whole in
memory) and takes the touched ones from memory, so a shard never has to be resident at once.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from typing import BinaryIO, Callable, Mapping, Optional

import torch

from fused_lora.merge_cli import hooks
from fused_lora.merge_cli.errors import MergeError, writing

# bytes per element of each safetensors dtype, and the torch dtype where we may need to compute on it
ITEMSIZE = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "C64": 8,
}
TORCH_DTYPE = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
SAFETENSORS_DTYPE = {v: k for k, v in TORCH_DTYPE.items()}
MAX_HEADER = 100 * 1024 * 1024  # the limit the safetensors library itself enforces
COPY_CHUNK = 16 * 1024 * 1024


@dataclass(frozen=True)
class Entry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # offsets into the data section (after the header)
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass
class Header:
    path: str
    data_start: int
    entries: list[Entry]  # in data order
    metadata: dict[str, str]

    def by_name(self) -> dict[str, Entry]:
        return {e.name: e for e in self.entries}


def read_header(path: str) -> Header:
    """Parse and check a safetensors header as strictly as the library does (sizes, offsets covering the file
    exactly, no overlaps); raises MergeError naming the file and the offending key."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise MergeError(path, None, f"truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise MergeError(
                    path, None, f"corrupt or truncated safetensors header (declares {n} bytes, file has {size})"
                )
            raw = f.read(n)
    except OSError as exc:
        raise MergeError(path, None, f"cannot read: {exc.strerror or exc}") from exc
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise MergeError(path, None, f"corrupt safetensors header (not JSON: {exc})") from exc
    if not isinstance(doc, dict):
        raise MergeError(path, None, "corrupt safetensors header (not a JSON object)")
    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise MergeError(path, "__metadata__", "corrupt safetensors metadata (must map strings to strings)")
    entries = [_entry(path, name, info) for name, info in doc.items()]
    entries.sort(key=lambda e: (e.begin, e.end))
    cursor = 0
    for e in entries:
        if e.begin != cursor:
            raise MergeError(
                path,
                e.name,
                f"corrupt safetensors header: data_offsets [{e.begin}, {e.end}] "
                f"leave a gap or overlap at byte {cursor}",
            )
        cursor = e.end
    data_len = size - 8 - n
    if cursor != data_len:
        raise MergeError(
            path,
            entries[-1].name if entries else None,
            f"truncated or corrupt safetensors file: header describes {cursor} data bytes, file holds {data_len}",
        )
    return Header(path, 8 + n, entries, dict(metadata))


def _entry(path: str, name: str, info) -> Entry:
    if not isinstance(info, dict):
        raise MergeError(path, name, "corrupt safetensors header entry")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in ITEMSIZE:
        raise MergeError(path, name, f"unknown safetensors dtype {dtype!r}")
    if (
        not isinstance(shape, list)
        or not all(type(d) is int and d >= 0 for d in shape)
        or not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int and o >= 0 for o in offsets)
    ):
        raise MergeError(path, name, f"corrupt safetensors header entry (shape {shape!r}, data_offsets {offsets!r})")
    numel = 1
    for d in shape:
        numel *= d
    begin, end = offsets
    if end - begin != numel * ITEMSIZE[dtype]:
        raise MergeError(
            path,
            name,
            f"corrupt safetensors header: shape {shape} of {dtype} needs "
            f"{numel * ITEMSIZE[dtype]} bytes, data_offsets span {end - begin}",
        )
    return Entry(name, dtype, tuple(shape), begin, end)


def read_tensor(header: Header, entry: Entry) -> torch.Tensor:
    """One tensor into fresh memory (a plain read, no mmap: only this tensor becomes resident)."""
    if entry.dtype not in TORCH_DTYPE:
        raise MergeError(header.path, entry.name, f"dtype {entry.dtype} cannot be merged (need F16, BF16 or F32)")
    buf = torch.empty(entry.nbytes, dtype=torch.uint8)
    try:
        with open(header.path, "rb") as f:
            f.seek(header.data_start + entry.begin)
            got = f.readinto(memoryview(buf.numpy()))
    except OSError as exc:
        raise MergeError(header.path, entry.name, f"cannot read: {exc.strerror or exc}") from exc
    if got != entry.nbytes:
        raise MergeError(header.path, entry.name, f"truncated: read {got} of {entry.nbytes} bytes")
    return buf.view(TORCH_DTYPE[entry.dtype]).reshape(entry.shape)


def _header_bytes(entries: list[Entry], metadata: Mapping[str, str]) -> bytes:
    doc: dict = {"__metadata__": dict(metadata)} if metadata else {}
    for e in entries:
        doc[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [e.begin, e.end]}
    raw = json.dumps(doc, separators=(",", ":"), ensure_ascii=True).encode("utf-8")
    raw += b" " * ((-len(raw)) % 8)  # safetensors aligns the data section to 8 bytes
    return struct.pack("<Q", len(raw)) + raw


def write_shard(
    out_path: str,
    source: Header,
    metadata: Mapping[str, str],
    replacement: Callable[[Entry], Optional[torch.Tensor]],
    progress=None,
) -> None:
    """Write `source`'s tensors in its data order, same names/dtypes/shapes/offsets, with new metadata.
    `replacement(entry)` returns the in-memory tensor to write for a touched entry (it is called just before
    that entry is written, so at most one touched tensor needs to live at a time), or None to copy the input's
    bytes. Failing reads of the input raise MergeError; failing writes (disk full, read-only) OutputError."""
    try:
        src = open(source.path, "rb")
    except OSError as exc:
        raise MergeError(source.path, None, f"cannot read: {exc.strerror or exc}") from exc
    with src, writing(out_path):
        with open(out_path, "wb") as dst:
            dst.write(_header_bytes(source.entries, metadata))
            for i, e in enumerate(source.entries):
                tensor = replacement(e)
                if tensor is None:
                    _copy_bytes(src, source, e, dst)
                else:
                    if SAFETENSORS_DTYPE.get(tensor.dtype) != e.dtype or tuple(tensor.shape) != e.shape:
                        raise MergeError(source.path, e.name, "internal error: merged tensor changed dtype or shape")
                    data = tensor.contiguous().reshape(-1).view(torch.uint8)
                    dst.write(memoryview(data.numpy()))
                if progress is not None:
                    progress.update(1)
                if i == 0:
                    hooks.pause_after_first_tensor(dst)
            dst.flush()
            os.fsync(dst.fileno())


def _copy_bytes(src: BinaryIO, source: Header, e: Entry, dst: BinaryIO) -> None:
    left = e.nbytes
    try:
        src.seek(source.data_start + e.begin)
    except OSError as exc:
        raise MergeError(source.path, e.name, f"cannot read: {exc.strerror or exc}") from exc
    while left:
        try:
            chunk = src.read(min(left, COPY_CHUNK))
        except OSError as exc:  # the input's failure, not the output's
            raise MergeError(source.path, e.name, f"cannot read: {exc.strerror or exc}") from exc
        if not chunk:
            raise MergeError(source.path, e.name, "truncated while copying")
        dst.write(chunk)
        left -= len(chunk)
