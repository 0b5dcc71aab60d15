"""FusedLoRALinear per-row adapters: adapter_names (PEFT's mixed batch) and adapter_ids, vs a float64 reference,
with each adapter's gradients coming only from its own rows."""

import pytest
import torch
from test_layer import check_against_reference, dtype_id, make_layer


def _random_names(n_adapters, n_samples, generator):
    choices = [f"a{i}" for i in range(n_adapters)] + ["__base__"]
    picks = torch.randint(0, len(choices), (n_samples,), generator=generator)
    return [choices[i] for i in picks]


def _row_masks(names_per_row, n_adapters):
    return [torch.tensor([float(name == f"a{i}") for name in names_per_row]) for i in range(n_adapters)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("n", [1, 3, 8])
def test_adapter_names_per_sample_3d(n, dtype):
    layer = make_layer(n, dtype, bias=(n != 3))
    samples, seq = 7, 3
    g = torch.Generator().manual_seed(n)
    names = _random_names(n, samples, g)
    names[0], names[-1] = "__base__", "a0"
    per_row = [name for name in names for _ in range(seq)]
    x = torch.randn(samples, seq, 37, dtype=dtype)
    unused = {f"a{i}" for i in range(n)} - set(names)  # their gradients stay None, as in PEFT's mixed batch
    check_against_reference(
        layer,
        x,
        [f"a{i}" for i in range(n)],
        dtype,
        row_masks=_row_masks(per_row, n),
        unused=unused,
        adapter_names=names,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
def test_adapter_ids_per_row(dtype):
    n = 5
    layer = make_layer(n, dtype)
    x = torch.randn(4, 5, 37, dtype=dtype)
    ids = torch.randint(-1, n, (4, 5), generator=torch.Generator().manual_seed(3))
    ids[0, 0] = -1
    per_row = ["__base__" if i < 0 else f"a{i}" for i in ids.reshape(-1).tolist()]
    check_against_reference(
        layer, x, [f"a{i}" for i in range(n)], dtype, row_masks=_row_masks(per_row, n), adapter_ids=ids
    )


def test_ids_follow_lora_a_order_not_activation():
    layer = make_layer(3)
    layer.set_adapter(["a2"])  # rows use any adapter of the layer, active or not (as PEFT's adapter_names)
    x = torch.randn(3, 37)
    ids = torch.tensor([layer.adapter_index("a1"), -1, layer.adapter_index("a2")])
    by_ids = layer(x, adapter_ids=ids)
    by_names = layer(x, adapter_names=["a1", "__base__", "a2"])
    torch.testing.assert_close(by_ids, by_names, rtol=0, atol=0)
    layer.set_adapter("a1")
    torch.testing.assert_close(by_ids[0], layer(x[:1])[0])
    torch.testing.assert_close(by_ids[1], layer.base_layer(x[1:2])[0])


def test_each_adapter_learns_only_from_its_rows():
    layer = make_layer(3)
    x = torch.randn(6, 37)
    names = ["a0", "a0", "__base__", "a2", "a0", "__base__"]
    layer(x, adapter_names=names).square().sum().backward()
    # a1 has no rows: by name, its gradient stays None (as PEFT's mixed batch); by ids (not read on the host) zero
    assert layer.lora_A["a1"].weight.grad is None and layer.lora_B["a1"].weight.grad is None
    by_name = [layer.lora_A[n].weight.grad.clone() for n in ("a0", "a2")]
    layer.zero_grad()
    ids = torch.tensor([layer.adapter_index(n) if n != "__base__" else -1 for n in names])
    layer(x, adapter_ids=ids).square().sum().backward()
    assert torch.count_nonzero(layer.lora_A["a1"].weight.grad) == 0
    assert torch.count_nonzero(layer.lora_B["a1"].weight.grad) == 0
    for n, grad in zip(("a0", "a2"), by_name):
        torch.testing.assert_close(layer.lora_A[n].weight.grad, grad, rtol=1e-6, atol=1e-7)
    layer.zero_grad()
    layer(x, adapter_names=names).square().sum().backward()
    # a2's gradient equals the one from its row alone
    a2_grad = layer.lora_A["a2"].weight.grad.clone()
    layer.zero_grad()
    layer.set_adapter("a2")
    layer(x[3:4]).square().sum().backward()
    torch.testing.assert_close(a2_grad, layer.lora_A["a2"].weight.grad, rtol=1e-5, atol=1e-6)


def test_lora_bias_per_row():
    layer = make_layer(3, lora_bias=True)
    for i in range(3):
        with torch.no_grad():
            layer.lora_B[f"a{i}"].bias.normal_()
    x = torch.randn(5, 2, 37)
    names = ["a1", "__base__", "a0", "a2", "a1"]
    per_row = [n for n in names for _ in range(2)]
    check_against_reference(
        layer, x, ["a0", "a1", "a2"], torch.float32, row_masks=_row_masks(per_row, 3), adapter_names=names
    )
    ids = torch.tensor([1, -1, 0, 2, 1])
    torch.testing.assert_close(layer(x, adapter_ids=ids), layer(x, adapter_names=names), rtol=0, atol=0)


def test_rows_respect_scaling_and_dropout_in_training():
    layer = make_layer(2)
    x = torch.randn(4, 37)
    names = ["a0", "a1", "a1", "__base__"]
    layer.scaling["a1"] = 0.0
    torch.testing.assert_close(layer(x, adapter_names=names)[1:], layer.base_layer(x)[1:])
    layer.set_scale("a1", 1.0)
    layer.lora_dropout["a0"] = torch.nn.Dropout(0.5)
    layer.eval()
    y_eval = layer(x, adapter_names=names)
    layer.train()
    y_train = layer(x, adapter_names=names)
    assert not torch.allclose(y_train[0], y_eval[0])  # a0's row sees dropout
    # the others do not (equal up to accumulation order: a backend may run another kernel when dropout is on)
    torch.testing.assert_close(y_train[1:], y_eval[1:])


def test_row_selection_errors_follow_peft():
    layer = make_layer(2)
    x = torch.randn(3, 37)
    with pytest.raises(
        ValueError, match="Length of `adapter_names` should be the same as the number of inputs, but got 2 and 3"
    ):
        layer(x, adapter_names=["a0", "a1"])
    with pytest.raises(ValueError, match="non-existing adapter\\(s\\): nope"):
        layer(x, adapter_names=["a0", "nope", "__base__"])
    with pytest.raises(ValueError, match="either adapter_names or adapter_ids"):
        layer(x, adapter_names=["a0"] * 3, adapter_ids=torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"adapter_ids must be in \[-1, 2\)"):
        layer(x, adapter_ids=torch.tensor([0, 2, -1]))
    with pytest.raises(TypeError, match="integer tensor"):
        layer(x, adapter_ids=torch.tensor([0.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="one id per row"):
        layer(x, adapter_ids=torch.tensor([0, 1]))
    layer.merge(["a0"])
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when there are merged adapters"):
        layer(x, adapter_names=["a0"] * 3)
    with pytest.raises(ValueError, match="Cannot pass `adapter_ids` when there are merged adapters"):
        layer(x, adapter_ids=torch.zeros(3, dtype=torch.int64))
