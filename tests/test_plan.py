"""Per-layer plans (fused_lora/plan.py): built once, reused, and rebuilt exactly when something they depend on changes.

Every test runs on FusedLoRALinear and on PEFT's LoRA Linear patched by fused_lora (FusedPeftLoraLinear): one plan
module serves both. A change is checked by comparing the layer's output after it with the output of a deep copy of
the layer (a copy starts without a plan, so it builds one from the current state): a stale plan gives the old
output and fails. Eval calls run under no_grad with two active adapters, where the stacked adapters are cached.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from checks import assert_close_vs_reference
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from torch import nn

import fused_lora
import fused_lora.reference
from fused_lora import FusedLoRALinear, plan
from fused_lora.integrations.peft import patch_model

K, N = 19, 11
KINDS = ["fused", "peft"]


def _peft_config(r, alpha, dropout=0.0, lora_bias=False):
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, lora_bias=lora_bias, init_lora_weights=False)


def make(kind, dtype=torch.float32, lora_bias=False, dropout=0.0, n=2):
    """A layer of `kind` with adapters a0 (r=3, dropout `dropout`) and a1 (r=2), both active, random B."""
    torch.manual_seed(0)
    base = nn.Linear(K, N, dtype=dtype)
    specs = [("a0", 3, 5.0, dropout), ("a1", 2, 3.0, 0.0)][:n]
    if kind == "fused":
        layer = FusedLoRALinear.from_linear(
            base, "a0", r=3, lora_alpha=5.0, lora_dropout=dropout, init_lora_weights=False, lora_bias=lora_bias
        )
        for name, r, alpha, p in specs[1:]:
            layer.add_adapter(name, r, alpha, lora_dropout=p, init_lora_weights=False, lora_bias=lora_bias)
    else:
        layer = PeftLoraLinear(
            base,
            "a0",
            config=_peft_config(3, 5.0, dropout, lora_bias),
            r=3,
            lora_alpha=5.0,
            lora_dropout=dropout,
            lora_bias=lora_bias,
        )
        for name, r, alpha, p in specs[1:]:
            layer.update_layer(
                name, r, alpha, config=_peft_config(r, alpha, p, lora_bias), lora_dropout=p, lora_bias=lora_bias
            )
        if dtype != torch.float32:
            layer.lora_A.float(), layer.lora_B.float()  # get_peft_model's autocast_adapter_dtype
        assert patch_model(layer) == 1
    with torch.no_grad():
        for p in layer.lora_B.parameters():
            p.normal_()
    layer.set_adapter([name for name, *_ in specs])
    return layer.eval()


def fresh(layer, x, **kwargs):
    """The output of a copy that builds its plan from the layer's current state."""
    twin = copy.deepcopy(layer)
    assert twin.__dict__.get(plan.PLAN_ATTR) is None and twin.__dict__.get(plan.ROWS_PLAN_ATTR) is None
    with torch.no_grad():
        return twin(x, **kwargs)


def run(layer, x, **kwargs):
    with torch.no_grad():
        return layer(x, **kwargs)


def current_plan(layer, attr=plan.PLAN_ATTR):
    return layer.__dict__.get(attr)


# ---- every dependency invalidates the plan ------------------------------------------------------------------------
def _replace_adapter_a1(layer):
    """The same name again (same rank): only the parameters' identity tells the plan it has new values."""
    if isinstance(layer, FusedLoRALinear):
        layer.add_adapter("a1", 2, 3.0, init_lora_weights=False)
    else:
        layer.update_layer("a1", 2, 3.0, config=_peft_config(2, 3.0))
    with torch.no_grad():
        layer.lora_B["a1"].weight.normal_()
    layer.set_adapter(["a0", "a1"])


def _replace_adapter_a1_new_rank(layer):
    if isinstance(layer, FusedLoRALinear):
        layer.add_adapter("a1", 5, 3.0, init_lora_weights=False)
    else:
        layer.update_layer("a1", 5, 3.0, config=_peft_config(5, 3.0))
    with torch.no_grad():
        layer.lora_B["a1"].weight.normal_()
    layer.set_adapter(["a0", "a1"])


def _load_state_dict(layer):
    state = layer.state_dict()
    key = next(k for k in state if "lora_B" in k and "a1" in k and k.endswith("weight"))
    state[key] = state[key] * 3
    layer.load_state_dict(state)


def _replace_parameter(layer):
    layer.lora_B["a1"].weight = nn.Parameter(torch.randn_like(layer.lora_B["a1"].weight))


def _in_place(layer):
    with torch.no_grad():
        layer.lora_A["a0"].weight.mul_(-2)


