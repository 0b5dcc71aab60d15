"""FusedLoRALinear.merge / unmerge: PEFT's bookkeeping and warnings, safe merge, exact restore with keep_original,
the drift of repeated merge/unmerge in low precision, and merged-vs-unmerged outputs within a derived bound."""

import pytest
import torch
from test_layer import dtype_id, make_layer
from torch import nn

import fused_lora.functional
from fused_lora.layer_merge import MergeError

# unit roundoff u: |round(v) - v| <= u |v| for a normal v (round to nearest, precision p bits: u = 2^-p)
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def _delta64(layer, names):
    """sum_i s_i B_i A_i in float64."""
    return sum(
        float(layer.scaling[n]) * (layer.lora_B[n].weight.double() @ layer.lora_A[n].weight.double()) for n in names
    )


def test_merge_matches_float64_and_bookkeeping(monkeypatch):
    layer = make_layer(3, torch.bfloat16)
    w0 = layer.base_layer.weight.detach().clone()
    calls = []
    real_merge = fused_lora.functional.merge_
    monkeypatch.setattr(fused_lora.functional, "merge_", lambda *a, **k: calls.append(k) or real_merge(*a, **k))
    layer.merge()  # default: the active adapters, all in one merge_ call
    assert len(calls) == 1 and calls[0]["rank_splits"] == [1, 7, 3]
    monkeypatch.undo()
    assert layer.merged and layer.merged_adapters == ["a0", "a1", "a2"]
    expected = (w0.double() + _delta64(layer, ["a0", "a1", "a2"])).to(torch.bfloat16)
    # one rounding of the exact sum: at most one bf16 ulp away from the correctly rounded value
    diff = (layer.base_layer.weight.double() - expected.double()).abs()
    assert (diff <= 2 * UNIT_ROUNDOFF[torch.bfloat16] * expected.double().abs() + 1e-30).all()
    with pytest.warns(UserWarning, match="All adapters are already merged, nothing to do."):
        layer.merge()
    layer.unmerge()
    assert not layer.merged and layer.merged_adapters == []
    with pytest.warns(UserWarning, match="Already unmerged. Nothing to do."):
        layer.unmerge()
    layer.merge(["a1"])
    with pytest.warns(
        UserWarning, match="Already following adapters were merged a1. You are now additionally merging a0"
    ):
        layer.merge(["a0", "a1"])
    assert layer.merged_adapters == ["a1", "a0"]
    with pytest.raises(TypeError, match="list of strings"):
        layer.merge("a2")
    with pytest.warns(UserWarning, match="additionally merging not_here"):
        layer.merge(["not_here"])  # as PEFT: names this layer does not hold are skipped
    assert layer.merged_adapters == ["a1", "a0"]
    with pytest.raises(ValueError, match="unmerge"):
        layer.delete_adapter("a0")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_id)
def test_sequential_merge_matches_mixed_activation(dtype):
    """a0 merged into W with a1 active and unmerged, vs both unmerged, elementwise within

        u * (|x| @ |W + D0|^T)  +  u * (|y_seq| + |y_mix|)  +  2 K e32 * (|x| @ (|W| + |D0| + |D1|)^T)

    u: unit roundoff of the dtype, e32 = 2^-24, K = in_features. The first term is the one rounding of the merged
    weight (each merged element is off by at most u|W + D0|, and x multiplies it); the second is the final rounding
    of each output to the dtype; the third is float32 accumulation in a different order (the merged path sums
    x (W + D0) in one GEMM, the mixed path sums x W and the rank terms separately), gamma_K <= K e32 per path."""
    layer = make_layer(2, dtype, k=67, n_out=45, ranks=[7, 16])
    x = torch.randn(3, 4, 67, dtype=dtype)
    with torch.no_grad():
        y_mix = layer(x)
        w = layer.base_layer.weight.double()
        d0, d1 = _delta64(layer, ["a0"]), _delta64(layer, ["a1"])
        layer.merge(["a0"])
        assert layer.active_adapters == ["a0", "a1"]
        y_seq = layer(x)  # W + D0 in the weight, a1 still through the fused op
        ax = x.double().abs()
        u, k = UNIT_ROUNDOFF[dtype], x.shape[-1]
        bound = (
            u * ax @ (w + d0).abs().T
            + u * (y_seq.double().abs() + y_mix.double().abs())
            + 2 * k * 2.0**-24 * ax @ (w.abs() + d0.abs() + d1.abs()).T
        )
        diff = (y_seq.double() - y_mix.double()).abs()
        print(
            f"\n{dtype}: max |y_seq - y_mix| = {diff.max():.3e}, max bound = {bound.max():.3e}, "
            f"worst diff/bound = {(diff / bound).max():.3f}"
        )
        assert (diff <= bound).all()
        assert (diff > 0).any() or dtype == torch.float32  # the rounding is real in low precision
        layer.unmerge()
        layer.merge()  # all merged: the base layer alone
        torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
