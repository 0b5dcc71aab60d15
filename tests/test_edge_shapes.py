"""Empty dimensions through the public API, as F.linear treats them: in_features == 0 gives the bias broadcast to
[..., N] (zeros without bias), out_features == 0 and zero rows give empty outputs; gradients flow (zeros, or the
bias's row sums) on every backend."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import fused_lora

ALL_BACKENDS = ["cpp", "reference", "triton"]


def _leaves(shape_x, n, r, bias=True):
    k = shape_x[-1]
    tensors = dict(
        x=torch.randn(*shape_x), b=torch.randn(n) if bias else None, a=torch.randn(r, k), bb=torch.randn(n, r)
    )
    for t in tensors.values():
        if t is not None:
            t.requires_grad_()
    return tensors


def _expected_grads(shape_x, n, r, g, bias):
    """F.linear's gradients for these shapes; the LoRA factors get zeros (their products are empty or zero)."""
    x = torch.zeros(*shape_x, requires_grad=True)
    w = torch.zeros(n, shape_x[-1])
    b = torch.zeros(n, requires_grad=True) if bias else None
    F.linear(x, w, b).backward(g)
    return x.grad, (b.grad if bias else None)


@pytest.mark.parametrize("cpu_backend", ALL_BACKENDS, indirect=True)
@pytest.mark.parametrize(
    "shape_x,n",
    [((2, 3, 0), 5), ((4, 0), 5), ((0,), 3), ((3, 7), 0), ((0, 7), 5), ((2, 0, 7), 5)],
    ids=["K0_3d", "K0", "K0_1d", "N0", "M0", "M0_3d"],
)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows_api", [False, True], ids=["lora_linear", "lora_linear_rows"])
def test_empty_dims_follow_f_linear(cpu_backend, shape_x, n, bias, rows_api):
    r = 2
    t = _leaves(shape_x, n, r, bias)
    w = torch.randn(n, shape_x[-1])
    if rows_api:
        ids = torch.zeros(math.prod(shape_x[:-1]), dtype=torch.int64)
        y = fused_lora.lora_linear_rows(t["x"], w, t["b"], t["a"], t["bb"], 0.5, [r], ids)
    else:
        y = fused_lora.lora_linear(t["x"], w, t["b"], t["a"], t["bb"], 0.5)
    expected = F.linear(t["x"].detach(), w, None if t["b"] is None else t["b"].detach())
    assert y.shape == expected.shape and y.dtype == expected.dtype
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-6)
    g = torch.randn_like(y)
    y.backward(g)
    dx, db = _expected_grads(shape_x, n, r, g, bias)
    torch.testing.assert_close(t["x"].grad, dx, rtol=0, atol=1e-6)
    if bias:
        torch.testing.assert_close(t["b"].grad, db, rtol=1e-6, atol=1e-6)
    assert t["a"].grad.shape == t["a"].shape and t["bb"].grad.shape == t["bb"].shape
    if shape_x[-1] == 0 or n == 0 or t["x"].numel() == 0:
        assert not t["a"].grad.any() and not t["bb"].grad.any()


@pytest.mark.parametrize("cpu_backend", ALL_BACKENDS, indirect=True)
@pytest.mark.parametrize("n,k", [(5, 0), (0, 7), (0, 0)])
def test_merge_with_empty_weight_is_a_no_op(cpu_backend, n, k):
    weight = torch.randn(n, k)
    before = weight.clone()
    fused_lora.merge_(weight, torch.randn(2, k), torch.randn(n, 2), 0.5, safe=True)
    fused_lora.unmerge_(weight, torch.randn(2, k), torch.randn(n, 2), 0.5)
    assert torch.equal(weight, before)


def test_layer_with_no_input_features_returns_its_bias():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: "Initializing zero-element tensors is a no-op"
        base = torch.nn.Linear(0, 6)
        layer = fused_lora.FusedLoRALinear.from_linear(base, r=2, lora_alpha=4, init_lora_weights=False)
    x = torch.randn(3, 4, 0, requires_grad=True)
    y = layer(x)
    torch.testing.assert_close(y, base(x.detach()), rtol=0, atol=0)
    y.sum().backward()
    torch.testing.assert_close(base.bias.grad, torch.full((6,), 12.0))
    assert x.grad.shape == x.shape
