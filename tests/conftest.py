import os

# Triton kernels run on CPU tensors through the interpreter, which must be on before triton is first imported
# by any test module; ahead-of-time compilation (benchmarks/codegen.py) runs in a subprocess without it.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def cpp_backend_available() -> bool:
    from fused_lora.ops.backends import _import_cpp
    return _import_cpp()[0] is not None


@pytest.fixture
def cpu_backend(monkeypatch, request):
    """Run a test on a named CPU backend (FUSED_LORA_BACKEND is read at every op call)."""
    name = request.param
    if name == "cpp" and not cpp_backend_available():
        if os.environ.get("CI"):
            pytest.fail("the C++ backend is not built: the install step must build fused_lora._C")
        pytest.skip("C++ backend not built in this environment")
    monkeypatch.setenv("FUSED_LORA_BACKEND", name)
    return name


@pytest.fixture(autouse=True)
def _fixed_seed():
    torch.manual_seed(1234)


def pytest_terminal_summary(terminalreporter, config):
    """The contract suite's cases and outcomes per backend (tests/test_contract.py), for the run's report."""
    try:
        from contract_cases import summary_lines
    except ImportError:  # tests/ not on sys.path (another import mode): no tally
        return
    lines = summary_lines(terminalreporter.stats, config.getoption("--device", default="cpu"))
    if lines:
        terminalreporter.write_sep("-", "contract suite: cases per backend")
        for line in lines:
            terminalreporter.write_line(line)
