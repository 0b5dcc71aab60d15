"""Programmatic dependent launch (kernels/config.py): who launches with launch_pdl, and that it changes no result.

On CPU (the interpreter cannot run griddepcontrol, so PDL is never on there): the launchers' decisions are checked
with the kernels replaced by recorders and the device's compute capability mocked: the consumer that reads the t of
the shrink launched just before it (decode DENSE_T / ROWS_T, the forward fused GEMM) gets launch_pdl=True and
USE_GDC=True, the shrink USE_GDC=True (its signal), nothing else, and only on CUDA sm_90+ with FUSED_LORA_PDL=1; the
codegen specs of the GDC variants are limited to sm_90 and gated on their griddepcontrol instructions.
With --device cuda on an sm_90 GPU: PDL on and off give bit-identical y and t (the reductions are fixed-order and the
rank term's place does not depend on the switch), eagerly and replayed from a CUDA graph; a consumer that read t
before the shrink finished would show here as a difference.
"""

import types

import pytest
import torch

pytest.importorskip("triton")

from fused_lora.kernels import config, decode, dense, fused_gemm, rows, shrink  # noqa: E402
from tests.devices import move  # noqa: E402


def test_switch_is_off_unless_set_to_one(monkeypatch):
    monkeypatch.delenv(config.PDL_ENV, raising=False)
    assert config.pdl_switch() is False
    monkeypatch.setenv(config.PDL_ENV, "0")
    assert config.pdl_switch() is False
    monkeypatch.setenv(config.PDL_ENV, "1")
    assert config.pdl_switch() is True
    monkeypatch.setenv(config.PDL_ENV, "yes")
    with pytest.raises(ValueError, match="FUSED_LORA_PDL='yes'.*0.*1"):
        config.pdl_switch()


@pytest.fixture
def gpu(monkeypatch):
    """Pretend the CPU device is a compiled-kernel CUDA device of a chosen capability (gpu(9, 0); None: not CUDA)."""

    def make(major_minor, switch="1", cuda=(13, 0)):
        monkeypatch.setattr(config, "device_capability", lambda device: major_minor)
        monkeypatch.setattr(config, "interpreting", lambda: False)
        monkeypatch.setattr(config, "_cuda_version", lambda: cuda)
        if switch is None:
            monkeypatch.delenv(config.PDL_ENV, raising=False)
        else:
            monkeypatch.setenv(config.PDL_ENV, switch)

    return make


@pytest.mark.parametrize(
    "capability,switch,cuda,expected",
    [
        ((9, 0), "1", (13, 0), True),
        ((10, 0), "1", (12, 8), True),
        ((9, 0), None, (13, 0), False),  # off by default
        ((9, 0), "0", (13, 0), False),
        ((8, 0), "1", (13, 0), False),  # no PDL before Hopper
        ((8, 9), "1", (13, 0), False),
        (None, "1", (13, 0), False),  # not a CUDA device
        ((9, 0), "1", (12, 1), False),  # this CUDA cannot capture a PDL launch into a graph
    ],
)
def test_enabled_only_on_sm90_cuda_with_the_switch(gpu, capability, switch, cuda, expected):
    gpu(capability, switch, cuda)
    assert config.pdl_enabled("cpu") is expected


