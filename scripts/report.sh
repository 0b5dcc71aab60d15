#!/usr/bin/env bash
# The README's main job: the overhead report of unmerged LoRA (merged / PEFT / addmm_ / fused_lora) on this
# machine's device (CUDA if present, else CPU). Extra arguments go to `python -m fused_lora bench`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
mkdir -p out
python -m fused_lora bench --quick --json out/overhead.json --plot out/overhead.png "$@"
