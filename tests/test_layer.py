"""FusedLoRALinear: construction, PEFT-like attributes and init, replace_linear, scaling, mixed activation
(several active adapters in one fused call) against a float64 reference, with gradients per adapter."""

import math

import pytest
import torch
from checks import assert_close_vs_reference
from torch import nn

import fused_lora
from fused_lora import FusedLoRALinear, replace_linear

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
RANKS = [1, 7, 3, 16, 2, 33, 5, 128]


def dtype_id(dtype):
    """Readable test ids (float16, bfloat16...) so a backend's run can deselect e.g. -k "not bfloat16"."""
    return str(dtype).removeprefix("torch.")  # n adapters use the first n: rank 1 and 7, odd, and a full 128


# ---- helpers shared by the other test_layer_* files -----------------------------------------------------------
def make_layer(n_adapters, dtype=torch.float32, k=37, n_out=29, bias=True, ranks=RANKS, **options):
    """A layer with n adapters named a0..a(n-1), all active, with random (non-zero) A and B."""
    base = nn.Linear(k, n_out, bias=bias, dtype=dtype)
    layer = FusedLoRALinear.from_linear(
        base, "a0", r=ranks[0], lora_alpha=2 * ranks[0], init_lora_weights=False, **options
    )
    for i in range(1, n_adapters):
        layer.add_adapter(
            f"a{i}", ranks[i], lora_alpha=ranks[i] + i, init_lora_weights=False, use_rslora=(i % 3 == 2), **options
        )
    layer.set_adapter([f"a{i}" for i in range(n_adapters)])
    return layer


def plain_lora(x, weight, bias, adapters, row_masks=None):
    """The unfused formula (PEFT's), at the dtype of its inputs: float64 copies give the reference.
    adapters: list of (A, B, lora_b_bias or None, scaling); row_masks[i]: [M] 0/1 rows using adapter i."""
    y = x @ weight.T + (0 if bias is None else bias)
    x2 = x.reshape(-1, x.shape[-1])
    extra = 0
    for i, (a, b, b_bias, s) in enumerate(adapters):
        out = (x2.to(a.dtype) @ a.T) @ b.T + (0 if b_bias is None else b_bias)
        out = out * s
        if row_masks is not None:
            out = out * row_masks[i].to(out.dtype)[:, None]
        extra = extra + out
    return (y + extra.reshape(*x.shape[:-1], -1)).to(x.dtype) if adapters else y


def layer_tensors(layer, names, dtype=None):
    """Leaf copies (requires_grad) of the base and of the named adapters, optionally cast (float64)."""

    def leaf(t):
        return None if t is None else t.detach().to(dtype or t.dtype).clone().requires_grad_(True)

    base = layer.base_layer
    adapters = [
        (
            leaf(layer.lora_A[n].weight),
            leaf(layer.lora_B[n].weight),
            leaf(layer.lora_B[n].bias),
            float(layer.scaling[n]),
        )
        for n in names
    ]
    return leaf(base.weight), leaf(base.bias), adapters


def run_plain(layer, x, names, dy, dtype=None, row_masks=None):
    """Forward and backward of plain_lora at `dtype` (None: the layer's own dtypes). Returns y, dx, [(dA, dB)]."""
    w, b, adapters = layer_tensors(layer, names, dtype)
    xl = x.detach().to(dtype or x.dtype).clone().requires_grad_(True)
    y = plain_lora(xl, w, b, adapters, row_masks)
    y.backward(dy.to(y.dtype))
    return y.detach(), xl.grad, [(a.grad, bb.grad) for a, bb, _, _ in adapters]


def check_against_reference(layer, x, names, dtype, row_masks=None, unused=(), **forward_kwargs):
    """Layer output and gradients (x, every adapter) vs float64, relative to plain torch at the same dtype.
    `unused`: adapters no row of a mixed batch (adapter_names) uses: PEFT leaves their gradients None."""
    x = x.detach().clone().requires_grad_(True)
    for table in (layer.lora_A, layer.lora_B):
        for p in table.parameters():
            p.grad = None
    y = layer(x, **forward_kwargs)
    dy = torch.randn_like(y)
    y.backward(dy)
    y64, dx64, grads64 = run_plain(layer, x, names, dy, torch.float64, row_masks)
    y_t, dx_t, grads_t = run_plain(layer, x, names, dy, None, row_masks)
    atol = ATOL[dtype]
    assert_close_vs_reference(y.detach(), y64, y_t, atol=atol, name="y")
    assert_close_vs_reference(x.grad, dx64, dx_t, atol=atol, name="dx")
    for name, (da64, db64), (da_t, db_t) in zip(names, grads64, grads_t):
        if name in unused:
            assert layer.lora_A[name].weight.grad is None and layer.lora_B[name].weight.grad is None, name
            assert not da64.any() and not db64.any(), name
            continue
        assert_close_vs_reference(layer.lora_A[name].weight.grad, da64, da_t, atol=atol, name=f"dA[{name}]")
        assert_close_vs_reference(layer.lora_B[name].weight.grad, db64, db_t, atol=atol, name=f"dB[{name}]")


