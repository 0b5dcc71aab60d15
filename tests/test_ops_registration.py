"""The op boundary: torch.library registration (opcheck), backend choice and its error messages."""

import pytest
import torch

import fused_lora
from fused_lora import ops
from fused_lora.ops import backends

CPU_BACKENDS = ["cpp", "reference", "cublas"]


def _fwd_args(M=7, K=20, N=11, ranks=(3, 5), bias=True, dtype=torch.float32):
    R = sum(ranks)
    ptr = [0]
    for r in ranks:
        ptr.append(ptr[-1] + r)
    return (
        torch.randn(M, K, dtype=dtype),
        torch.randn(N, K, dtype=dtype),
        torch.randn(N, dtype=dtype) if bias else None,
        torch.randn(R, K, dtype=dtype),
        torch.randn(N, R, dtype=dtype),
        torch.rand(R),
        ptr,
        [0.25, 0.0],
        torch.tensor([123456789]),
    )


@pytest.mark.parametrize("cpu_backend", CPU_BACKENDS, indirect=True)
@pytest.mark.parametrize("bias,dtype", [(True, torch.float32), (False, torch.float32), (True, torch.float64)])
def test_opcheck_forward_and_backward(cpu_backend, bias, dtype):
    args = _fwd_args(bias=bias, dtype=dtype)
    torch.library.opcheck(ops.lora_fwd, args)
    x, w, b, a, bb, scale, ptr, ps, seed = args
    x.requires_grad_()
    a.requires_grad_()
    bb.requires_grad_()
    torch.library.opcheck(ops.lora_fwd, (x, w, b, a, bb, scale, ptr, ps, seed))
    y, t = ops.lora_fwd(*args)
    dy = torch.randn_like(y)
    for need_dx in (True, False):
        torch.library.opcheck(
            ops.lora_bwd, (dy, x.detach(), w, a.detach(), bb.detach(), scale, t.detach(), ptr, ps, seed, need_dx)
        )


@pytest.mark.parametrize("cpu_backend", CPU_BACKENDS, indirect=True)
def test_opcheck_rows_merge_and_mask(cpu_backend):
    x, w, b, a, bb, scale, ptr, ps, seed = _fwd_args()
    ids = torch.tensor([0, -1, 1, 1, 0, -1, 1])
    torch.library.opcheck(ops.lora_rows_fwd, (x, w, b, a, bb, scale, ptr, ids, ps, seed))
    y, t = ops.lora_rows_fwd(x, w, b, a, bb, scale, ptr, ids, ps, seed)
    torch.library.opcheck(ops.lora_rows_bwd, (torch.randn_like(y), x, w, a, bb, scale, t, ptr, ids, ps, seed, True))
    torch.library.opcheck(ops.lora_merge_, (w.clone(), a, bb, scale, 1.0, False, True))
    torch.library.opcheck(ops.dropout_keep, (seed, 5, 9, 0.5, 1))