def test_merge_unmerge_cycles_drift(dtype):
    """100 merge/unmerge cycles without keep_original. Each merge rounds W + D once (error <= u |W + D|) and each
    unmerge rounds W' - D once (error <= u |W'|), so elementwise after C cycles
        |W_C - W_0| <= C * u * (2 |W_0| + |D|) * (1 + C u)   (+ C * the smallest subnormal, for tiny entries).
    With keep_original=True the restore is bit-exact whatever the number of cycles."""
    cycles = 100
    layer = make_layer(2, dtype, k=96, n_out=80, ranks=[8, 3])
    w0 = layer.base_layer.weight.detach().clone()
    d = _delta64(layer, ["a0", "a1"])
    drift_at = {}
    for cycle in range(1, cycles + 1):
        layer.merge()
        layer.unmerge()
        if cycle in (1, 10, 100):
            drift_at[cycle] = (layer.base_layer.weight.double() - w0.double()).abs()
    u = UNIT_ROUNDOFF[dtype]
    drift = drift_at[cycles]
    bound = (
        cycles * u * (2 * w0.double().abs() + d.abs()) * (1 + cycles * u)
        + cycles * torch.finfo(dtype).smallest_normal * u
    )
    report = ", ".join(
        f"after {c}: max {v.max():.3e} ({v.max() / w0.double().abs().max():.2e} of max|W|, "
        f"{(v > 0).double().mean():.1%} changed)"
        for c, v in drift_at.items()
    )
    print(
        f"\n{dtype} merge/unmerge drift: {report}; bound max {bound.max():.3e}, worst drift/bound "
        f"{(drift / bound).max():.3f}"
    )
    assert (drift <= bound).all()
    # one cycle, tight: u |W_0 + D| (merge) + u |W_1 - D| <= u (|W_0| + u |W_0 + D|) (unmerge); a backend working
    # in float32 adds, per call, e32 |W + D| for the sum and r e32 (|s B| @ |A|) for the rank-r delta (r <= 8 here)
    d_abs = sum(
        abs(float(layer.scaling[n])) * layer.lora_B[n].weight.double().abs() @ layer.lora_A[n].weight.double().abs()
        for n in ("a0", "a1")
    )
    float32_work = 2 * 2.0**-24 * (2 * (w0.double().abs() + d.abs()) + 8 * d_abs)  # backends sum in float32
    one_cycle = (
        u * ((w0.double() + d).abs() + w0.double().abs()) * (1 + 2 * u)
        + float32_work
        + torch.finfo(dtype).smallest_normal * u
    )
    print(f"{dtype} one cycle: worst drift/bound {(drift_at[1] / one_cycle).max():.3f}")
    assert (drift_at[1] <= one_cycle).all()
    # with keep_original, every cycle restores the weight bit for bit
    w_start = layer.base_layer.weight.detach().clone()
    for _ in range(cycles):
        layer.merge(keep_original=True)
        assert not torch.equal(layer.base_layer.weight, w_start)
        layer.unmerge()
    assert torch.equal(layer.base_layer.weight, w_start)


def test_keep_original_mixed_with_subtracting_merges():
    layer = make_layer(3, torch.bfloat16, lora_bias=True)
    for i in range(3):
        with torch.no_grad():
            layer.lora_B[f"a{i}"].bias.normal_()
    w0, b0 = layer.base_layer.weight.detach().clone(), layer.base_layer.bias.detach().clone()
    layer.merge(["a0"], keep_original=True)
    with pytest.warns(UserWarning, match="Already following adapters were merged a0"):
        layer.merge(["a1"])
    with pytest.warns(UserWarning, match="Already following adapters were merged a0,a1"):
        layer.merge(["a2"], keep_original=True)
    assert layer.merged_adapters == ["a0", "a1", "a2"]
    layer.unmerge()  # undone last first: a2 restored, a1 subtracted, a0 restored -> exactly the start
    assert torch.equal(layer.base_layer.weight, w0) and torch.equal(layer.base_layer.bias, b0)


