"""fused_lora.lora_linear / lora_linear_rows through the op boundary: values, gradients, shapes, dtypes, errors."""

import pytest
import torch
from checks import assert_close_vs_reference

import fused_lora

CPU_BACKENDS = ["cpp", "reference"]
# the Triton kernels run here under the interpreter (CPU tensors), which cannot do float64 nor bfloat16
ALL_BACKENDS = CPU_BACKENDS + ["triton"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def _plain_torch(x, w, b, a, bb, s):
    """The unfused formula in whatever dtype its inputs have (float64 for the reference)."""
    y = x @ w.T + (0 if b is None else b)
    return y + s * ((x.to(a.dtype) @ a.T) @ bb.T).to(y.dtype)


def _inputs(shape_x, n, r, dtype, adapter_dtype=None, bias=True):
    k = shape_x[-1]
    x = torch.randn(*shape_x, dtype=dtype)
    w = torch.randn(n, k, dtype=dtype) / k**0.5
    b = torch.randn(n, dtype=dtype) if bias else None
    ad = adapter_dtype or dtype
    a = torch.randn(r, k, dtype=ad) / k**0.5
    bb = torch.randn(n, r, dtype=ad) / r**0.5
    return x, w, b, a, bb


def _skip_interpreter_bf16(backend, dtype):
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter corrupts bfloat16 (triton-lang/triton#11584)")


@pytest.mark.parametrize("cpu_backend", ALL_BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape_x,n,r,bias",
    [((5, 37), 19, 1, True), ((3, 7, 33), 21, 7, False), ((0, 16), 8, 4, True), ((64, 48), 80, 16, True)],
)
def test_forward_matches_float64(cpu_backend, dtype, shape_x, n, r, bias):
    _skip_interpreter_bf16(cpu_backend, dtype)
    x, w, b, a, bb = _inputs(shape_x, n, r, dtype, bias=bias)
    ours = fused_lora.lora_linear(x, w, b, a, bb, 0.75)
    f64 = [t if t is None else t.double() for t in (x, w, b, a, bb)]
    ref = _plain_torch(*f64, 0.75)
    assert ours.dtype == dtype and ours.shape == (*shape_x[:-1], n)
    assert_close_vs_reference(ours, ref, _plain_torch(x, w, b, a, bb, 0.75), atol=ATOL[dtype])


@pytest.mark.parametrize("cpu_backend", CPU_BACKENDS, indirect=True)
def test_non_contiguous_x_and_fp32_adapters_over_bf16(cpu_backend):
    x, w, b, a, bb = _inputs((9, 2 * 40), 24, 5, torch.bfloat16, adapter_dtype=torch.float32)
    x = x[:, ::2]
    w = w[:, :40].contiguous()
    a = a[:, :40].contiguous()
    assert not x.is_contiguous()
    ours = fused_lora.lora_linear(x, w, b, a, bb, 2.0)
    ref = _plain_torch(x.double(), w.double(), b.double(), a.double(), bb.double(), 2.0)
    # PEFT computes the LoRA term in fp32 and adds in fp32 before rounding: our bound is that error
    peft_like = (x.float() @ w.float().T + b.float() + 2.0 * (x.float() @ a.T) @ bb.T).to(torch.bfloat16)
    assert_close_vs_reference(ours, ref, peft_like, atol=1e-2)


@pytest.mark.parametrize("cpu_backend", ALL_BACKENDS, indirect=True)
def test_mixed_activation_equals_sum_of_adapters(cpu_backend):
    ranks, scalings = [1, 7, 16], [0.5, 2.0, -1.0]
    x, w, b, _, _ = _inputs((2, 5, 29), 17, 1, torch.float32)
    As = [torch.randn(r, 29) for r in ranks]
    Bs = [torch.randn(17, r) for r in ranks]
    ours = fused_lora.lora_linear(x, w, b, torch.cat(As), torch.cat(Bs, 1), scalings, rank_splits=ranks)
    ref = x.double() @ w.double().T + b.double()
    for a, bb, s in zip(As, Bs, scalings):
        ref = ref + s * (x.double() @ a.double().T) @ bb.double().T
    torch_f32 = x @ w.T + b + sum(s * (x @ a.T) @ bb.T for a, bb, s in zip(As, Bs, scalings))
    assert_close_vs_reference(ours, ref, torch_f32, atol=1e-5)


@pytest.mark.parametrize("cpu_backend", ALL_BACKENDS, indirect=True)
def test_rows_select_one_adapter_per_sample(cpu_backend):
    ranks, scalings = [3, 8], [0.5, 2.0]
    x, w, b, _, _ = _inputs((4, 3, 20), 11, 1, torch.float32)
    As = [torch.randn(r, 20) for r in ranks]
    Bs = [torch.randn(11, r) for r in ranks]
    ids = torch.tensor([1, -1, 0, 1])
    ours = fused_lora.lora_linear_rows(x, w, b, torch.cat(As), torch.cat(Bs, 1), scalings, ranks, ids)
    ref = x.double() @ w.double().T + b.double()
    for i in range(4):
        if ids[i] >= 0:
            j = int(ids[i])
            ref[i] += scalings[j] * (x[i].double() @ As[j].double().T) @ Bs[j].double().T
    assert_close_vs_reference(ours, ref, ref.float(), atol=1e-4)


def _grads(fn, *tensors):
    for t in tensors:
        t.grad = None
    out = fn()
    g = torch.randn_like(out)
    out.backward(g)
    return [t.grad.clone() for t in tensors], g


@pytest.mark.parametrize("cpu_backend", ALL_BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gradients_match_float64_autograd(cpu_backend, dtype):
    _skip_interpreter_bf16(cpu_backend, dtype)
    x, w, b, a, bb = _inputs((3, 5, 23), 13, 7, dtype)
    leaves = [t.requires_grad_() for t in (x, w, b, a, bb)]
    ours, g = _grads(lambda: fused_lora.lora_linear(x, w, b, a, bb, 0.5), *leaves)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    out64 = _plain_torch(*leaves64, 0.5)
    out64.backward(g.double())
    leaves_same = [t.detach().clone().requires_grad_() for t in leaves]
    _plain_torch(*leaves_same, 0.5).backward(g)
    for name, o, r64, same in zip("x w b a B".split(), ours, leaves64, leaves_same):
        assert_close_vs_reference(o, r64.grad, same.grad, atol=ATOL[dtype] * 10, name=f"d{name}")


@pytest.mark.parametrize("cpu_backend", CPU_BACKENDS, indirect=True)
def test_gradcheck_float64_with_dropout(cpu_backend):
    x, w, b, a, bb = _inputs((2, 3, 6), 5, 3, torch.float64)
    for t in (x, a, bb):
        t.requires_grad_()

    def f(x, a, bb):
        torch.manual_seed(7)  # the same mask at every evaluation
        return fused_lora.lora_linear(x, w, b, a, bb, 1.5, dropout_p=0.4, training=True)

    assert torch.autograd.gradcheck(f, (x, a, bb), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("cpu_backend", CPU_BACKENDS, indirect=True)
def test_gradcheck_rows_float64_with_dropout(cpu_backend):
    x, w, b, _, _ = _inputs((4, 2, 6), 5, 1, torch.float64)
    a = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    bb = torch.randn(5, 5, dtype=torch.float64, requires_grad=True)
    x.requires_grad_()
    ids = torch.tensor([0, -1, 1, 0])

    def f(x, a, bb):
        torch.manual_seed(3)
        return fused_lora.lora_linear_rows(x, w, b, a, bb, [0.5, 2.0], [2, 3], ids, dropout_p=[0.3, 0.0], training=True)

    assert torch.autograd.gradcheck(f, (x, a, bb), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("cpu_backend", ALL_BACKENDS, indirect=True)
def test_rows_gradients_come_only_from_own_rows(cpu_backend):
    ranks = [2, 3]
    x, w, b, _, _ = _inputs((6, 10), 4, 1, torch.float32)
    a = torch.randn(5, 10, requires_grad=True)
    bb = torch.randn(4, 5, requires_grad=True)
    ids = torch.tensor([0, 0, -1, -1, 0, 0])  # adapter 1 owns no row
    y = fused_lora.lora_linear_rows(x, w, b, a, bb, 1.0, ranks, ids)
    y.sum().backward()
    assert a.grad[2:].abs().max() == 0 and bb.grad[:, 2:].abs().max() == 0
    assert a.grad[:2].abs().max() > 0


def test_autocast_matches_peft_dtype_behaviour():
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as PeftLinear

    base = torch.nn.Linear(32, 24)
    layer = PeftLinear(base, "default", LoraConfig(r=4, lora_alpha=8), r=4, lora_alpha=8)
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    x = torch.randn(5, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = layer(x)
        ours = fused_lora.lora_linear(
            x,
            base.weight,
            base.bias,
            layer.lora_A["default"].weight,
            layer.lora_B["default"].weight,
            layer.scaling["default"],
        )
    assert ours.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), expected.float(), atol=0.1, rtol=0.02)


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(x=torch.randn(3, 9)), r"x \(shape \(3, 9\).*in_features"),
        (dict(weight=torch.randn(8, 16, 2)), r"weight .*2-D"),
        (dict(bias=torch.randn(7)), r"bias \(shape \(7,\)"),
        (dict(lora_a=torch.randn(4, 15)), r"lora_a \(shape \(4, 15\)"),
        (dict(lora_b=torch.randn(9, 4)), r"lora_b \(shape \(9, 4\)"),
        (dict(lora_b=torch.randn(8, 3)), r"rank mismatch"),
        (dict(x=torch.randn(3, 16, dtype=torch.float16)), r"must share a dtype"),
        (dict(x=torch.randint(0, 3, (3, 16))), r"x .*unsupported dtype"),
        (dict(lora_a=torch.randn(4, 16, device="meta")), r"lora_a .*meta.* is on meta but x is on cpu"),
    ],
)
def test_bad_input_names_the_tensor(bad, match):
    args = dict(
        x=torch.randn(3, 16),
        weight=torch.randn(8, 16),
        bias=torch.randn(8),
        lora_a=torch.randn(4, 16),
        lora_b=torch.randn(8, 4),
    )
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        fused_lora.lora_linear(args["x"], args["weight"], args["bias"], args["lora_a"], args["lora_b"], 1.0)


def test_bad_splits_dropout_and_ids():
    x, w, b, a, bb = _inputs((3, 16), 8, 4, torch.float32)
    with pytest.raises(ValueError, match=r"rank_splits=\[1, 2\] sum to 3 but lora_a has 4"):
        fused_lora.lora_linear(x, w, b, a, bb, 1.0, rank_splits=[1, 2])
    with pytest.raises(ValueError, match=r"dropout_p=1.0: every rate must be in \[0, 1\)"):
        fused_lora.lora_linear(x, w, b, a, bb, 1.0, dropout_p=1.0, training=True)
    with pytest.raises(ValueError, match=r"scaling=\[1.0\] has 1 values but there are 2 adapters"):
        fused_lora.lora_linear(x, w, b, a, bb, [1.0], rank_splits=[2, 2])
    with pytest.raises(ValueError, match=r"adapter_ids .*one id per row \(3\)"):
        fused_lora.lora_linear_rows(x, w, b, a, bb, 1.0, [4], torch.tensor([0, 0]))
    with pytest.raises(TypeError, match=r"adapter_ids .*integer"):
        fused_lora.lora_linear_rows(x, w, b, a, bb, 1.0, [4], torch.tensor([0.0, 0.0, 0.0]))


@pytest.mark.parametrize("cpu_backend", CPU_BACKENDS, indirect=True)
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_many_row_blocks_with_grad(cpu_backend, dropout_p):
    """Enough rows for the C++ backend to split the batch over worker threads while inputs require grad."""
    x, w, b, a, bb = _inputs((300, 40), 24, 6, torch.float32)
    for t in (x, a, bb):
        t.requires_grad_()
    torch.manual_seed(5)
    y = fused_lora.lora_linear(x, w, b, a, bb, 0.5, dropout_p=dropout_p, training=True)
    y.square().sum().backward()
    grads = [t.grad.clone() for t in (x, a, bb)]
    torch.manual_seed(5)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FUSED_LORA_BACKEND", "reference")
        leaves = [t.detach().double().requires_grad_() for t in (x, a, bb)]
        y64 = fused_lora.lora_linear(
            leaves[0], w.double(), b.double(), leaves[1], leaves[2], 0.5, dropout_p=dropout_p, training=True
        )
        y64.square().sum().backward()
    assert_close_vs_reference(y, y64, y64.float(), atol=1e-4)
    for g, ref in zip(grads, leaves):
        assert_close_vs_reference(g, ref.grad, ref.grad.float(), atol=1e-3)