# ---- construction and attributes ---------------------------------------------------------------------------
def test_attributes_and_state_dict_names_follow_peft():
    layer = FusedLoRALinear(11, 5, bias=True, adapter_name="x", r=4, lora_alpha=8, lora_dropout=0.1)
    layer.add_adapter("y", 2, 3, use_rslora=True, lora_bias=True)
    assert (layer.in_features, layer.out_features) == (11, 5)
    assert layer.r == {"x": 4, "y": 2} and layer.lora_alpha == {"x": 8, "y": 3}
    assert layer.scaling == {"x": 2.0, "y": 3 / math.sqrt(2)}
    assert layer.use_rslora == {"x": False, "y": True} and layer.lora_bias == {"x": False, "y": True}
    assert isinstance(layer.lora_dropout["x"], nn.Dropout) and layer.lora_dropout["x"].p == 0.1
    assert isinstance(layer.lora_dropout["y"], nn.Identity)
    assert layer.active_adapter == "x" or layer.active_adapter == ["x"]
    assert layer.active_adapters == ["x"] and not layer.merged and layer.merged_adapters == []
    assert set(layer.state_dict()) == {
        "base_layer.weight",
        "base_layer.bias",
        "lora_A.x.weight",
        "lora_A.y.weight",
        "lora_B.x.weight",
        "lora_B.y.weight",
        "lora_B.y.bias",
    }
    assert layer.lora_B["y"].bias is not None and layer.lora_B["x"].bias is None
    # as PEFT's set_adapter: only active adapters train
    assert layer.lora_A["x"].weight.requires_grad and not layer.lora_A["y"].weight.requires_grad
    layer.set_adapter(["x", "y"])
    assert layer.active_adapters == ["x", "y"] and layer.lora_B["y"].bias.requires_grad
    assert layer.adapter_index("x") == 0 and layer.adapter_index("y") == 1
    with pytest.raises(ValueError, match="'z' not found"):
        layer.adapter_index("z")


def test_init_modes_match_peft():
    base = nn.Linear(64, 48)
    default = FusedLoRALinear.from_linear(base, r=16)
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=sqrt(5)) on fan_in 64
    a = default.lora_A["default"].weight
    assert a.abs().max() <= bound and a.abs().max() > 0.5 * bound
    assert torch.count_nonzero(default.lora_B["default"].weight) == 0
    gaussian = FusedLoRALinear.from_linear(base, r=16, init_lora_weights="gaussian")
    assert abs(gaussian.lora_A["default"].weight.std().item() - 1 / 16) < 0.01
    assert torch.count_nonzero(gaussian.lora_B["default"].weight) == 0
    random = FusedLoRALinear.from_linear(base, r=16, init_lora_weights=False)
    assert torch.count_nonzero(random.lora_B["default"].weight) > 0
    # seeded, the draws are PEFT's own
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as PeftLinear

    for init in (True, "gaussian", False):
        torch.manual_seed(5)
        lora_bias = init != "gaussian"  # PEFT refuses lora_bias with gaussian init, and so do we
        ours = FusedLoRALinear.from_linear(base, r=4, lora_alpha=8, init_lora_weights=init, lora_bias=lora_bias)
        torch.manual_seed(5)
        theirs = PeftLinear(
            base,
            "default",
            config=LoraConfig(r=4, lora_alpha=8, init_lora_weights=init, lora_bias=lora_bias),
            r=4,
            lora_alpha=8,
        )
        for key, value in theirs.state_dict().items():
            assert torch.equal(ours.state_dict()[key], value), (init, key)


