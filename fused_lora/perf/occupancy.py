"""Registers, shared memory and warps per kernel config on sm_90, read from the codegen gate's snapshot.

The snapshot (codegen_gate.json beside this file) holds the codegen gate's result of every kernel config and arch;
its sm_90 rows are read here, so the model never compiles at run time. The gate keeps it current (CI checks it
against the kernels); refresh it after a kernel or config change:

    python benchmarks/codegen.py --arch 80 90 --update-snapshot [--incremental]

A config is found by its kernel name and tokens of its spec name ("fused_gemm", ["y", "BM=128", "bf16"]): the
first spec whose bracketed parts contain every token. A config missing from the snapshot gets `fallback`, marked
"estimated", which every table that uses it says.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from typing import Dict, Iterable, Optional

from fused_lora.perf.gpu_model import KIB, Occupancy

SNAPSHOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "codegen_gate.json")


@lru_cache(maxsize=1)
def snapshot() -> Dict[str, dict]:
    """{spec name: the fields the model reads} of the snapshot's sm_90 rows that compiled, by name."""
    if not os.path.exists(SNAPSHOT):
        return {}
    with open(SNAPSHOT) as f:
        rows = json.load(f).get("rows", [])
    kernels = {
        row["name"]: {
            "registers": row["registers"],
            "shared": row["shared"],
            "num_warps": row["num_warps"],
            "num_stages": row["num_stages"],
            "spills": (row.get("spill_stores") or 0) + (row.get("spill_loads") or 0),
            "tma_loads": row.get("tma_loads", 0),
        }
        for row in rows
        if row.get("arch") == 90 and "error" not in row
    }
    return dict(sorted(kernels.items()))


def _parts(spec_name: str):
    kernel, _, rest = spec_name.partition("[")
    return kernel, set(rest.rstrip("]").split(","))


def lookup(kernel: str, tokens: Iterable[str], fallback: Optional[Occupancy] = None) -> Occupancy:
    want = set(tokens)
    for name, row in snapshot().items():
        k, parts = _parts(name)
        if k == kernel and want <= parts:
            return Occupancy(row["registers"], row["shared"], row["num_warps"], "codegen sm_90 snapshot")
    if fallback is not None:
        return fallback
    return Occupancy(128, 64 * KIB, 4, "estimated")


def tma_loads(kernel: str, tokens: Iterable[str]) -> Optional[int]:
    want = set(tokens)
    for name, row in snapshot().items():
        k, parts = _parts(name)
        if k == kernel and want <= parts:
            return row.get("tma_loads")
    return None
