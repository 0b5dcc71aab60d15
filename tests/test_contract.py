"""One contract suite for every backend: each case of tests/contract_cases.py through the public API
(fused_lora.lora_linear, lora_linear_rows, merge_, unmerge_, backward through autograd) on every backend this
machine runs: reference, cpp[<isa>] per ISA path (and, for the 16-bit cases, cpp[<isa>,alt_16bit_gemm]: the other
base GEMM of float16 and bfloat16, see CONTRACT.md), triton under the interpreter (CPU tensors), and cuda (compiled
Triton on CUDA tensors, bfloat16 included) with `pytest --device cuda`. The tally per backend is printed at the end.

Judgement (tests/checks.py): outputs and gradients against a float64 evaluation of the same formula, within twice
plain torch's own error at the same dtype (PEFT's order of operations, under the same autocast) plus one unit of
the dtype at the result's scale; dtypes equal to plain torch's; merges within half an ulp of the float64 result
(one rounding); refused inputs raise the stated type with a message naming the argument, and leave in-place
targets bit-identical. The public API takes no preallocated outputs, so outputs are poisoned at the allocator:
every uninitialised allocation during a call is NaN-filled (checks.poisoned_empty), and inputs are strided views
whose skipped memory holds NaN. Dropout masks are the reference's bits (reference.dropout_keep) for the seed the
call draws from torch's generator; a backend with other bits misses the float64 result by O(1).
"""

from __future__ import annotations

import contextlib
import os
import zlib
from typing import Optional

import pytest
import torch
from checks import (
    assert_bits_equal,
    assert_close_vs_reference,
    assert_rounded_once,
    poisoned_empty,
    strided_like,
    torch_lora,
    ulp_atol,
)
from contract_cases import BACKEND_PROPERTY, CASES, Backend, Case, available_backends

import fused_lora
from fused_lora import reference
from fused_lora.functional import draw_dropout_seed


def pytest_generate_tests(metafunc):
    """Every case on every backend (a variant backend takes only the cases whose code path it changes)."""
    if "backend" in metafunc.fixturenames and "case" in metafunc.fixturenames:
        backends = available_backends(metafunc.config.getoption("--device", default="cpu"))
        pairs = [(b, c) for b in backends for c in CASES if b.runs(c)]
        metafunc.parametrize(
            ("backend", "case"), pairs, ids=[f"{b.name}-{c.name}" for b, c in pairs], indirect=["backend"]
        )


@pytest.fixture
def backend(request, monkeypatch):
    b: Backend = request.param
    request.node.user_properties.append((BACKEND_PROPERTY, b.name))
    if b.unavailable:
        if b.env == "cpp" and os.environ.get("CI"):
            pytest.fail(f"{b.name}: {b.unavailable}; the install step must build fused_lora._C")
        pytest.skip(f"{b.name}: {b.unavailable}")
    monkeypatch.setenv("FUSED_LORA_BACKEND", b.env)
    for name, value in b.env_extra:
        monkeypatch.setenv(name, value)
    if b.isa is None:
        yield b
        return
    from fused_lora.ops import cpp_backend

    with cpp_backend.use_isa(b.isa):
        assert cpp_backend.active_isa() == b.isa, f"use_isa({b.isa!r}) left {cpp_backend.active_isa()!r} active"
        yield b


def test_contract(case: Case, backend: Backend):
    reason = backend.skip_reason(case)
    if reason:
        pytest.skip(reason)
    torch.manual_seed(zlib.crc32(case.name.encode()))  # fresh inputs per case, the same on every backend
    if case.api in ("merge", "unmerge"):
        _run_merge(case, backend.device)
    else:
        _run_linear(case, backend.device)


# ---------------------------------------------------------------- lora_linear / lora_linear_rows
def _rank_ptr(ranks) -> list[int]:
    ptr = [0]
    for r in ranks:
        ptr.append(ptr[-1] + r)
    return ptr


def _scale_vector(case: Case) -> torch.Tensor:
    """The per-rank float32 scaling the API builds from `scaling` (all values exact in float32)."""
    if case.per_rank_scale:
        return torch.rand(sum(case.ranks)) + 0.5
    return torch.tensor(case.scaling, dtype=torch.float32).repeat_interleave(torch.tensor(case.ranks))


def _scaling_arg(case: Case, scale: torch.Tensor, device: str):
    if case.per_rank_scale:
        return scale.to(device)
    return case.scaling[0] if len(case.scaling) == 1 else list(case.scaling)


