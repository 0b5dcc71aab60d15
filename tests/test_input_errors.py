"""Bad inputs to lora_linear / lora_linear_rows / merge_: refused before any kernel, with an error that names the
argument and echoes what was given; good inputs of unusual types (0-d tensor rates, integer tensors of ranks)
accepted."""

import re

import pytest
import torch
import torch.nn.functional as F
from checks import assert_close_vs_reference

import fused_lora

ALL_BACKENDS = ["cpp", "reference", "triton"]


def _args(dtype=torch.float32):
    return dict(
        x=torch.randn(3, 16, dtype=dtype),
        weight=torch.randn(8, 16, dtype=dtype),
        bias=torch.randn(8, dtype=dtype),
        lora_a=torch.randn(4, 16, dtype=dtype),
        lora_b=torch.randn(8, 4, dtype=dtype),
    )


def _call(args, **kw):
    return fused_lora.lora_linear(
        args["x"], args["weight"], args["bias"], args["lora_a"], args["lora_b"], kw.pop("scaling", 1.0), **kw
    )


# ---- bias: device and dtype, as F.linear ----
def test_bias_on_another_device_is_refused_naming_both_devices():
    args = _args()
    args["bias"] = torch.randn(8, device="meta")
    with pytest.raises(RuntimeError):
        F.linear(args["x"], args["weight"], args["bias"])
    with pytest.raises(ValueError, match=r"bias \(shape \(8,\), torch.float32, meta\) is on meta but x is on cpu"):
        _call(args)
    ids = torch.zeros(3, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"bias .* is on meta but x is on cpu"):
        fused_lora.lora_linear_rows(
            args["x"], args["weight"], args["bias"], args["lora_a"], args["lora_b"], 1.0, [4], ids
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bias_with_cpu_x_is_refused():
    args = _args()
    args["bias"] = args["bias"].cuda()
    with pytest.raises(ValueError, match=r"bias .*cuda.* is on cuda:0 but x is on cpu"):
        _call(args)


@pytest.mark.parametrize("bias_dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_bias_dtype_must_match_as_for_f_linear(bias_dtype):
    args = _args()
    args["bias"] = args["bias"].to(bias_dtype)
    with pytest.raises(RuntimeError):
        F.linear(args["x"], args["weight"], args["bias"])
    with pytest.raises(TypeError, match=rf"bias \(shape \(8,\), {bias_dtype}, cpu\) must have the dtype of weight"):
        _call(args)


# ---- merge_ / unmerge_ on integer or bool tensors ----
@pytest.mark.parametrize("cpu_backend", ALL_BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.uint8, torch.bool])
@pytest.mark.parametrize("fn", ["merge_", "unmerge_"])
def test_merge_refuses_integer_weights_and_leaves_them_untouched(cpu_backend, dtype, fn):
    weight = torch.randint(0, 2 if dtype == torch.bool else 100, (8, 16)).to(dtype)
    before = weight.clone()
    with pytest.raises(TypeError, match=rf"weight \(shape \(8, 16\), {dtype}, cpu\): unsupported dtype"):
        getattr(fused_lora, fn)(weight, torch.randn(4, 16), torch.randn(8, 4), 0.5)
    assert torch.equal(weight, before)


@pytest.mark.parametrize("cpu_backend", ALL_BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.int8, torch.int64, torch.bool])
def test_merge_refuses_integer_adapters_and_leaves_the_weight_untouched(cpu_backend, dtype):
    weight = torch.randn(8, 16)
    before = weight.clone()
    a = torch.randint(0, 2, (4, 16)).to(dtype)
    with pytest.raises(TypeError, match=rf"lora_a \(shape \(4, 16\), {dtype}, cpu\): unsupported dtype"):
        fused_lora.merge_(weight, a, torch.randn(8, 4).to(dtype), 0.5)
    assert torch.equal(weight.view(torch.int32), before.view(torch.int32))