def test_never_under_the_interpreter(monkeypatch):
    monkeypatch.setattr(config, "device_capability", lambda device: (9, 0))
    monkeypatch.setenv(config.PDL_ENV, "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert config.interpreting()
    assert config.pdl_enabled("cpu") is False


class _Recorder:
    """Stands in for a @triton.jit kernel: kernel[grid](*args, **kwargs) records the launch options."""

    def __init__(self, name, log):
        self.name, self.log = name, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append(
                types.SimpleNamespace(
                    kernel=self.name, pdl=kwargs.get("launch_pdl", False), gdc=kwargs.get("USE_GDC", False)
                )
            )

        return launch


@pytest.fixture
def launches(monkeypatch):
    log = []
    for module, name in ((shrink, "shrink_kernel"), (decode, "decode_kernel"), (fused_gemm, "fused_gemm_kernel")):
        monkeypatch.setattr(module, name, _Recorder(name, log))
    return log


def _operands(M, K, N, ranks):
    gen = torch.Generator().manual_seed(M * 31 + N)
    R = sum(ranks)
    ptr = [0]
    for r in ranks:
        ptr.append(ptr[-1] + r)
    x, w = torch.randn(M, K, generator=gen).half(), torch.randn(N, K, generator=gen).half()
    a, b = torch.randn(R, K, generator=gen).half(), torch.randn(N, R, generator=gen).half()
    return x, w, a, b, torch.rand(R, generator=gen), ptr, torch.tensor([7])


def _forward(op, M, ranks, K=96, N=40):
    x, w, a, b, scale, ptr, seed = _operands(M, K, N, ranks)
    ps = [0.0] * len(ranks)
    if op == "rows":
        ids = torch.arange(M) % max(1, len(ranks))
        rows.lora_rows_fwd(x, w, None, a, b, scale, ptr, ids, ps, seed)
    else:
        dense.lora_fwd(x, w, None, a, b, scale, ptr, ps, seed)


# (op, M, ranks) -> [(kernel, launch_pdl, USE_GDC)] on sm_90 with the switch on
SM90_LAUNCHES = [
    (("rows", 16, [4] * 16), [("shrink_kernel", False, True), ("decode_kernel", True, True)]),
    (("rows", 70, [5, 3]), [("shrink_kernel", False, True), ("fused_gemm_kernel", True, True)]),
    (("rows", 16, [0, 0]), [("decode_kernel", False, False)]),  # no shrink: t.zero_() is not ours
    (("dense", 5, [16]), [("decode_kernel", False, False)]),  # the shrink rides in the K loop
    (("dense", 5, [40]), [("shrink_kernel", False, True), ("decode_kernel", True, True)]),  # DENSE_T
    (("dense", 70, [16]), [("shrink_kernel", False, True), ("fused_gemm_kernel", True, True)]),
]


@pytest.mark.parametrize("case,expected", SM90_LAUNCHES, ids=[f"{c[0]}-M{c[1]}-R{sum(c[2])}" for c, _ in SM90_LAUNCHES])
def test_the_consumer_of_a_shrink_is_launched_with_pdl_on_sm90(gpu, launches, case, expected):
    gpu((9, 0))
    _forward(*case)
    assert [(lc.kernel, lc.pdl, lc.gdc) for lc in launches] == expected


@pytest.mark.parametrize("case,expected", SM90_LAUNCHES, ids=[f"{c[0]}-M{c[1]}-R{sum(c[2])}" for c, _ in SM90_LAUNCHES])
def test_the_plan_marks_the_launches_that_use_pdl(case, expected):
    """kernels/launch_plan.plan(pdl=True) (what the MODEL overlaps) flags exactly the launches made with PDL."""
    from fused_lora.kernels import launch_plan as lp

    op, M, ranks = case
    shape = lp.Shape(
        M, 40, 96, ranks, "float16", row_ids=lp.interleaved(M, max(1, len(ranks))) if op == "rows" else None
    )
    planned = lp.plan("rows_forward" if op == "rows" else "forward", shape, pdl=True)
    assert [(p.kernel, p.pdl) for p in planned] == [(kernel, pdl) for kernel, pdl, _ in expected]
    assert not any(p.pdl for p in lp.plan("rows_forward" if op == "rows" else "forward", shape))  # default: off


@pytest.mark.parametrize("capability,switch", [((8, 0), "1"), ((9, 0), None), (None, "1")])
@pytest.mark.parametrize(
    "case", [c for c, _ in SM90_LAUNCHES], ids=[f"{c[0]}-M{c[1]}-R{sum(c[2])}" for c, _ in SM90_LAUNCHES]
)
def test_no_pdl_without_sm90_or_the_switch(gpu, launches, capability, switch, case):
    gpu(capability, switch)
    _forward(*case)
    assert launches and not any(lc.pdl or lc.gdc for lc in launches)


def test_dx_is_never_a_pdl_consumer(gpu, launches):
    """dX's fused GEMM reads dS from launches further back (and may apply dropout masks to its rank term first)."""
    gpu((9, 0))
    x, w, a, b, scale, ptr, seed = _operands(70, 96, 40, [5, 3])
    dy = torch.randn(70, 40).half()
    for ps in ([0.0, 0.0], [0.3, 0.0]):
        dense.lora_bwd(dy, x, w, a, b, scale, torch.randn(70, 8), ptr, ps, seed, True)
        rows.lora_rows_bwd(dy, x, w, a, b, scale, torch.randn(70, 5), ptr, torch.arange(70) % 2, ps, seed, True)
    dx = [lc for lc in launches if lc.kernel == "fused_gemm_kernel"]
    assert len(dx) == 4 and not any(lc.pdl or lc.gdc for lc in dx)


def test_the_decision_is_the_same_while_a_stream_captures(gpu, launches, monkeypatch):
    """launch_pdl is a Triton compile option: flipping it during capture would load a second binary of the kernel,
    which CUDA refuses while capturing. A PDL launch is captured as a programmatic edge instead (CUDA >= 12.3)."""
    gpu((9, 0))
    _forward("rows", 16, [4] * 16)
    eager = [(lc.kernel, lc.pdl, lc.gdc) for lc in launches]
    launches.clear()
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    _forward("rows", 16, [4] * 16)
    assert [(lc.kernel, lc.pdl, lc.gdc) for lc in launches] == eager


def test_gdc_specs_are_sm90_only_and_gated_on_griddepcontrol():
    from fused_lora.kernels.spec import PDL_CONSUMER_PTX, PDL_PRODUCER_PTX

    seen = set()
    for module in (decode, shrink, fused_gemm):
        for spec in module.codegen_specs():
            if not spec.constexprs.get("USE_GDC"):
                assert "arches" not in spec.extra, spec.name
                assert "griddepcontrol" not in str(spec.extra.get("ptx_patterns", {})), spec.name
                continue
            seen.add(spec.fn.__name__)
            assert spec.extra["arches"] == [90], spec.name
            wanted = PDL_PRODUCER_PTX if module is shrink else PDL_CONSUMER_PTX
            assert wanted.items() <= spec.extra["ptx_patterns"].items(), spec.name
            assert not spec.constexprs.get("LORA_DROPOUT") and not spec.constexprs.get("HAS_DROPOUT"), spec.name
    assert seen == {"decode_kernel", "shrink_kernel", "fused_gemm_kernel"}


# ---- GPU (--device cuda, sm_90): PDL changes no bit, eagerly or from a CUDA graph ------------------------------------


def _sm90(device):
    if device.type != "cuda":
        pytest.skip("needs an sm_90 GPU (--device cuda): PDL never runs under the interpreter")
    if torch.cuda.get_device_capability(device) < (9, 0):
        pytest.skip(f"PDL needs compute capability >= 9.0, this GPU has {torch.cuda.get_device_capability(device)}")


def _run_both(monkeypatch, fn):
    out = {}
    for switch in ("0", "1"):
        monkeypatch.setenv(config.PDL_ENV, switch)
        out[switch] = [v.clone() for v in fn()]
    return out["0"], out["1"]


@pytest.mark.parametrize(
    "op,M,ranks", [("rows", 16, [16] * 16), ("rows", 2048, [16] * 4), ("dense", 512, [16]), ("dense", 9, [48])]
)
def test_gpu_pdl_on_and_off_give_identical_bits(device, monkeypatch, op, M, ranks):
    _sm90(device)
    K = N = 4096
    x, w, a, b, scale, ptr, seed = _operands(M, K, N, ranks)
    x, b = x.bfloat16(), b.bfloat16()
    w, a = (w.float() / K**0.5).bfloat16(), (a.float() / K**0.5).bfloat16()
    x, w, a, b, scale, seed = (move(v, device) for v in (x, w, a, b, scale, seed))
    ps = [0.0] * len(ranks)
    ids = move(torch.arange(M) % len(ranks), device)

    def fn():
        if op == "rows":
            return rows.lora_rows_fwd(x, w, None, a, b, scale, ptr, ids, ps, seed)
        return dense.lora_fwd(x, w, None, a, b, scale, ptr, ps, seed)

    fn()  # the first call compiles; compared calls follow
    off, on = _run_both(monkeypatch, fn)
    monkeypatch.setenv(config.PDL_ENV, "1")
    assert config.pdl_enabled(device)
    for trial in range(5):  # a race would not show every time
        for name, u, v in zip(("y", "t"), off, on if trial == 0 else fn()):
            assert torch.equal(u, v), f"{name} differs with PDL on (call {trial + 1})"
    # replayed from a CUDA graph captured with PDL on (warmed up on a side stream first, as capture requires)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fn()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    for name, u, v in zip(("y", "t"), off, captured):
        assert torch.equal(u, v), f"{name} differs when replayed from a CUDA graph with PDL on"
