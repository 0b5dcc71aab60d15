"""Registers, shared memory and warps per kernel config on sm_90, read from a committed codegen snapshot.

The snapshot (codegen_sm90.json beside this file) is what `python benchmarks/codegen.py --arch 90 --json PATH`
printed, reduced to the fields the model needs; the model never compiles at run time. Refresh it after a kernel
or config change:

    python benchmarks/codegen.py --arch 90 --json /tmp/cg.json && python -m fused_lora.bench.occupancy /tmp/cg.json

A config is found by its kernel name and tokens of its spec name ("fused_gemm", ["y", "BM=128", "bf16"]): the
first spec whose bracketed parts contain every token. A config missing from the snapshot gets `fallback`, marked
"estimated", which every table that uses it says.
"""
from __future__ import annotations

import json
import os
import sys
from functools import lru_cache
from typing import Dict, Iterable, Optional

from fused_lora.bench.gpu_model import KIB, Occupancy

SNAPSHOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "codegen_sm90.json")


@lru_cache(maxsize=1)
def snapshot() -> Dict[str, dict]:
    if not os.path.exists(SNAPSHOT):
        return {}
    with open(SNAPSHOT) as f:
        return json.load(f).get("kernels", {})


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


def reduce_codegen_json(data: dict) -> dict:
    """codegen.py --json output -> the snapshot: sm_90 rows without errors, the fields the model reads."""
    kernels = {}
    for row in data.get("results", []):
        if row.get("arch") != 90 or "error" in row:
            continue
        kernels[row["name"]] = {"registers": row["registers"], "shared": row["shared"],
                                "num_warps": row["num_warps"], "num_stages": row["num_stages"],
                                "spills": (row.get("spill_stores") or 0) + (row.get("spill_loads") or 0),
                                "tma_loads": row.get("tma_loads", 0)}
    return {"source": "python benchmarks/codegen.py --arch 90 --json", "kernels": dict(sorted(kernels.items()))}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m fused_lora.bench.occupancy CODEGEN_JSON  (writes " + SNAPSHOT + ")")
        return 2
    with open(argv[0]) as f:
        reduced = reduce_codegen_json(json.load(f))
    with open(SNAPSHOT, "w") as f:
        json.dump(reduced, f, indent=1)
        f.write("\n")
    print(f"wrote {SNAPSHOT}: {len(reduced['kernels'])} sm_90 configs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
