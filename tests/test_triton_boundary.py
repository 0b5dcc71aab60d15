"""What the Triton backend accepts beyond what its kernels read (fused_lora/ops/triton_backend.py), run through the
public functions on CPU tensors under the Triton interpreter:

- a bias of any stride (the kernels index a contiguous vector): small-M, large-M and per-row forward paths;
- float64 (the kernels have no float64 path): every op, merge_ included, computes in float64, never a wrong number.
"""

import pytest
import torch
from checks import assert_close_vs_reference

import fused_lora

pytestmark = pytest.mark.parametrize("cpu_backend", ["triton"], indirect=True)


def _strided_bias(n):
    """A [n] view with stride 2 whose skipped elements are NaN: a kernel reading it as contiguous shows."""
    buf = torch.full((2 * n,), float("nan"))
    buf[::2] = torch.randn(n)
    return buf[::2]


@pytest.mark.parametrize("rows", [5, 97], ids=["small_m", "large_m"])
def test_strided_bias_dense(cpu_backend, rows):
    x, w = torch.randn(rows, 24), torch.randn(19, 24) / 24**0.5
    a, bb = torch.randn(5, 24), torch.randn(19, 5)
    bias = _strided_bias(19)
    assert not bias.is_contiguous()
    ours = fused_lora.lora_linear(x, w, bias, a, bb, 0.5)
    ref = x.double() @ w.double().T + bias.double() + 0.5 * (x.double() @ a.double().T) @ bb.double().T
    assert_close_vs_reference(ours, ref, (x @ w.T + bias + 0.5 * (x @ a.T) @ bb.T), atol=1e-5)


@pytest.mark.parametrize("rows", [5, 97], ids=["small_m", "large_m"])
def test_strided_bias_rows(cpu_backend, rows):
    x, w = torch.randn(rows, 24), torch.randn(19, 24) / 24**0.5
    a, bb = torch.randn(5, 24), torch.randn(19, 5)
    bias = _strided_bias(19)
    ids = torch.randint(-1, 2, (rows,))
    ours = fused_lora.lora_linear_rows(x, w, bias, a, bb, [0.5, 2.0], [2, 3], ids)
    ref = x.double() @ w.double().T + bias.double()
    for i, (lo, hi, s) in enumerate([(0, 2, 0.5), (2, 5, 2.0)]):
        term = s * (x.double() @ a[lo:hi].double().T) @ bb[:, lo:hi].double().T
        ref += term * (ids == i).double()[:, None]
    assert_close_vs_reference(ours, ref, ref.float(), atol=1e-5)


def _f64(*shapes):
    return [torch.randn(*s, dtype=torch.float64) for s in shapes]


def test_float64_forward_and_gradients_with_dropout(cpu_backend):
    x, w, b, a, bb = _f64((2, 3, 6), (5, 6), (5,), (3, 6), (5, 3))
    for t in (x, a, bb):
        t.requires_grad_()

    def f(x, a, bb):
        torch.manual_seed(7)  # the same mask at every evaluation
        return fused_lora.lora_linear(x, w, b, a, bb, 1.5, dropout_p=0.4, training=True)

    assert torch.autograd.gradcheck(f, (x, a, bb), eps=1e-6, atol=1e-8)
    ref = x @ w.T + b + 1.5 * (x @ a.T) @ bb.T
    torch.testing.assert_close(fused_lora.lora_linear(x, w, b, a, bb, 1.5), ref, rtol=1e-12, atol=1e-12)


def test_float64_rows_forward_and_gradients(cpu_backend):
    x, w, b, a, bb = _f64((4, 6), (5, 6), (5,), (5, 6), (5, 5))
    for t in (x, a, bb):
        t.requires_grad_()
    ids = torch.tensor([0, -1, 1, 0])

    def f(x, a, bb):
        torch.manual_seed(3)
        return fused_lora.lora_linear_rows(x, w, b, a, bb, [0.5, 2.0], [2, 3], ids, dropout_p=[0.3, 0.0], training=True)

    assert torch.autograd.gradcheck(f, (x, a, bb), eps=1e-6, atol=1e-8)


def test_float64_adapters_over_float32_input(cpu_backend):
    x, w, b = torch.randn(7, 12), torch.randn(9, 12), torch.randn(9)
    a, bb = _f64((3, 12), (9, 3))
    ours = fused_lora.lora_linear(x, w, b, a, bb, 0.5)
    ref = x.double() @ w.double().T + b.double() + 0.5 * (x.double() @ a.T) @ bb.T
    assert ours.dtype == torch.float32
    assert_close_vs_reference(ours, ref, (x @ w.T + b + 0.5 * (x @ a.float().T) @ bb.float().T), atol=1e-5)


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_float64_merge(cpu_backend, fan_in_fan_out):
    weight, a, bb = _f64((9, 12), (3, 12), (9, 3))
    if fan_in_fan_out:
        weight = weight.T.contiguous()
    exact = weight + 0.5 * (bb @ a if not fan_in_fan_out else (bb @ a).T)
    fused_lora.merge_(weight, a, bb, 0.5, fan_in_fan_out=fan_in_fan_out)
    torch.testing.assert_close(weight, exact, rtol=1e-13, atol=1e-13)
    fused_lora.unmerge_(weight, a, bb, 0.5, fan_in_fan_out=fan_in_fan_out)
    torch.testing.assert_close(
        weight, exact - 0.5 * (bb @ a if not fan_in_fan_out else (bb @ a).T), rtol=1e-13, atol=1e-13
    )