def test_adapter_dtype_and_device_follow_base():
    base16 = nn.Linear(8, 4, dtype=torch.bfloat16)
    assert FusedLoRALinear.from_linear(base16, r=2).lora_A["default"].weight.dtype == torch.float32
    kept = FusedLoRALinear.from_linear(base16, r=2, autocast_adapter_dtype=False)
    assert kept.lora_A["default"].weight.dtype == kept.lora_B["default"].weight.dtype == torch.bfloat16
    base64 = nn.Linear(8, 4, dtype=torch.float64)
    assert FusedLoRALinear.from_linear(base64, r=2).lora_B["default"].weight.dtype == torch.float64
    assert FusedLoRALinear.from_linear(base16, r=2).lora_A["default"].weight.device == base16.weight.device


def test_constructor_builds_its_own_linear():
    layer = FusedLoRALinear(9, 3, bias=False, dtype=torch.float16)
    assert layer.base_layer.bias is None and layer.base_layer.weight.dtype == torch.float16
    assert len(layer.lora_A) == 0
    x = torch.randn(2, 9, dtype=torch.float16)
    assert torch.equal(layer(x), layer.base_layer(x))  # no adapter: the base layer alone


@pytest.mark.parametrize("option", ["use_dora", "use_qalora", "alora_invocation_tokens", "use_bdlora"])
def test_variants_are_refused_by_name(option):
    value = [1, 2] if option == "alora_invocation_tokens" else True
    with pytest.raises(ValueError, match=option):
        FusedLoRALinear.from_linear(nn.Linear(4, 4), r=2, **{option: value})
    layer = FusedLoRALinear.from_linear(nn.Linear(4, 4), r=2)
    with pytest.raises(ValueError, match=option):
        layer.add_adapter("other", 2, 2, **{option: value})
    assert "other" not in layer.lora_A
    FusedLoRALinear.from_linear(nn.Linear(4, 4), r=2, use_dora=False)  # falsy variant options are plain LoRA


def test_bad_adapter_arguments():
    with pytest.raises(ValueError, match="positive integer"):
        FusedLoRALinear.from_linear(nn.Linear(4, 4), r=0)
    with pytest.raises(ValueError, match="lora_dropout"):
        FusedLoRALinear.from_linear(nn.Linear(4, 4), r=2, lora_dropout=1.0)
    with pytest.raises(ValueError, match="lora_bias=True is only supported"):
        FusedLoRALinear.from_linear(nn.Linear(4, 4), r=2, init_lora_weights="gaussian", lora_bias=True)
    with pytest.raises(ValueError, match="init_lora_weights='pissa'"):
        FusedLoRALinear.from_linear(nn.Linear(4, 4), r=2, init_lora_weights="pissa")
    with pytest.raises(TypeError, match="lora_alhpa"):
        FusedLoRALinear.from_linear(nn.Linear(4, 4), r=2, lora_alhpa=3)
    with pytest.raises(ValueError, match="__base__"):
        FusedLoRALinear.from_linear(nn.Linear(4, 4), "__base__", r=2)
    with pytest.raises(ValueError, match="fan_in_fan_out"):
        FusedLoRALinear.from_linear(nn.Linear(4, 4), r=2, fan_in_fan_out=True)
    with pytest.raises(TypeError, match="nn.Linear"):
        FusedLoRALinear.from_linear(nn.Conv1d(4, 4, 1), r=2)
    layer = FusedLoRALinear.from_linear(nn.Linear(4, 4), r=2)
    with pytest.raises(ValueError, match="x .*shape \\(3, 5\\)"):
        layer(torch.randn(3, 5))


def test_delete_adapter_and_new_active():
    layer = make_layer(3)
    layer.set_adapter("a1")
    with pytest.warns(UserWarning, match="Setting active adapter to a0"):
        layer.delete_adapter("a1")
    assert list(layer.lora_A.keys()) == ["a0", "a2"] and layer.active_adapters == ["a0"]
    assert "a1" not in layer.r and "a1" not in layer.scaling and "a1" not in layer.lora_dropout
    assert layer.adapter_index("a2") == 1
    layer.set_adapter(["a0", "a2"])
    layer.delete_adapter("a0")
    assert layer.active_adapters == ["a2"]
    with pytest.raises(ValueError, match="not found"):
        layer.delete_adapter("a0")


# ---- replace_linear -----------------------------------------------------------------------------------------
class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(8, 8)
        self.v_proj = nn.Linear(8, 8, bias=False)
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))

    def forward(self, x):
        return self.mlp(self.q_proj(x) + self.v_proj(x))


