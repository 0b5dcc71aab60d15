"""The GPU check kit behind `bash scripts/gpu_check.sh [--quick | --dry-run]` (docs/gpu_check.md).

driver.py runs the steps of plan.py, each in its own process (step.py) within its time budget, and writes
<out>/gpu_check.json after each one:
    {"device": GPU name or "cpu", "torch": ..., "triton": ..., "mode": "dry-run" | "quick" | "full",
     "ok": no step failed, "counts": {"ok", "skipped", "failed"}, "seconds": ..., "budgets": {step: s},
     "steps": [{"name", "status": "ok" | "skipped" | "failed", "seconds", "detail", "budget_s", "cpu_s", "log",
                "artifacts": [paths under out], "data": {step-specific}}]}   (in the order they finished)
Steps live in steps/, one module each; they are users of the public API, fused_lora.bench and the kernels.
"""