def test_unmerge_subtracts_what_was_merged():
    layer = make_layer(2)
    w0 = layer.base_layer.weight.detach().clone()
    layer.merge()
    layer.set_scale("a0", 4.0)  # changed after the merge
    with torch.no_grad():
        layer.lora_B["a1"].weight.mul_(3.0)  # and so are a1's weights
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, w0, rtol=0, atol=1e-6)


def test_forward_unmerged_adapters_stay_fused_and_disable_unmerges():
    layer = make_layer(3)
    x = torch.randn(5, 37)
    y_all = layer(x)
    layer.merge(["a1"])
    torch.testing.assert_close(layer(x), y_all, rtol=1e-5, atol=1e-5)
    w_merged = layer.base_layer.weight.detach().clone()
    layer.enable_adapters(False)
    y_base = layer(x)  # as PEFT: a forward with adapters disabled unmerges first
    assert not layer.merged and not torch.equal(layer.base_layer.weight, w_merged)
    torch.testing.assert_close(y_base, layer.base_layer(x), rtol=0, atol=0)


def test_lora_bias_merges_into_base_bias():
    layer = make_layer(2, lora_bias=True)
    with torch.no_grad():
        layer.lora_B["a0"].bias.normal_()
        layer.lora_B["a1"].bias.normal_()
    b0 = layer.base_layer.bias.detach().clone()
    x = torch.randn(4, 37)
    y = layer(x)
    layer.merge()
    expected = b0 + layer.scaling["a0"] * layer.lora_B["a0"].bias + layer.scaling["a1"] * layer.lora_B["a1"].bias
    torch.testing.assert_close(layer.base_layer.bias, expected.detach())
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.bias, b0, rtol=0, atol=1e-6)


def test_lora_bias_without_base_bias_cannot_merge():
    with pytest.warns(UserWarning, match="no bias"):
        layer = make_layer(2, bias=False, lora_bias=True)
    w0 = layer.base_layer.weight.detach().clone()
    with pytest.raises(
        ValueError, match="Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias"
    ):
        layer.merge()
    with pytest.raises(RuntimeError):  # PEFT raises RuntimeError here; MergeError is both
        layer.merge()
    assert torch.equal(layer.base_layer.weight, w0) and not layer.merged


@pytest.mark.parametrize("safe", [True, False])
def test_safe_merge_names_the_broken_adapter_and_leaves_w_untouched(safe):
    layer = make_layer(3)
    with torch.no_grad():
        layer.lora_B["a1"].weight[3, 0] = float("nan")
    w0 = layer.base_layer.weight.detach().clone()
    if not safe:  # PEFT's unsafe merge writes the NaNs; so do we
        layer.merge()
        assert torch.isnan(layer.base_layer.weight).any()
        return
    with pytest.raises(ValueError, match="NaNs detected in the merged weights. The adapter a1 seems to be broken"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, w0) and not layer.merged
    layer.merge(["a0", "a2"], safe_merge=True)
    assert layer.merged_adapters == ["a0", "a2"]


def test_safe_merge_overflow_alone_and_together():
    layer = make_layer(3, torch.float16, k=16, n_out=12, ranks=[1, 1, 1])
    with torch.no_grad():
        layer.base_layer.weight[5, 7] = 60000.0
        for name in ("a0", "a1", "a2"):
            layer.scaling[name] = 1.0
            layer.lora_A[name].weight.zero_()
            layer.lora_B[name].weight.zero_()
            layer.lora_A[name].weight[0, 7] = 1.0
        layer.lora_B["a0"].weight[5, 0] = 4000.0  # 64000: finite alone
        layer.lora_B["a1"].weight[5, 0] = 4000.0
        layer.lora_B["a2"].weight[5, 0] = 40000.0  # 100000: overflows fp16 alone
    w0 = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match=r"The adapter a2 seems to be broken;"):
        layer.merge(safe_merge=True)
    with pytest.raises(ValueError, match=r"The adapter a0, a1 seems to be broken \(together\)"):
        layer.merge(["a0", "a1"], safe_merge=True)
    assert torch.equal(layer.base_layer.weight, w0) and not layer.merged
    layer.merge(["a0"], safe_merge=True)
    assert layer.base_layer.weight[5, 7].item() == 64000.0


def test_merge_half_adapters_into_half_base_and_merge_error_type():
    layer = make_layer(2, torch.float16, autocast_adapter_dtype=False)
    x = torch.randn(3, 37, dtype=torch.float16)
    y = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), y, rtol=2e-2, atol=2e-2)
    assert issubclass(MergeError, ValueError) and issubclass(MergeError, RuntimeError)
    assert isinstance(layer.base_layer, nn.Linear)