def _model():
    return nn.Sequential(_Block(), _Block())


def test_replace_linear_suffix_shares_weights_and_counts():
    model = _model()
    original = model[1].q_proj
    x = torch.randn(3, 8)
    y_before = model(x)
    count = replace_linear(model, ["q_proj", "v_proj"], r=4, lora_alpha=8)
    assert count == 4
    fused = model[1].q_proj
    assert isinstance(fused, FusedLoRALinear) and fused.base_layer is original
    assert fused.base_layer.weight.data_ptr() == original.weight.data_ptr()
    assert not original.weight.requires_grad and fused.lora_A["default"].weight.requires_grad
    assert isinstance(model[0].mlp[0], nn.Linear) and not isinstance(model[0].mlp[0], FusedLoRALinear)
    torch.testing.assert_close(model(x), y_before)  # B = 0 at init: outputs unchanged
    # again, a new adapter is added to the fused layers, not wrapped twice
    assert replace_linear(model, ["q_proj"], adapter_name="second", r=2) == 2
    assert list(model[0].q_proj.lora_A.keys()) == ["default", "second"]
    assert isinstance(model[0].q_proj.base_layer, nn.Linear)


def test_replace_linear_exact_name_and_regex():
    model = _model()
    assert replace_linear(model, ["0.mlp.2"], r=2) == 1
    assert isinstance(model[0].mlp[2], FusedLoRALinear) and not isinstance(model[1].mlp[2], FusedLoRALinear)
    model = _model()
    assert replace_linear(model, r".*\.mlp\.[02]", r=2) == 4  # a regex must match the whole name
    with pytest.raises(ValueError, match="not found"):
        replace_linear(_model(), r"mlp\.0", r=2)  # "0.mlp.0" is not a full match


def test_replace_linear_errors():
    with pytest.raises(ValueError, match="not found"):
        replace_linear(_model(), ["k_proj"], r=2)
    with pytest.raises(TypeError, match="GELU"):
        replace_linear(_model(), r".*mlp\.\d", r=2)
    with pytest.raises(ValueError, match="use_dora"):
        replace_linear(_model(), ["q_proj"], r=2, use_dora=True)


# ---- forward: mixed activation -----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_mixed_activation_vs_float64(n, dtype):
    layer = make_layer(n, dtype, bias=(n % 2 == 1))
    names = [f"a{i}" for i in range(n)]
    x = torch.randn(2, 5, 37, dtype=dtype)
    check_against_reference(layer, x, names, dtype)


def test_mixed_activation_subset_noncontiguous_and_empty():
    layer = make_layer(4)
    layer.set_adapter(["a3", "a1"])  # order of activation does not matter for the sum
    x = torch.randn(37, 6).T  # rows not contiguous
    check_against_reference(layer, x, ["a3", "a1"], torch.float32)
    y = layer(torch.randn(0, 37))
    assert y.shape == (0, 29)


def test_adapters_in_x_dtype_and_other_low_precision():
    layer = make_layer(2, torch.float16, autocast_adapter_dtype=False)
    assert layer.lora_A["a0"].weight.dtype == torch.float16
    check_against_reference(layer, torch.randn(7, 37, dtype=torch.float16), ["a0", "a1"], torch.float16)
    # bfloat16 adapters on float16 inputs: cast to x's dtype (the op takes x's dtype or float32)
    layer.lora_A["a1"].to(torch.bfloat16)
    layer.lora_B["a1"].to(torch.bfloat16)
    y = layer(torch.randn(3, 37, dtype=torch.float16))
    assert y.dtype == torch.float16 and torch.isfinite(y).all()


