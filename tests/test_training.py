"""Training behaviour of lora_linear: fused dropout (statistics, determinism), saved memory, a loss curve vs PEFT.

On --device cpu every CPU backend runs (triton: the kernels under the interpreter); on --device cuda the Triton
backend runs compiled (the `cpu_backend` fixture then only pins FUSED_LORA_BACKEND=triton).
"""

import math

import pytest
import torch
import torch.nn as nn

import fused_lora
from fused_lora import ops
from fused_lora.functional import draw_dropout_seed

CPU_BACKENDS = ["cpp", "reference", "triton"]  # triton: the kernels under the interpreter


def pytest_generate_tests(metafunc):
    if "cpu_backend" in metafunc.fixturenames:
        on_cuda = metafunc.config.getoption("--device") == "cuda"
        metafunc.parametrize("cpu_backend", ["triton"] if on_cuda else CPU_BACKENDS, indirect=True)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_within_binomial_bound(cpu_backend, p, device):
    M, K = 173, 301
    keep = ops.dropout_keep(draw_dropout_seed(device), M, K, p, 0)
    assert keep.device.type == device.type
    n = M * K
    kept = keep.sum().item()
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(kept - n * (1 - p)) <= 5 * sigma, f"kept {kept} of {n} at p={p}"


def test_masks_differ_across_seeds_and_adapters(cpu_backend, device):
    s1, s2 = draw_dropout_seed(device), draw_dropout_seed(device)
    m11 = ops.dropout_keep(s1, 32, 40, 0.5, 0)
    assert torch.equal(m11, ops.dropout_keep(s1, 32, 40, 0.5, 0))
    assert (m11 != ops.dropout_keep(s2, 32, 40, 0.5, 0)).float().mean() > 0.3
    assert (m11 != ops.dropout_keep(s1, 32, 40, 0.5, 1)).float().mean() > 0.3


def test_dropout_scales_kept_values_by_inverse_keep_rate(cpu_backend, device):
    M, K, N, p = 9, 50, 3, 0.3
    x, w = torch.ones(M, K, device=device), torch.zeros(N, K, device=device)
    a, b = torch.ones(1, K, device=device), torch.ones(N, 1, device=device)
    torch.manual_seed(11)
    y = fused_lora.lora_linear(x, w, None, a, b, 1.0, dropout_p=p, training=True)
    torch.manual_seed(11)
    keep = ops.dropout_keep(draw_dropout_seed(device), M, K, p, 0)
    expected = keep.sum(1, keepdim=True).double() / (1 - p)
    torch.testing.assert_close(y.double(), expected.expand(M, N), rtol=1e-6, atol=1e-5)


def test_dropout_fresh_per_call_deterministic_per_seed_and_off_in_eval(cpu_backend, device):
    x, w, a, b = (torch.randn(*shape).to(device) for shape in ((6, 20), (5, 20), (4, 20), (5, 4)))

    def run(training, p=0.5):
        return fused_lora.lora_linear(x, w, None, a, b, 1.0, dropout_p=p, training=training)

    torch.manual_seed(0)
    first, second = run(True), run(True)
    torch.manual_seed(0)
    again = run(True)
    assert not torch.equal(first, second)
    assert torch.equal(first, again)
    assert torch.equal(run(False), run(False, p=0.0))


class _SavedBytes:
    """Bytes autograd keeps, counting each storage once (a tensor saved twice costs once)."""

    def __init__(self):
        self.storages = {}

    def pack(self, t):
        st = t.untyped_storage()
        self.storages[st.data_ptr()] = st.nbytes()
        return t

    def total(self, exclude=()):
        skip = {p.untyped_storage().data_ptr() for p in exclude}
        return sum(n for ptr, n in self.storages.items() if ptr not in skip)


def _peft_linear(base, r, alpha, dropout):
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as PeftLinear

    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout)
    return PeftLinear(base, "default", cfg, r=r, lora_alpha=alpha, lora_dropout=dropout)


def test_saved_bytes_fewer_than_peft(capsys, device):
    M, K, N, r, p = 256, 512, 384, 16, 0.1
    base = nn.Linear(K, N).requires_grad_(False)
    peft_layer = _peft_linear(base, r, 2 * r, p).train().to(device)
    a, b = peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight
    x = torch.randn(M, K).to(device).requires_grad_(True)

    ours, theirs = _SavedBytes(), _SavedBytes()
    with torch.autograd.graph.saved_tensors_hooks(ours.pack, lambda t: t):
        fused_lora.lora_linear(
            x, base.weight, base.bias, a, b, peft_layer.scaling["default"], dropout_p=p, training=True
        )
    with torch.autograd.graph.saved_tensors_hooks(theirs.pack, lambda t: t):
        peft_layer(x)
    params = [base.weight, base.bias, a, b]
    ours_b, theirs_b = ours.total(exclude=params), theirs.total(exclude=params)
    with capsys.disabled():
        print(
            f"\nsaved activation bytes per call (M={M}, K={K}, N={N}, r={r}, dropout={p}): "
            f"fused_lora {ours_b}, PEFT {theirs_b}"
        )
    # ours: x, the [M, r] shrink and an 8-byte seed; never a dropped copy of x nor a mask
    assert ours_b <= x.numel() * 4 + M * r * 4 + 8 + r * 4  # + the per-rank scale vector
    assert ours_b < theirs_b


class _TinyMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(12, 32)
        self.down = nn.Linear(32, 3)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


class _FusedTinyMLP(nn.Module):
    """The same MLP with each LoRA linear computed by fused_lora.lora_linear on PEFT's own parameter values."""

    def __init__(self, peft_model):
        super().__init__()
        self.layers = []
        self.params = nn.ParameterDict()
        for name in ("up", "down"):
            mod = getattr(peft_model.base_model.model, name)
            for suffix, t in (
                ("w", mod.base_layer.weight),
                ("b", mod.base_layer.bias),
                ("a", mod.lora_A["default"].weight),
                ("bb", mod.lora_B["default"].weight),
            ):
                self.params[f"{name}_{suffix}"] = nn.Parameter(t.detach().clone(), requires_grad=suffix in ("a", "bb"))
            self.layers.append((name, mod.scaling["default"]))

    def forward(self, x):
        for i, (name, s) in enumerate(self.layers):
            p = self.params
            x = fused_lora.lora_linear(
                x, p[f"{name}_w"], p[f"{name}_b"], p[f"{name}_a"], p[f"{name}_bb"], s, training=self.training
            )
            if i == 0:
                x = torch.relu(x)
        return x


def test_tiny_mlp_follows_peft_loss_curve(device):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(
        _TinyMLP(), LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"], init_lora_weights=False)
    ).to(device)
    fused = _FusedTinyMLP(peft_model)
    opt_p = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    opt_f = torch.optim.AdamW([p for p in fused.parameters() if p.requires_grad], lr=1e-2)
    x, target = torch.randn(64, 12).to(device), torch.randn(64, 3).to(device)
    losses_p, losses_f = [], []
    for _ in range(20):
        for model, opt, losses in ((peft_model, opt_p, losses_p), (fused, opt_f, losses_f)):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), target)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert losses_p[-1] < losses_p[0] * 0.9, "the run must actually train"
    torch.testing.assert_close(torch.tensor(losses_f), torch.tensor(losses_p), rtol=1e-4, atol=1e-6)
