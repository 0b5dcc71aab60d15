"""The C++ backend's direct entries (csrc/direct_entry.cpp: fused_lora._C.lora_fwd, ...), which
fused_lora.ops.cpp_backend calls instead of torch.ops.fused_lora_cpu.* to skip the dispatcher's Python layer.

They must give what the registered ops give (the same C++ functions: equal bit for bit), do what the dispatcher
did before calling them (inputs that require grad detached, nothing recorded by autograd, also from at::parallel_for
worker threads; a profiler record under the op's name) and raise the same errors.
"""

from __future__ import annotations

import pytest
import torch

cb = pytest.importorskip("fused_lora.ops.cpp_backend", reason="C++ backend not built")
_C = cb._C
registered = torch.ops.fused_lora_cpu


def _operands(M, K, N, ranks, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    R = sum(ranks)
    x = torch.randn(M, K, generator=gen).to(dtype)
    w = (torch.randn(N, K, generator=gen) / K**0.5).to(dtype)
    bias = torch.randn(N, generator=gen).to(dtype)
    a = (torch.randn(R, K, generator=gen) / K**0.5).to(dtype)
    b = (torch.randn(N, R, generator=gen) / max(R, 1) ** 0.5).to(dtype)
    scale = torch.rand(R, generator=gen) + 0.5
    ptr = [0]
    for r in ranks:
        ptr.append(ptr[-1] + r)
    dy = torch.randn(M, N, generator=gen).to(dtype)
    ids = torch.randint(-1, len(ranks), (M,), generator=gen)
    return x, w, bias, a, b, scale, ptr, dy, ids


def test_backend_calls_the_direct_entries():
    assert cb.lora_fwd is _C.lora_fwd and cb.lora_bwd is _C.lora_bwd
    assert cb.lora_rows_fwd is _C.lora_rows_fwd and cb.lora_rows_bwd is _C.lora_rows_bwd


# few rows (lora_small.cpp) and many (lora_dense.cpp row blocks); dropout on one adapter of two
@pytest.mark.parametrize("M", [3, 131])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_direct_entries_equal_the_registered_ops(M, dtype):
    x, w, bias, a, b, scale, ptr, dy, ids = _operands(M, 37, 53, [5, 3], dtype)
    seed, rates = torch.tensor([1234]), [0.0, 0.25]
    y, t = _C.lora_fwd(x, w, bias, a, b, scale, ptr, rates, seed)
    y_ref, t_ref = registered.lora_fwd(x, w, bias, a, b, scale, ptr, rates, seed)
    assert torch.equal(y, y_ref) and torch.equal(t, t_ref)
    for need_dx in (True, False):
        got = _C.lora_bwd(dy, x, w, a, b, scale, t, ptr, rates, seed, need_dx)
        want = registered.lora_bwd(dy, x, w, a, b, scale, t, ptr, rates, seed, need_dx)
        assert (got[0] is None) == (not need_dx)
        for g, e in zip(got, want):
            assert (g is None and e is None) or torch.equal(g, e)
    y, t = _C.lora_rows_fwd(x, w, bias, a, b, scale, ptr, ids, rates, seed)
    y_ref, t_ref = registered.lora_rows_fwd(x, w, bias, a, b, scale, ptr, ids, rates, seed)
    assert torch.equal(y, y_ref) and torch.equal(t, t_ref)
    got = _C.lora_rows_bwd(dy, x, w, a, b, scale, t, ptr, ids, rates, seed, True)
    want = registered.lora_rows_bwd(dy, x, w, a, b, scale, t, ptr, ids, rates, seed, True)
    for g, e in zip(got, want):
        assert torch.equal(g, e)


def test_lists_as_any_sequence_of_numbers():
    """rank_ptr / dropout_p arrive as lists, tuples or torch.Size, with ints where floats are expected."""
    x, w, bias, a, b, scale, ptr, _, _ = _operands(4, 16, 8, [4], torch.float32)
    seed = torch.zeros(1, dtype=torch.int64)
    y_list = _C.lora_fwd(x, w, bias, a, b, scale, ptr, [0.0], seed)[0]
    y_tuple = _C.lora_fwd(x, w, bias, a, b, scale, torch.Size(ptr), (0,), seed)[0]
    assert torch.equal(y_list, y_tuple)


@pytest.mark.parametrize("M", [5, 300])
def test_inputs_that_require_grad_leave_no_graph(M):
    """With grad mode on and every input requiring grad, the outputs are plain tensors: the entry runs below
    autograd and detaches its inputs, so the inner ATen calls (also those on worker threads, M = 300 takes the
    parallel row-block loops) record nothing."""
    x, w, bias, a, b, scale, ptr, dy, ids = _operands(M, 70, 90, [6, 2], torch.float32)
    leaves = [t.requires_grad_() for t in (x, w, bias, a, b, scale)]
    seed, rates = torch.tensor([7]), [0.0, 0.1]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.enable_grad():
            outs = list(_C.lora_fwd(x, w, bias, a, b, scale, ptr, rates, seed))
            outs += list(_C.lora_bwd(dy, x, w, a, b, scale, outs[1], ptr, rates, seed, True))
            outs += list(_C.lora_rows_fwd(x, w, bias, a, b, scale, ptr, ids, rates, seed))
            outs += list(_C.lora_rows_bwd(dy, x, w, a, b, scale, outs[-1], ptr, ids, rates, seed, True))
    finally:
        torch.set_num_threads(threads)
    for out in outs:
        assert not out.requires_grad and out.grad_fn is None
    for leaf in leaves:
        assert leaf.grad is None


def test_profiler_sees_the_op():
    x, w, bias, a, b, scale, ptr, dy, _ = _operands(4, 16, 8, [4], torch.float32)
    seed = torch.zeros(1, dtype=torch.int64)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        _, t = _C.lora_fwd(x, w, bias, a, b, scale, ptr, [0.0], seed)
        _C.lora_bwd(dy, x, w, a, b, scale, t, ptr, [0.0], seed, True)
    names = {e.name for e in prof.events()}
    assert {"fused_lora_cpu::lora_fwd", "fused_lora_cpu::lora_bwd"} <= names


def test_errors_as_the_registered_op_raises_them():
    x, w, bias, a, b, scale, ptr, _, _ = _operands(4, 16, 8, [4], torch.float32)
    seed = torch.zeros(1, dtype=torch.int64)
    with pytest.raises(TypeError, match=r"lora_fwd: x has dtype torch.int64"):
        _C.lora_fwd(x.long(), w, bias, a, b, scale, ptr, [0.0], seed)
    with pytest.raises(RuntimeError, match="dropout_p has 2 entries for 1 adapters"):
        _C.lora_fwd(x, w, bias, a, b, scale, ptr, [0.0, 0.0], seed)
    with pytest.raises(TypeError):  # a rank offset that is no integer
        _C.lora_fwd(x, w, bias, a, b, scale, [0.0, 4.5], [0.0], seed)