def test_scaling_is_read_at_every_call():
    layer = make_layer(2)
    x = torch.randn(4, 37)
    with torch.no_grad():
        layer.scaling["a1"] = 0.0
        y_a0 = layer(x)
        layer.set_adapter("a0")
        torch.testing.assert_close(layer(x), y_a0)
        layer.set_adapter(["a0", "a1"])
        layer.set_scale("a1", 3.0)
        assert layer.scaling["a1"] == 3.0 * layer.lora_alpha["a1"] / layer.r["a1"]
        layer.scaling["a0"] = 0.25
    check_against_reference(layer, x, ["a0", "a1"], torch.float32)
    layer.set_scale("a2", 5.0)  # an adapter this layer does not hold: ignored, as PEFT
    rs = make_layer(3)  # a2 uses rsLoRA
    rs.set_scale("a2", 2.0)
    assert rs.scaling["a2"] == pytest.approx(2.0 * rs.lora_alpha["a2"] / math.sqrt(rs.r["a2"]))
    rs.scale_layer(0.5)
    assert rs.scaling["a2"] == pytest.approx(rs.lora_alpha["a2"] / math.sqrt(rs.r["a2"]))
    rs.unscale_layer()
    assert rs.scaling["a0"] == rs.lora_alpha["a0"] / rs.r["a0"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_lora_bias_is_scaled_like_peft(dtype):
    layer = make_layer(3, dtype, lora_bias=True)
    for i in range(3):
        with torch.no_grad():
            layer.lora_B[f"a{i}"].bias.normal_()
    check_against_reference(layer, torch.randn(2, 3, 37, dtype=dtype), ["a0", "a1", "a2"], dtype)
    grads = [layer.lora_B[f"a{i}"].bias.grad for i in range(3)]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # d(y)/d(bias_i) = s_i * sum of dy over rows; compare two adapters' ratio to their scalings
    ratio = (grads[0] / grads[1]).to(torch.float64)
    expected = layer.scaling["a0"] / layer.scaling["a1"]
    assert torch.allclose(ratio, torch.full_like(ratio, expected), rtol=2e-2 if dtype == torch.bfloat16 else 1e-4)


def test_lora_bias_without_base_bias_warns_and_runs():
    with pytest.warns(UserWarning, match="no bias"):
        layer = make_layer(1, bias=False, lora_bias=True)
    with torch.no_grad():
        layer.lora_B["a0"].bias.normal_()
    check_against_reference(layer, torch.randn(4, 37), ["a0"], torch.float32)


def test_disabled_adapters_give_the_base_layer():
    layer = make_layer(3)
    x = torch.randn(4, 37)
    layer.enable_adapters(False)
    assert layer.disable_adapters and not layer.lora_A["a0"].weight.requires_grad
    torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=0, atol=0)
    torch.testing.assert_close(layer(x, adapter_names=["a1"] * 4), layer.base_layer(x), rtol=0, atol=0)
    layer.disable_adapters = False
    assert layer.lora_A["a0"].weight.requires_grad
    assert not torch.allclose(layer(x), layer.base_layer(x))


def test_dropout_per_adapter_is_fused_and_only_in_training():
    layer = make_layer(3)
    layer.lora_dropout["a0"] = nn.Dropout(0.5)
    layer.lora_dropout["a2"] = nn.Dropout(0.1)
    names = ["a0", "a1", "a2"]
    x = torch.randn(6, 37)
    layer.eval()
    y_eval = layer(x)
    check_against_reference(layer, x, names, torch.float32)  # eval: no dropout at all
    layer.train()
    torch.manual_seed(99)
    y_train = layer(x)
    assert not torch.allclose(y_train, y_eval)
    # the layer hands the op the stacked adapters and one rate per adapter, in active order
    a = torch.cat([layer.lora_A[n].weight for n in names])
    b = torch.cat([layer.lora_B[n].weight for n in names], 1)
    torch.manual_seed(99)
    expected = fused_lora.lora_linear(
        x,
        layer.base_layer.weight,
        layer.base_layer.bias,
        a,
        b,
        [layer.scaling[n] for n in names],
        dropout_p=[0.5, 0.0, 0.1],
        training=True,
        rank_splits=[layer.r[n] for n in names],
    )
    torch.testing.assert_close(y_train, expected, rtol=0, atol=0)
    layer.lora_dropout["a0"].p = 0.0  # read at every call, like scaling
    layer.lora_dropout["a2"].p = 0.0
    torch.testing.assert_close(layer(x), y_eval)


def test_autocast_runs_in_the_autocast_dtype():
    layer = make_layer(2)
    x = torch.randn(5, 37)
    with torch.autocast("cpu", dtype=torch.float16):
        y = layer(x)
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.float(), layer(x), rtol=5e-3, atol=5e-3)


def test_gradients_reach_only_active_trainable_adapters():
    layer = make_layer(3)
    layer.set_adapter(["a0", "a2"])
    x = torch.randn(4, 37)
    layer(x).sum().backward()
    assert layer.lora_A["a1"].weight.grad is None and layer.lora_B["a1"].weight.grad is None
    assert layer.lora_A["a0"].weight.grad is not None and layer.lora_B["a2"].weight.grad is not None
