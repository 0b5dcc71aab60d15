"""What a step is told (Context) and what it answers (a result dict), both plain JSON between processes.

A step module defines `run(ctx: Context) -> dict` returning {"status": "ok" | "skipped" | "failed", "detail": str}
plus optional "artifacts" (paths relative to ctx.out) and "data" (anything JSON). The driver adds name, seconds,
budget_s and the log path, and writes it into gpu_check.json.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

OK, SKIPPED, FAILED = "ok", "skipped", "failed"
STATUSES = (OK, SKIPPED, FAILED)


@dataclass
class Context:
    mode: str  # "dry-run" | "quick" | "full"
    out: str  # output directory (absolute)
    root: str  # the checkout
    budget_s: float  # this step's time budget
    started: float = field(default_factory=time.time)
    cuda: bool = False  # torch sees a CUDA device (the environment step says)
    workers: int = 2  # processes a step may run side by side (pytest shards, cache warm-up)
    python: str = ""  # the interpreter the driver runs (children use the same)
    info: Dict[str, object] = field(default_factory=dict)  # the environment step's findings

    @property
    def dry_run(self) -> bool:
        return self.mode == "dry-run"

    @property
    def quick(self) -> bool:
        return self.mode in ("quick", "dry-run")

    @property
    def device(self) -> str:
        return "cuda" if (self.cuda and not self.dry_run) else "cpu"

    def remaining(self) -> float:
        """Seconds left of this step's budget."""
        return self.budget_s - (time.time() - self.started)

    def path(self, *parts: str) -> str:
        full = os.path.join(self.out, *parts)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        return full

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Context":
        return cls(**data)


def result(status: str, detail: str, *, artifacts: Optional[List[str]] = None, data: Optional[dict] = None) -> dict:
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
    out = {"status": status, "detail": detail}
    if artifacts:
        out["artifacts"] = artifacts
    if data is not None:
        out["data"] = data
    return out


def write_json(path: str, data) -> None:
    """Write atomically (temporary file, then rename): a reader never sees half a file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=directory)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, default=str)
        f.write("\n")
    os.replace(tmp, path)


def read_json(path: str):
    with open(path) as f:
        return json.load(f)
