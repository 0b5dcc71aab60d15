"""FusedLoRALinear against PEFT's own LoRA Linear (peft.tuners.lora.layer.Linear): state_dicts load both ways,
and with the same weights (dropout 0) outputs, gradients, mixed batches and merges agree."""

import copy

import pytest
import torch
from checks import assert_close_vs_reference
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import Linear as PeftLinear
from test_layer import ATOL, dtype_id
from torch import nn

from fused_lora import FusedLoRALinear, replace_linear

# (name, r, lora_alpha, use_rslora, lora_bias)
ADAPTERS = [("first", 7, 14, False, True), ("second", 1, 3, True, False), ("third", 16, 8, False, True)]


def _config(r, alpha, rslora, lora_bias):
    return LoraConfig(
        r=r, lora_alpha=alpha, use_rslora=rslora, lora_bias=lora_bias, init_lora_weights=False, lora_dropout=0.0
    )


def _peft_layer(base):
    name, r, alpha, rslora, lora_bias = ADAPTERS[0]
    layer = PeftLinear(base, name, config=_config(r, alpha, rslora, lora_bias), r=r, lora_alpha=alpha)
    for name, r, alpha, rslora, lora_bias in ADAPTERS[1:]:
        layer.update_layer(name, r, alpha, config=_config(r, alpha, rslora, lora_bias))
    layer.set_adapter([a[0] for a in ADAPTERS])
    return layer


def _our_layer(base, adapter_dtype_autocast=True):
    name, r, alpha, rslora, lora_bias = ADAPTERS[0]
    layer = FusedLoRALinear.from_linear(
        base,
        name,
        r=r,
        lora_alpha=alpha,
        use_rslora=rslora,
        lora_bias=lora_bias,
        init_lora_weights=False,
        autocast_adapter_dtype=adapter_dtype_autocast,
    )
    for name, r, alpha, rslora, lora_bias in ADAPTERS[1:]:
        layer.add_adapter(
            name,
            r,
            alpha,
            use_rslora=rslora,
            lora_bias=lora_bias,
            init_lora_weights=False,
            autocast_adapter_dtype=adapter_dtype_autocast,
        )
    layer.set_adapter([a[0] for a in ADAPTERS])
    return layer


def _pair(dtype=torch.float32, k=45, n=33):
    """PEFT's layer with random weights (B and lora_B bias non-zero) and ours loaded from its state_dict.
    Over a half-precision base both use float32 adapters, as get_peft_model's autocast_adapter_dtype does."""
    base = nn.Linear(k, n, dtype=dtype)
    theirs = _peft_layer(base)
    for p in theirs.lora_B.parameters():
        with torch.no_grad():
            p.normal_()
    if dtype != torch.float32:
        theirs.lora_A.float()
        theirs.lora_B.float()
    ours = _our_layer(copy.deepcopy(base))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


def test_state_dict_keys_and_round_trip():
    ours, theirs = _pair()
    assert set(ours.state_dict()) == set(theirs.state_dict())
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    # and back: ours (changed) into a fresh PEFT layer
    with torch.no_grad():
        for p in ours.lora_A.parameters():
            p.mul_(-2)
    fresh = _peft_layer(nn.Linear(45, 33))
    fresh.load_state_dict(ours.state_dict(), strict=True)
    fresh.set_adapter([a[0] for a in ADAPTERS])
    x = torch.randn(4, 45)
    torch.testing.assert_close(ours(x), fresh(x), rtol=1e-5, atol=1e-5)
    assert ours.scaling == pytest.approx(theirs.scaling)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=dtype_id)
def test_forward_and_gradients_match_peft(dtype):
    ours, theirs = _pair(dtype)
    x = torch.randn(3, 5, 45, dtype=dtype)
    x_ours, x_theirs = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_ours, y_theirs = ours(x_ours), theirs(x_theirs)
    assert y_ours.dtype == y_theirs.dtype == dtype
    dy = torch.randn_like(y_ours)
    y_ours.backward(dy)
    y_theirs.backward(dy)
    # float64: PEFT's module math on float64 copies of the same weights
    theirs64 = copy.deepcopy(theirs).double()
    x64 = x.double().requires_grad_(True)
    y64 = theirs64(x64)
    y64.backward(dy.double())
    atol = ATOL[dtype]
    assert_close_vs_reference(y_ours.detach(), y64, y_theirs.detach(), atol=atol, name="y")
    assert_close_vs_reference(x_ours.grad, x64.grad, x_theirs.grad, atol=atol, name="dx")
    for name, *_ in ADAPTERS:
        for table in ("lora_A", "lora_B"):
            ours_p, theirs_p = getattr(ours, table)[name], getattr(theirs, table)[name]
            ref_p = getattr(theirs64, table)[name]
            assert_close_vs_reference(
                ours_p.weight.grad,
                ref_p.weight.grad,
                theirs_p.weight.grad,
                atol=atol,
                name=f"{table}[{name}].weight.grad",
            )
            if ours_p.bias is not None:
                assert_close_vs_reference(
                    ours_p.bias.grad, ref_p.bias.grad, theirs_p.bias.grad, atol=atol, name=f"{table}[{name}].bias.grad"
                )


def test_mixed_batch_matches_peft():
    ours, theirs = _pair()
    x = torch.randn(5, 3, 45)
    names = ["second", "__base__", "first", "third", "first"]
    theirs.eval()
    ours.eval()
    torch.testing.assert_close(ours(x, adapter_names=names), theirs(x, adapter_names=names), rtol=1e-5, atol=1e-5)
    for bad in (["first"] * 4,):
        with pytest.raises(ValueError) as ours_error:
            ours(x, adapter_names=bad)
        with pytest.raises(ValueError) as theirs_error:
            theirs(x, adapter_names=bad)
        assert str(ours_error.value) == str(theirs_error.value)


def test_single_active_adapter_and_disabled_match_peft():
    ours, theirs = _pair()
    x = torch.randn(6, 45)
    for active in ("second", ["third", "first"]):
        ours.set_adapter(active)
        theirs.set_adapter(active)
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    ours.enable_adapters(False)
    theirs.enable_adapters(False)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)


def test_merge_matches_peft():
    ours, theirs = _pair()
    ours.merge(["first", "third"])
    theirs.merge(adapter_names=["first", "third"])
    assert ours.merged_adapters == theirs.merged_adapters
    torch.testing.assert_close(ours.base_layer.weight, theirs.base_layer.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.base_layer.bias, theirs.base_layer.bias, rtol=1e-5, atol=1e-6)
    ours.unmerge()
    theirs.unmerge()
    torch.testing.assert_close(ours.base_layer.weight, theirs.base_layer.weight, rtol=1e-5, atol=1e-6)


def test_replace_linear_matches_get_peft_model():
    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Sequential(nn.Linear(20, 20), nn.Linear(20, 6)))

    ours = model()
    replace_linear(ours, ["0", "2.1"], r=4, lora_alpha=8, init_lora_weights=False)
    peft_model = get_peft_model(
        model(), LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2.1"], init_lora_weights=False)
    )
    inner = peft_model.base_model.model
    assert set(ours.state_dict()) == set(inner.state_dict())
    ours.load_state_dict(inner.state_dict(), strict=True)
    x = torch.randn(7, 12)
    torch.testing.assert_close(ours(x), peft_model(x), rtol=1e-5, atol=1e-5)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in inner.named_parameters() if p.requires_grad}
