#!/usr/bin/env bash
# The GPU check kit: one command that proves the Triton path on a (lent) GPU. See docs/gpu_check.md.
#   bash scripts/gpu_check.sh            # full run, ~8 minutes on an H100
#   bash scripts/gpu_check.sh --quick    # ~4 minutes
#   bash scripts/gpu_check.sh --dry-run  # no GPU: what can run on the CPU (CI runs this)
# Uses the python on PATH as it is ($PYTHON overrides): no venv, no install, no download; the checkout is put on
# PYTHONPATH with fused_lora.kernels mapped to kernels/. Output: $OUT if set, else out/gpu/ (gpu_check.json, logs).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
if ! command -v "$PY" >/dev/null 2>&1; then
    echo "gpu_check: no '$PY' on PATH (set PYTHON=...)" >&2
    exit 2
fi
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET  # the driver sets it for a dry run's children only
cd "$ROOT"
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    # nothing below can run: still leave a result file that says why
    OUT_DIR="${OUT:-$ROOT/out/gpu}"
    mkdir -p "$OUT_DIR"
    "$PY" - "$OUT_DIR" "$PY" <<'PYEOF'
import json, os, sys, time
out, py = sys.argv[1], sys.argv[2]
why = f"{py} cannot import torch: install torch >= 2.11 (and triton >= 3.6) for this python"
step = {"name": "environment", "status": "failed", "seconds": 0.0, "detail": why}
with open(os.path.join(out, "gpu_check.json"), "w") as f:
    json.dump({"device": None, "torch": None, "triton": None, "ok": False,
               "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "steps": [step]}, f, indent=1)
print(f"gpu_check: {why}", file=sys.stderr)
PYEOF
    exit 1
fi
exec "$PY" -m fused_lora.gpu_check "$@"