def _merge_a1(layer):
    layer.merge(adapter_names=["a1"]) if isinstance(layer, FusedLoRALinear) else layer.merge(adapter_names=["a1"])


def _merge_unmerge(layer):
    layer.merge(adapter_names=["a1"])
    layer.unmerge()
    with torch.no_grad():
        layer.lora_B["a1"].weight.mul_(2)  # something for the output to show: the merge itself restores it


CHANGES = {
    "add_adapter (same name)": _replace_adapter_a1,
    "add_adapter (new rank)": _replace_adapter_a1_new_rank,
    "delete_adapter": lambda layer: layer.delete_adapter("a1"),
    "set_adapter": lambda layer: layer.set_adapter(["a1"]),
    "scaling assigned": lambda layer: layer.scaling.__setitem__("a1", 0.125),
    "set_scale": lambda layer: layer.set_scale("a0", 0.5),
    "scale_layer": lambda layer: layer.scale_layer(3.0),
    "parameter replaced": _replace_parameter,
    "in-place update": _in_place,
    "load_state_dict": _load_state_dict,
    "merge": _merge_a1,
    "merge then unmerge": _merge_unmerge,
    "disable adapters": lambda layer: layer.enable_adapters(False),
}


@pytest.mark.parametrize("change", list(CHANGES))
@pytest.mark.parametrize("kind", KINDS)
def test_each_change_reaches_the_next_call(kind, change):
    layer = make(kind)
    x = torch.randn(5, K)
    before = run(layer, x)
    run(layer, x)  # the stacked adapters are now cached
    CHANGES[change](layer)
    after = run(layer, x)
    torch.testing.assert_close(after, fresh(layer, x), rtol=0, atol=0)
    if change not in ("merge",):  # merging moves the same term into the weight
        assert (after - before).abs().max() > 1e-3, "the change did not change the output: the test proves nothing"


