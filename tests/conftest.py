import os

# Triton kernels run on CPU tensors through the interpreter, which must be on before triton is first imported
# by any test module; ahead-of-time compilation (benchmarks/codegen.py) runs in a subprocess without it.
# `--device cuda` turns it off again in pytest_configure (triton reads it when a kernel is decorated, at import).
_INTERPRET_WAS_SET = "TRITON_INTERPRET" in os.environ
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_addoption(parser):
    parser.addoption(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where device-aware tests run: cpu (default; Triton kernels under the interpreter) or "
        "cuda (compiled Triton kernels, bfloat16 included)",
    )


def pytest_configure(config):
    if config.getoption("--device") == "cuda":
        if _INTERPRET_WAS_SET and os.environ.get("TRITON_INTERPRET") == "1":
            raise pytest.UsageError("--device cuda runs compiled kernels: unset TRITON_INTERPRET (it is 1)")
        os.environ.pop("TRITON_INTERPRET", None)
        if not torch.cuda.is_available():
            raise pytest.UsageError(
                "--device cuda but torch.cuda.is_available() is False "
                f"(torch {torch.__version__}, built for CUDA {torch.version.cuda})"
            )
    else:
        os.environ["TRITON_INTERPRET"] = "1"
        _refuse_broken_interpreter()


def _refuse_broken_interpreter():
    """Triton < 3.8's interpreter casts 1-element arrays to int, which numpy >= 2.4 refuses: every kernel fails
    with "only 0-dimensional arrays can be converted to Python scalars". Say so once instead."""
    try:
        import numpy
        import triton

        triton_version = triton.__version__
    except Exception:  # no triton: the Triton tests skip themselves
        return
    as_tuple = lambda v: tuple(int(p) for p in v.split("+")[0].split(".")[:2])  # noqa: E731
    if as_tuple(triton_version) < (3, 8) and as_tuple(numpy.__version__) >= (2, 4):
        raise pytest.UsageError(
            f"triton {triton_version}'s interpreter fails with numpy {numpy.__version__}: "
            "install numpy<2.4 (or triton>=3.8) to run the kernels on CPU"
        )


@pytest.fixture(scope="session")
def device(pytestconfig) -> torch.device:
    """The device of device-aware tests (--device); see tests/devices.py for what each device runs."""
    return torch.device(pytestconfig.getoption("--device"))


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
