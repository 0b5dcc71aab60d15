# Sourced by scripts/test.sh and scripts/report.sh: creates .venv if needed, installs the pinned environment and
# the package itself in editable mode, which builds the C++ backend (csrc/, ninja) against the installed torch.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
stamp=".venv/.fused_lora_env_$(cat requirements-dev.txt scripts/setup_env.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    # torch 2.13.0 CPU is what these machines carry; a bare `torch` would pull a multi-GB CUDA build
    pip install -q "torch==${FUSED_LORA_TORCH_VERSION:-2.13.0}"
    pip install -q -r requirements-dev.txt
    touch "$stamp"
fi
# always rebuild: csrc/ may have changed since the last install (ninja makes an unchanged rebuild cheap)
pip install -q --no-build-isolation -e . 2>&1 | grep -vE "is ignored|BuildBackendWarning|^\s*$|^\s*!!|\*\*\*\*" || true
python - <<'PY'
import fused_lora
print("fused_lora backends:\n" + fused_lora.backend_info())
PY
