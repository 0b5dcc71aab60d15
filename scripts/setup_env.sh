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
stamp=".venv/.fused_lora_env_$(cat requirements-dev.txt scripts/setup_env.sh setup.py pyproject.toml | sha256sum | cut -c1-16)"
# pip/setuptools chatter and ninja's echo of each compile command (compiler diagnostics still show)
quiet_build() { grep -vE "is ignored|BuildBackendWarning|^\s*$|^\s*!!|\*\*\*\*|^\[[0-9]+/[0-9]+\] c\+\+ " || true; }
# (the import runs from / so that the checkout itself is not on sys.path: it checks the editable install's mapping)
if [ ! -f "$stamp" ] || ! (cd / && python -c "import fused_lora.kernels") 2>/dev/null; then
    # torch 2.13.0 CPU is what these machines carry; a bare `torch` would pull a multi-GB CUDA build
    pip install -q "torch==${FUSED_LORA_TORCH_VERSION:-2.13.0}"
    pip install -q -r requirements-dev.txt
    # the editable install maps kernels/ to fused_lora.kernels; the C++ backend is built below, not by pip, whose
    # editable builds happen in a fresh temporary folder (every file recompiled every time: minutes on 2 cores)
    FUSED_LORA_NO_EXT=1 pip install -q --no-build-isolation -e . 2>&1 | quiet_build
    touch "$stamp"
fi
# build (or rebuild, csrc/ may have changed) the C++ backend in place; ninja keeps its state under build/, so an
# unchanged csrc/ costs seconds
python setup.py -q build_ext --inplace 2>&1 | quiet_build
python - <<'PY'
import fused_lora
print("fused_lora backends:\n" + fused_lora.backend_info())
PY