def test_backend_names_are_checked(monkeypatch):
    monkeypatch.setenv("FUSED_LORA_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match=r"FUSED_LORA_BACKEND='cuda-magic' is not one of auto, triton, cublas, cpp"):
        fused_lora.lora_linear(torch.randn(2, 4), torch.randn(3, 4), None, torch.randn(1, 4), torch.randn(3, 1), 1.0)


def test_triton_on_cpu_without_interpreter_says_how_to_fix(monkeypatch):
    monkeypatch.setenv("FUSED_LORA_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(backends.BackendUnavailable, match=r"TRITON_INTERPRET=1"):
        fused_lora.lora_linear(torch.randn(2, 4), torch.randn(3, 4), None, torch.randn(1, 4), torch.randn(3, 1), 1.0)


def test_missing_cpp_backend_falls_back_and_says_so(monkeypatch):
    monkeypatch.delenv("FUSED_LORA_BACKEND", raising=False)
    monkeypatch.setattr(backends, "_import_cpp", lambda: (None, "ImportError: no compiler"))
    monkeypatch.setattr(backends, "_warned_fallback", False)
    with pytest.warns(RuntimeWarning, match=r"C\+\+ CPU backend unavailable \(ImportError: no compiler\)"):
        assert backends.backend_for(torch.device("cpu")).__name__ == "fused_lora.reference"
    assert "reference (C++ backend unavailable: ImportError: no compiler)" in backends.backend_info()
    monkeypatch.setenv("FUSED_LORA_BACKEND", "cpp")
    with pytest.raises(backends.BackendUnavailable, match=r"C\+\+ backend is unavailable"):
        backends.backend_for(torch.device("cpu"))


def test_backend_info_names_the_cpu_backend(monkeypatch):
    monkeypatch.delenv("FUSED_LORA_BACKEND", raising=False)
    line = backends.backend_info().splitlines()[0]
    assert line.startswith("cpu: ")
    assert ("cpu: cpp (fused_lora._C)" == line) == (backends._import_cpp()[0] is not None)


@pytest.mark.parametrize(
    "choice, what",
    [("auto", "chosen per shape"), ("cublas", "cublas composition (forced)"), ("reference", "reference")],
)
def test_backend_info_says_when_there_is_no_cuda_device(monkeypatch, choice, what):
    monkeypatch.setenv("FUSED_LORA_BACKEND", choice)
    for available in (False, True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda available=available: available)
        line = backends.backend_info().splitlines()[1]
        assert line.startswith("cuda: ") and what in line, line
        assert line.startswith("cuda: no CUDA device here") != available, line


# ---- resolve(): backend_for's decision, remembered per FUSED_LORA_BACKEND -----------------------------------------
def test_resolve_follows_the_environment_at_every_call(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("FUSED_LORA_BACKEND", "reference")
    assert backends.backend_env() == "reference"
    assert backends.resolve(cpu).__name__ == "fused_lora.reference"
    monkeypatch.delenv("FUSED_LORA_BACKEND")
    assert backends.backend_env() is None
    assert backends.resolve(cpu) is backends.backend_for(cpu)
    monkeypatch.setenv("FUSED_LORA_BACKEND", "cuda-magic")
    for _ in range(2):  # errors are not remembered: every call says it
        with pytest.raises(ValueError, match="cuda-magic"):
            backends.resolve(cpu)


def test_resolve_rechecks_the_interpreter_for_triton_on_cpu(monkeypatch):
    pytest.importorskip("triton")
    cpu = torch.device("cpu")
    monkeypatch.setenv("FUSED_LORA_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backends.resolve(cpu) is backends._import_triton()[0]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(backends.BackendUnavailable, match="TRITON_INTERPRET=1"):
        backends.resolve(cpu)


def test_eager_entry_and_registered_op_agree_and_eager_skips_torch_library(monkeypatch):
    x, w, b, a, bb, scale, ptr, ps, seed = _fwd_args()
    y_registered, _ = ops.lora_fwd(x, w, b, a, bb, scale, ptr, [0.0, 0.0], seed)
    monkeypatch.setattr(ops, "lora_fwd", lambda *args: pytest.fail("the eager entry went through torch.library"))
    y_eager = ops.forward(x, w, b, a, bb, scale, ptr, [0.0, 0.0], seed)
    torch.testing.assert_close(y_eager, y_registered, rtol=0, atol=0)


def test_eager_entry_uses_the_registered_op_under_a_dispatch_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, w, b, a, bb, scale, ptr, ps, seed = _fwd_args()
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) if t is not None else None for t in (x, w, b, a, bb, scale)]
        y = ops.forward(*fake, ptr, ps, mode.from_tensor(seed))
    assert y.shape == (x.shape[0], w.shape[0]) and not ops.eager_call_ok(*fake)
    assert ops.eager_call_ok(x, w, b, a, bb)
