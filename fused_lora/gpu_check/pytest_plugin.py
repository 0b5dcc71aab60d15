"""pytest plugin of the kit's tests step (`pytest -p fused_lora.gpu_check.pytest_plugin`).

Points fused_lora.kernels at the checkout (bootstrap) before any test module is imported, and appends one JSON
line per test outcome to $FUSED_LORA_GPU_CHECK_OUTCOMES as soon as it is known, so a shard stopped at its time
budget still leaves every result it reached.
"""

from __future__ import annotations

import json
import os

from fused_lora.gpu_check.bootstrap import ensure_checkout

ensure_checkout()

_PATH = os.environ.get("FUSED_LORA_GPU_CHECK_OUTCOMES")


def pytest_runtest_logreport(report):
    if not _PATH:
        return
    # one line per test: its call phase, or the setup/teardown phase that failed or skipped it
    if report.when != "call" and report.outcome == "passed":
        return
    line = {
        "nodeid": report.nodeid,
        "when": report.when,
        "outcome": report.outcome,
        "seconds": round(report.duration, 3),
    }
    if report.outcome != "passed":
        text = report.longreprtext or ""
        line["message"] = text[-1500:]
    with open(_PATH, "a") as f:
        f.write(json.dumps(line) + "\n")