@pytest.mark.parametrize("kind", KINDS)
def test_enable_after_disable_and_set_adapter_back(kind):
    layer = make(kind)
    x = torch.randn(4, K)
    full = run(layer, x)
    layer.enable_adapters(False)
    torch.testing.assert_close(run(layer, x), layer.base_layer(x), rtol=0, atol=0)
    layer.enable_adapters(True)
    torch.testing.assert_close(run(layer, x), full, rtol=0, atol=0)
    layer.set_adapter("a0")
    one = run(layer, x)
    layer.set_adapter(["a0", "a1"])
    torch.testing.assert_close(run(layer, x), full, rtol=0, atol=0)
    assert (one - full).abs().max() > 1e-3


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("how", ["p edited", "module replaced", "dropout removed"])
def test_dropout_rate_changes_reach_the_next_training_call(kind, how):
    layer = make(kind, dropout=0.3).train()
    x = torch.randn(64, K)
    torch.manual_seed(5)
    before = run(layer, x)
    if how == "p edited":
        layer.lora_dropout["a0"].p = 0.7
    elif how == "module replaced":
        layer.lora_dropout["a1"] = nn.Dropout(0.6)
    else:
        layer.lora_dropout["a0"] = nn.Identity()
    torch.manual_seed(5)
    after = run(layer, x)
    torch.manual_seed(5)
    torch.testing.assert_close(after, fresh(layer.train(), x), rtol=0, atol=0)
    assert (after - before).abs().max() > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_dtype_changes_rebuild_the_plan(kind):
    layer = make(kind)
    x = torch.randn(3, K)
    run(layer, x)
    old = current_plan(layer)
    layer.double()
    y = run(layer, x.double())
    assert y.dtype == torch.float64 and current_plan(layer) is not old
    torch.testing.assert_close(y, fresh(layer, x.double()), rtol=0, atol=0)
    # factors change dtype without a .to() of the layer: the key reads dtypes at every call (FusedLoRALinear then
    # casts one adapter's A; PEFT's layer, whose adapters are all float16 now, hands the call back to PEFT's code)
    run(layer, x.double())
    if kind == "fused":
        layer.lora_A["a1"].to(torch.float16)
    else:
        layer.lora_A.to(torch.float16), layer.lora_B.to(torch.float16)
    y16 = run(layer, x.double())
    torch.testing.assert_close(y16, fresh(layer, x.double()), rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_backend_switch_rebuilds_the_plan(kind, monkeypatch):
    layer = make(kind)
    x = torch.randn(3, K)
    run(layer, x)
    monkeypatch.setenv("FUSED_LORA_BACKEND", "reference")
    seen = []
    original = fused_lora.reference.lora_fwd
    monkeypatch.setattr(fused_lora.reference, "lora_fwd", lambda *a: seen.append(1) or original(*a))
    y = run(layer, x)
    assert seen and current_plan(layer).backend is fused_lora.reference
    torch.testing.assert_close(y, fresh(layer, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_mixed_batch_plan_follows_changes(kind):
    layer = make(kind)
    x = torch.randn(4, 2, K)
    names = ["a1", "__base__", "a0", "a1"]
    before = run(layer, x, adapter_names=names)
    run(layer, x, adapter_names=names)
    layer.scaling["a1"] = -0.5
    with torch.no_grad():
        layer.lora_A["a0"].weight.add_(1.0)
    after = run(layer, x, adapter_names=names)
    torch.testing.assert_close(after, fresh(layer, x, adapter_names=names), rtol=0, atol=0)
    assert (after - before).abs().max() > 1e-3


# ---- nothing changes: nothing is rebuilt ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_plan_is_built_once_and_reused(kind, monkeypatch):
    layer = make(kind)
    x = torch.randn(3, K)
    run(layer, x)
    layer.train()
    layer(x).sum().backward()  # the first training call builds nothing new: training is not part of the key
    builds = []
    original = plan.build
    monkeypatch.setattr(plan, "build", lambda *a, **k: builds.append(1) or original(*a, **k))
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        layer(x).sum().backward()
        opt.step()
        run(layer.eval(), x)
        layer.train()
    assert builds == []


# ---- training: adapters change every step ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_training_steps_never_use_a_stale_stack_and_reach_each_adapter(kind):
    """Four SGD steps in lockstep with plain torch at fp32 and at float64 (unpatched math): every step's gradients
    of every adapter are as close to float64 as plain fp32 torch's are (a stale stack or a missed adapter is not)."""
    layer = make(kind)
    x = torch.randn(6, K)
    ref32 = copy.deepcopy(layer)
    ref64 = copy.deepcopy(layer).double()
    models = [layer, ref32, ref64]
    params = [[p for p in m.parameters() if p.requires_grad] for m in models]
    opts = [torch.optim.SGD(ps, lr=0.05) for ps in params]

    def plain(model, inp):
        y = model.base_layer(inp)
        for name in ("a0", "a1"):
            y = y + model.lora_B[name](model.lora_A[name](inp)) * model.scaling[name]
        return y

    for step in range(4):
        layer.eval()
        torch.testing.assert_close(run(layer, x), fresh(layer, x), rtol=0, atol=0)
        for m in models:
            m.train()
        layer(x).square().sum().backward()
        plain(ref32, x).square().sum().backward()
        plain(ref64, x.double()).square().sum().backward()
        for i, (p, q32, q64) in enumerate(zip(*params)):
            assert p.grad is not None
            scale = q64.grad.abs().max().item()
            assert_close_vs_reference(p.grad, q64.grad, q32.grad, atol=1e-6 * scale, name=f"step {step} grad {i}")
        for opt in opts:
            opt.step(), opt.zero_grad()


@pytest.mark.parametrize("kind", KINDS)
def test_writes_through_data_after_a_training_call_are_seen(kind):
    """Writes through .data bypass version counters; a call that needs gradients drops the cached copies, so the
    writes of a training step (fused optimizers write raw memory) are always seen by the next eval call."""
    layer = make(kind)
    x = torch.randn(3, K)
    run(layer, x)
    layer.train()
    layer(x).sum().backward()
    layer.lora_B["a1"].weight.data.mul_(3)
    layer.eval()
    torch.testing.assert_close(run(layer, x), fresh(layer, x), rtol=0, atol=0)
    # without a training call between, invalidate() is the documented way
    run(layer, x)
    layer.lora_A["a0"].weight.data.mul_(-1)
    plan.invalidate(layer)
    torch.testing.assert_close(run(layer, x), fresh(layer, x), rtol=0, atol=0)


# ---- lora_bias: one behaviour on both layers ---------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_float32_lora_bias_over_bf16_base_keeps_a_float32_gradient(kind):
    """The lora_B biases are float32 over a bfloat16 base: they are added to the output in float32, not folded
    into the op's bfloat16 bias, so their gradient is s * sum(dy) in float32, as PEFT's (never rounded to bf16)."""
    layer = make(kind, dtype=torch.bfloat16, lora_bias=True).train()
    assert layer.lora_B["a0"].bias.dtype == torch.float32
    with torch.no_grad():
        for name in ("a0", "a1"):
            layer.lora_B[name].bias.copy_(torch.randn(N) * 3)
    x = torch.randn(7, K, dtype=torch.bfloat16)
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    for name in ("a0", "a1"):
        expected = dy.float().sum(0) * layer.scaling[name]
        grad = layer.lora_B[name].bias.grad
        assert grad.dtype == torch.float32
        torch.testing.assert_close(grad, expected, rtol=1e-6, atol=1e-6)
        assert not torch.equal(grad, expected.to(torch.bfloat16).float()), "the gradient was rounded to bf16"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_bias_output_and_gradients_match_peft(kind, dtype):
    ours = make(kind, dtype=dtype, lora_bias=True).train()
    with torch.no_grad():
        for name in ("a0", "a1"):
            ours.lora_B[name].bias.normal_()
    theirs = PeftLoraLinear(
        copy.deepcopy(ours.base_layer),
        "a0",
        config=_peft_config(3, 5.0, lora_bias=True),
        r=3,
        lora_alpha=5.0,
        lora_bias=True,
    )
    theirs.update_layer("a1", 2, 3.0, config=_peft_config(2, 3.0, lora_bias=True), lora_bias=True)
    theirs.lora_A.to(ours.lora_A["a0"].weight.dtype), theirs.lora_B.to(ours.lora_B["a0"].weight.dtype)
    theirs.load_state_dict(ours.state_dict())
    theirs.set_adapter(["a0", "a1"])
    theirs.train()
    x = torch.randn(5, K, dtype=dtype)
    y, y_peft = ours(x), theirs(x)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y, y_peft, **tol)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_peft.backward(dy)
    for name in ("a0", "a1"):
        torch.testing.assert_close(ours.lora_B[name].bias.grad, theirs.lora_B[name].bias.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_lora_bias_per_row_in_a_mixed_batch_matches_peft(kind):
    ours = make(kind, lora_bias=True)
    with torch.no_grad():
        for name in ("a0", "a1"):
            ours.lora_B[name].bias.normal_()
    theirs = PeftLoraLinear(
        copy.deepcopy(ours.base_layer),
        "a0",
        config=_peft_config(3, 5.0, lora_bias=True),
        r=3,
        lora_alpha=5.0,
        lora_bias=True,
    )
    theirs.update_layer("a1", 2, 3.0, config=_peft_config(2, 3.0, lora_bias=True), lora_bias=True)
    theirs.load_state_dict(ours.state_dict())
    theirs.eval()
    x = torch.randn(4, 3, K)
    names = ["a1", "__base__", "a0", "a1"]
    spy = []
    original = fused_lora.ops.rows_forward
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fused_lora.ops, "rows_forward", lambda *a, **k: spy.append(1) or original(*a, **k))
        y = run(ours, x, adapter_names=names)
    assert spy, "the mixed batch with lora_bias did not run fused"
    torch.testing.assert_close(y, run(theirs, x, adapter_names=names), rtol=1e-5, atol=1e-5)


# ---- the steady-state call: no host tensors, no syncs, no torch.library layers -------------------------------------
def _forbid(monkeypatch, *names):
    def forbidden(name):
        def fail(*args, **kwargs):
            raise AssertionError(f"{name} called in a steady-state call")

        return fail

    for name in names:
        owner, attr = (torch.Tensor, name[7:]) if name.startswith("Tensor.") else (torch, name)
        monkeypatch.setattr(owner, attr, forbidden(name))


CALLS = {
    "one adapter": lambda layer, x: layer(x),
    "two active": lambda layer, x: layer(x),
    "adapter_names": lambda layer, x: layer(x, adapter_names=["a1", "__base__", "a0", "a1"]),
    "adapter_ids": lambda layer, x: layer(x, adapter_ids=torch.tensor([1, -1, 0, 1]), check_ids=False),
}


@pytest.mark.parametrize("call", list(CALLS))
@pytest.mark.parametrize("kind", KINDS)
def test_steady_state_eval_call_makes_no_host_tensor_no_sync_no_stacking(kind, call, monkeypatch):
    """What CUDA graph capture needs of the eval forward: no tensor from a Python list, no device-to-host read (a
    sync), no branch on device values; and the stacked adapters are reused, not concatenated again."""
    if kind == "peft" and call == "adapter_ids":
        pytest.skip("PEFT's layer has no adapter_ids")
    layer = make(kind, n=1 if call == "one adapter" else 2)
    x = torch.randn(4, K)
    expected = run(layer, x) if call != "adapter_ids" else None
    run(layer, x) if call != "adapter_ids" else None
    with torch.no_grad():
        first = CALLS[call](layer, x)
    ids = torch.tensor([1, -1, 0, 1])  # made before the forbidden zone
    _forbid(
        monkeypatch, "tensor", "as_tensor", "full", "cat", "stack", "Tensor.item", "Tensor.tolist", "Tensor.__bool__"
    )
    with torch.no_grad():
        if call == "adapter_ids":
            again = layer(x, adapter_ids=ids, check_ids=False)
        else:
            again = CALLS[call](layer, x)
    monkeypatch.undo()
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    if expected is not None and call in ("one adapter", "two active"):
        torch.testing.assert_close(again, expected, rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_eager_calls_skip_the_registered_ops_but_traced_calls_use_them(kind, monkeypatch):
    layer = make(kind)
    x = torch.randn(4, K, requires_grad=True)
    registered = {"fwd": 0}
    original = fused_lora.ops.lora_fwd

    def counting(*args):
        registered["fwd"] += 1
        return original(*args)

    monkeypatch.setattr(fused_lora.ops, "lora_fwd", counting)
    layer.train()
    y = layer(x)
    y.sum().backward()
    run(layer.eval(), x.detach())
    assert registered["fwd"] == 0
    # a dispatch mode (here FakeTensorMode) needs the registered op's fake impl; nothing made there is kept
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = run(layer, mode.from_tensor(torch.randn(4, K)))
    assert fake.shape == (4, N) and registered["fwd"] == 1
    assert type(current_plan(layer).scale) is torch.Tensor
    torch.testing.assert_close(run(layer, x.detach()), fresh(layer, x.detach()), rtol=0, atol=0)


def test_eager_autograd_matches_the_registered_op():
    torch.manual_seed(1)
    x = torch.randn(6, K, dtype=torch.float64, requires_grad=True)
    w, b = torch.randn(N, K, dtype=torch.float64), torch.randn(N, dtype=torch.float64, requires_grad=True)
    a = torch.randn(5, K, dtype=torch.float64, requires_grad=True)
    bb = torch.randn(N, 5, dtype=torch.float64, requires_grad=True)
    args = (x, w, b, a, bb, [0.5, 2.0])

    def grads(force_registered):
        for t in (x, b, a, bb):
            t.grad = None
        with pytest.MonkeyPatch.context() as mp:
            if force_registered:
                mp.setattr(fused_lora.ops, "eager_call_ok", lambda *t: False)
            y = fused_lora.lora_linear(*args, rank_splits=[2, 3])
            y.square().sum().backward()
        return [y.detach()] + [t.grad.clone() for t in (x, b, a, bb)]

    for ours, theirs in zip(grads(False), grads(True)):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    torch.autograd.gradcheck(lambda *t: fused_lora.lora_linear(*t, [0.5, 2.0], rank_splits=[2, 3]), (x, w, b, a, bb))


@pytest.mark.parametrize("kind", KINDS)
def test_plan_made_under_inference_mode_serves_training(kind):
    layer = make(kind)
    x = torch.randn(3, K)
    with torch.inference_mode():
        layer(x)
        layer(x, adapter_names=["a0", "a1", "__base__"])
    layer.train()
    layer(x).sum().backward()
    layer(x, adapter_names=["a0", "a1", "__base__"]).sum().backward()
    assert layer.lora_A["a0"].weight.grad is not None


@pytest.mark.parametrize("kind", KINDS)
def test_layers_with_plans_copy_and_pickle(kind):
    layer = make(kind)
    x = torch.randn(3, K)
    y = run(layer, x)
    assert current_plan(layer) is not None
    for twin in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        torch.testing.assert_close(run(twin, x), y, rtol=0, atol=0)


def test_unpatching_drops_the_plans():
    from fused_lora.integrations.peft import unpatch_model

    layer = make("peft")
    x = torch.randn(3, K)
    run(layer, x)
    assert current_plan(layer) is not None
    assert unpatch_model(layer) == 1 and current_plan(layer) is None
    layer.lora_B["a1"].weight.data.mul_(2)  # PEFT's code owns the layer meanwhile
    assert patch_model(layer) == 1
    torch.testing.assert_close(run(layer, x), fresh(layer, x), rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_meta_device_layers_give_shapes(kind):
    """A layer on the meta device (shape inference, init_empty_weights) runs the registered op's fake impl."""
    layer = make(kind).to("meta")
    y = run(layer, torch.randn(5, K, device="meta"))
    assert y.device.type == "meta" and y.shape == (5, N)
    y = run(layer, torch.randn(4, K, device="meta"), adapter_names=["a0", "a1", "__base__", "a0"])
    assert y.device.type == "meta" and y.shape == (4, N)