def _make_operands(case: Case, device: str) -> dict:
    """Random operands in their final dtypes and layouts (drawn on the CPU: equal values on every backend)."""
    K, N, R = case.K, case.N, sum(case.ranks)
    base, adt = case.dtype, case.adapter_dtype or case.dtype
    x = torch.randn(*case.lead, K).to(case.x_dtype or base)
    w = (torch.randn(N, K) / max(K, 1) ** 0.5).to(base)
    a = (torch.randn(R, K) / max(K, 1) ** 0.5).to(adt)
    bb = torch.randn(N, R).to(adt)
    bias = None
    if case.bias is not None:
        bias_dtype = case.bias_dtype or base
        if case.bias == "strided":  # every other element of a 2N vector: stride 2
            bias = torch.randn(2 * N).to(device=device, dtype=bias_dtype)[::2]
        else:
            bias = torch.randn(N).to(device=device, dtype=bias_dtype)
        if case.bias_device is not None:
            bias = bias.to(case.bias_device)
    ops = dict(
        x=strided_like(x.to(device), case.x_layout),
        weight=strided_like(w.to(device), case.w_layout),
        bias=bias,
        lora_a=strided_like(a.to(device), case.ad_layout),
        lora_b=strided_like(bb.to(device), case.ad_layout),
    )
    grads = {
        "x": case.x_grad,
        "weight": case.train_base,
        "bias": case.train_base and bias is not None,
        "lora_a": True,
        "lora_b": True,
    }
    if case.error is None:
        for name, wanted in grads.items():
            if wanted:
                ops[name].requires_grad_(True)
    return ops