# ---- scaling, dropout_p, rank_splits ----
@pytest.mark.parametrize(
    "scaling,error,shown",
    [
        ("0.5", TypeError, "scaling='0.5'"),
        (1 + 2j, TypeError, "scaling=(1+2j)"),
        (True, TypeError, "scaling=True"),
        (float("nan"), ValueError, "scaling=nan"),
        (float("inf"), ValueError, "scaling=inf"),
        ([0.5, "2"], TypeError, "scaling=[0.5, '2']"),
        ([0.5, 1.0, 2.0], ValueError, "scaling=[0.5, 1.0, 2.0] has 3 values but there are 2 adapters"),
        ([0.5, float("nan")], ValueError, "scaling=[0.5, nan]"),
        (torch.tensor([1.0, 2.0, 3.0]), ValueError, "scaling (shape (3,), torch.float32, cpu)"),
        (torch.tensor(1 + 2j), TypeError, "scaling=tensor(1.+2.j)"),
        (None, TypeError, "scaling=None"),
    ],
)
def test_bad_scaling_names_the_argument_and_the_value(scaling, error, shown):
    with pytest.raises(error, match=re.escape(shown)):
        _call(_args(), scaling=scaling, rank_splits=[2, 2])


@pytest.mark.parametrize(
    "dropout_p,error,shown",
    [
        ("0.1", TypeError, "dropout_p='0.1'"),
        (True, TypeError, "dropout_p=True"),
        (float("nan"), ValueError, "dropout_p=nan"),
        (float("inf"), ValueError, "dropout_p=inf"),
        (torch.tensor(1.5), ValueError, "dropout_p=tensor(1.5000)"),
        ([0.1], ValueError, "dropout_p=[0.1] has 1 values but there are 2 adapters"),
        ([0.1, 1 + 1j], TypeError, "dropout_p=[0.1, (1+1j)]"),
    ],
)
def test_bad_dropout_names_the_argument_and_the_value(dropout_p, error, shown):
    with pytest.raises(error, match=re.escape(shown)):
        _call(_args(), dropout_p=dropout_p, training=True, rank_splits=[2, 2])


@pytest.mark.parametrize("cpu_backend", ALL_BACKENDS, indirect=True)
@pytest.mark.parametrize("as_tensor", ["0-d", "list of 0-d"])
def test_dropout_rate_as_a_0d_tensor_is_accepted(cpu_backend, as_tensor):
    args = _args()
    rate = torch.tensor(0.25) if as_tensor == "0-d" else [torch.tensor(0.25), torch.tensor(0.5, dtype=torch.float64)]
    floats = 0.25 if as_tensor == "0-d" else [0.25, 0.5]
    torch.manual_seed(3)
    ours = _call(args, dropout_p=rate, training=True, rank_splits=[2, 2])
    torch.manual_seed(3)
    expected = _call(args, dropout_p=floats, training=True, rank_splits=[2, 2])
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    torch.manual_seed(3)
    assert not torch.equal(ours, _call(args, rank_splits=[2, 2]))  # the rate was applied


@pytest.mark.parametrize(
    "rank_splits,shown",
    [
        ([1.5, 2.5], "rank_splits=[1.5, 2.5]: ranks must be integers, got float 1.5"),
        ([2.0, 2.0], "rank_splits=[2.0, 2.0]: ranks must be integers, got float 2.0"),
        ([True, 3], "rank_splits=[True, 3]: ranks must be integers"),
        ("22", "rank_splits='22'"),
        (4, "rank_splits=4"),
        ([0, 4], "rank_splits=[0, 4]: every rank must be >= 1"),
    ],
)
def test_bad_rank_splits_names_the_argument_and_the_value(rank_splits, shown):
    with pytest.raises((TypeError, ValueError), match=re.escape(shown)):
        _call(_args(), rank_splits=rank_splits)


def test_scaling_and_splits_of_unusual_but_valid_types_are_accepted():
    args = _args()
    np = pytest.importorskip("numpy")
    x64 = {k: v.double() for k, v in args.items()}
    expected = x64["x"] @ x64["weight"].T + x64["bias"]
    expected += 0.5 * (x64["x"] @ x64["lora_a"][:1].T) @ x64["lora_b"][:, :1].T
    expected += 2.0 * (x64["x"] @ x64["lora_a"][1:].T) @ x64["lora_b"][:, 1:].T
    for scaling, splits in [
        ([np.float32(0.5), torch.tensor(2.0)], torch.tensor([1, 3])),
        ((0.5, 2), (np.int64(1), 3)),
        (torch.tensor([0.5, 2.0, 2.0, 2.0]), None),
    ]:
        ours = _call(args, scaling=scaling, rank_splits=splits)
        assert_close_vs_reference(ours, expected, expected.float(), atol=1e-4)
