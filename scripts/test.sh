#!/usr/bin/env bash
# The README's test command: set up .venv (CPU torch, triton, peft, transformers), build the C++ backend,
# run the whole test suite. Extra arguments go to pytest (e.g. -k merge).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
# lint and format first (configured in pyproject.toml): seconds, and a finding fails the run like a test does
ruff check .
ruff format --check .
# Triton kernels run on CPU tensors through the interpreter; it must be on before triton is imported.
export TRITON_INTERPRET=1
python -m pytest -q -p no:cacheprovider tests "$@"