def _row_ids_per_row(case: Case, device: str) -> Optional[torch.Tensor]:
    if case.row_ids is None:
        return None
    ids = torch.tensor(case.row_ids, dtype=torch.int64, device=device)
    if ids.numel() != case.M:  # one id per sample: repeated over the sample's rows
        ids = ids.repeat_interleave(case.M // case.lead[0])
    return ids


def _dropout_masks(case: Case, device: str):
    """(keeps, inv_keep) of the call about to be made: the seed it will draw is drawn here on a forked generator."""
    if not case.training or not any(p > 0 for p in case.dropout):
        return None, None
    devices = [torch.cuda.current_device()] if device == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        seed = draw_dropout_seed(torch.device(device))
    M, K = case.M, case.K
    keeps = [reference.dropout_keep(seed, M, K, p, i) if p > 0 else None for i, p in enumerate(case.dropout)]
    inv = [(torch.tensor(1.0) / (1.0 - torch.tensor(p, dtype=torch.float32))).item() for p in case.dropout]
    return keeps, inv


def _autocast(case: Case, device: str):
    return torch.autocast(device, dtype=case.autocast) if case.autocast else contextlib.nullcontext()


def _call_api(case: Case, ops: dict, scaling, row_ids_arg):
    args = (ops["x"], ops["weight"], ops["bias"], ops["lora_a"], ops["lora_b"], scaling)
    kw = dict(dropout_p=case.dropout[0] if len(case.dropout) == 1 else list(case.dropout), training=case.training)
    if case.api == "rows":
        if case.check_ids is not None:
            kw["check_ids"] = case.check_ids
        return fused_lora.lora_linear_rows(*args, list(case.ranks), row_ids_arg, **kw)
    return fused_lora.lora_linear(*args, rank_splits=case.rank_splits, **kw)


def _leaf_copies(ops: dict, dtype: Optional[torch.dtype] = None) -> dict:
    """Contiguous copies (same values; float64 when `dtype` is given) with the same requires_grad."""
    out = {}
    for name, t in ops.items():
        if t is None:
            out[name] = None
            continue
        c = t.detach().to(dtype) if dtype is not None else t.detach().clone()
        out[name] = c.contiguous().requires_grad_(t.requires_grad)
    return out


def _run_linear(case: Case, device: str) -> None:
    scale = _scale_vector(case)
    ops = _make_operands(case, device)
    scaling = _scaling_arg(case, scale, device)
    row_ids_arg = None if case.row_ids is None else torch.tensor(case.row_ids, dtype=torch.int64, device=device)

    if case.error is not None:
        exc, pattern = case.error
        with pytest.raises(exc, match=pattern):
            _call_api(case, ops, scaling, row_ids_arg)
        return

    keeps, inv = _dropout_masks(case, device)
    with poisoned_empty(), _autocast(case, device):
        y = _call_api(case, ops, scaling, row_ids_arg)

    rows = _row_ids_per_row(case, device)
    rank_ptr = _rank_ptr(case.ranks)
    plain = _leaf_copies(ops)
    with _autocast(case, device):
        y_torch = torch_lora(
            plain["x"],
            plain["weight"],
            plain["bias"],
            plain["lora_a"],
            plain["lora_b"],
            scale.to(device),
            rank_ptr,
            keeps,
            inv,
            rows,
        )
    exact = _leaf_copies(ops, torch.float64)
    y64 = torch_lora(
        exact["x"],
        exact["weight"],
        exact["bias"],
        exact["lora_a"],
        exact["lora_b"],
        scale.to(device, torch.float64),
        rank_ptr,
        keeps,
        inv,
        rows,
    )

    assert y.dtype == y_torch.dtype, f"y: dtype {y.dtype}, plain torch (nn.Linear rules) gives {y_torch.dtype}"
    assert y.shape == y_torch.shape, f"y: shape {tuple(y.shape)} != {tuple(y_torch.shape)}"
    assert_close_vs_reference(y, y64, y_torch, atol=ulp_atol(y_torch.dtype, y64), name="y")

    dy = strided_like(torch.randn(y_torch.shape).to(device=device, dtype=y_torch.dtype), case.dy_layout)
    with poisoned_empty():
        y.backward(dy)
    y_torch.backward(dy)
    y64.backward(dy.to(torch.float64))
    for name, t in ops.items():
        if t is None:
            continue
        ours, yard, truth = t.grad, plain[name].grad, exact[name].grad
        if not t.requires_grad:
            assert ours is None, f"d{name}: computed for a tensor that does not require grad"
            continue
        assert ours is not None, f"d{name}: missing"
        assert ours.dtype == yard.dtype, f"d{name}: dtype {ours.dtype}, plain torch gives {yard.dtype}"
        assert_close_vs_reference(
            ours, truth.reshape(ours.shape), yard.reshape(ours.shape), atol=ulp_atol(yard.dtype, truth), name=f"d{name}"
        )


# ---------------------------------------------------------------- merge_ / unmerge_
def _run_merge(case: Case, device: str) -> None:
    N, K, R = case.N, case.K, sum(case.ranks)
    sign = 1.0 if case.api == "merge" else -1.0
    adt = case.adapter_dtype or case.dtype
    shape = (K, N) if case.fan_in_fan_out else (N, K)
    wdt = case.weight_dtype or case.dtype
    if wdt == torch.bool:
        w0 = torch.randint(0, 2, shape).bool()
    elif not wdt.is_floating_point:
        w0 = torch.randint(-8, 8, shape).to(wdt)
    else:
        w0 = torch.randn(shape).to(wdt)
    a = torch.randn(R, K) / max(K, 1) ** 0.5
    bb = torch.randn(N, R)
    scale = _scale_vector(case)
    if case.overflow:  # w[0, 0] sits near the dtype's limit and the update pushes it past: non-finite if merged
        fmax = torch.finfo(wdt).max
        w0[0, 0] = sign * 0.99 * fmax
        a[:, 0] = 1.0
        bb[0, :] = 0.5 * fmax / (scale.sum().item())
    a, bb = a.to(adt), bb.to(adt)

    w = strided_like(w0.to(device), case.w_layout) if wdt.is_floating_point else w0.to(device)
    before = w.clone()
    a_dev = strided_like(a.to(device), case.ad_layout)
    bb_dev = strided_like(bb.to(device), case.ad_layout)
    fn = fused_lora.merge_ if case.api == "merge" else fused_lora.unmerge_
    kw = dict(
        fan_in_fan_out=case.fan_in_fan_out,
        safe=case.safe,
        rank_splits=list(case.ranks) if len(case.ranks) > 1 else None,
    )
    scaling = _scaling_arg(case, scale, device)

    if case.error is not None:
        exc, pattern = case.error
        with pytest.raises(exc, match=pattern):
            fn(w, a_dev, bb_dev, scaling, **kw)
        assert_bits_equal(w, before)
        return

    ptr = w.data_ptr()
    with poisoned_empty():
        out = fn(w, a_dev, bb_dev, scaling, **kw)
    assert out is w and w.data_ptr() == ptr, "merge_/unmerge_ must update the weight in place and return it"
    a64, bb64, s64 = a.double(), bb.double(), scale.double()
    delta = (bb64 * s64) @ a64
    bound_terms = (bb64.abs() * s64.abs()) @ a64.abs()
    if case.fan_in_fan_out:
        delta, bound_terms = delta.T, bound_terms.T
    exact = w0.double() + sign * delta
    # the merge accumulates in float32 (float64 for float64 weights) before its one rounding to the weight's dtype
    eps = torch.finfo(torch.float64 if wdt == torch.float64 else torch.float32).eps
    slack = 2 * (R + 2) * eps * (bound_terms + w0.double().abs())
    assert_rounded_once(w.cpu(), exact, slack)
