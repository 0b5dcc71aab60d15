#!/usr/bin/env bash
# The README's main job: the overhead report of unmerged LoRA (merged / PEFT / addmm_ / fused_lora) on this
# machine's device (CUDA if present, else CPU), in under a minute on 2 CPU cores. Extra arguments go to
# `python -m fused_lora bench`. The environment is set up (and the C++ backend rebuilt) only when it is missing or
# older than a file of csrc/ or the pinned requirements; otherwise the existing .venv is used as it is.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
built=$(ls fused_lora/_C*.so 2>/dev/null | head -n 1 || true)
stale=1
if [ -x .venv/bin/python ] && [ -n "$built" ] && ls .venv/.fused_lora_env_* >/dev/null 2>&1; then
    # up to date when no source of the extension and no requirement file is newer than the built library
    if [ -z "$(find csrc setup.py requirements-dev.txt -newer "$built" -print -quit 2>/dev/null)" ]; then
        stale=0
    fi
fi
if [ "$stale" = 1 ]; then
    source "$ROOT/scripts/setup_env.sh"
else
    # shellcheck disable=SC1091
    source .venv/bin/activate
fi
mkdir -p out
python -m fused_lora bench --quick --json out/overhead.json --plot out/overhead.png "$@"
