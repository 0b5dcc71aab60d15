"""Interim tune spaces for kernels whose modules do not define tune_space() yet (kernels/tuned.py: TuneCase).

The launchers pick their tiles from static tables (fused_gemm.gemm_config, small_m.small_m_config,
shrink.shrink_config, rows.gemm_config, merge's module constants). Here each case runs the real launcher with
that table entry replaced by a candidate for the duration of one launch, so the candidates go through exactly the
production code path. When a kernel module grows its own tune_space() for the same (kernel, shape_class), the
tune step uses that one instead. If a table is renamed or changes signature, the case reports an error; it never
breaks the other cases.

Shape classes are named after the static table's branch: they are what the launchers should pass to
tuned_config() for the same shapes.
"""
from __future__ import annotations

import contextlib
import importlib
from typing import Callable, Dict, List, Tuple

import torch

from fused_lora.gpu_check.judge import ATOL
from fused_lora.kernels.tuned import TuneCase, TuneRun


@contextlib.contextmanager
def replaced(module, name: str, value):
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def _module(name: str):
    return importlib.import_module(f"fused_lora.kernels.{name}")


def _dtype(tiny: bool) -> torch.dtype:
    return torch.float32 if tiny else torch.bfloat16  # the interpreter corrupts bf16


def _lora_inputs(M, K, N, r, device, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=gen).to(device, dtype)
    w = (torch.randn(N, K, generator=gen) * K ** -0.5).to(device, dtype)
    a = (torch.randn(r, K, generator=gen) * K ** -0.5).to(device, dtype)
    b = (torch.randn(N, r, generator=gen) * r ** -0.5).to(device, dtype)
    scale = torch.full((r,), 2.0, dtype=torch.float32, device=device)
    return x, w, a, b, scale


def _y64(x, w, a, b, scale):
    x64 = x.double()
    return x64 @ w.double().T + ((x64 @ a.double().T) * scale.double()) @ b.double().T


def _dense_fwd_case(kernel: str, table: str, path: str, dims: dict, tiny_dims: dict) -> Callable:
    """make() for a forward through kernels/dense.lora_fwd with `table` (a function in module `kernel`) replaced."""
    def make(device: torch.device, tiny: bool) -> TuneRun:
        dense, module = _module("dense"), _module(kernel)
        d = tiny_dims if tiny else dims
        dtype = _dtype(tiny)
        x, w, a, b, scale = _lora_inputs(d["M"], d["K"], d["N"], d["r"], device, dtype)
        seed = torch.zeros(1, dtype=torch.int64, device=device)
        y = torch.empty(d["M"], d["N"], dtype=dtype, device=device)
        t = torch.empty(d["M"], d["r"], dtype=torch.float32, device=device)

        def launch(config: dict) -> torch.Tensor:
            with replaced(module, table, lambda *args, **kwargs: dict(config)):
                dense.lora_fwd(x, w, None, a, b, scale, [0, d["r"]], [0.0], seed, path=path, y_out=y, t_out=t)
            return y
        return TuneRun(launch=launch, reference=_y64(x, w, a, b, scale), atol=ATOL[dtype], shape=dict(d))
    return make


def _shrink_make(dims: dict, tiny_dims: dict) -> Callable:
    def make(device: torch.device, tiny: bool) -> TuneRun:
        shrink, philox = _module("shrink"), _module("philox")
        d = tiny_dims if tiny else dims
        dtype = _dtype(tiny)
        x, _, a, _, scale = _lora_inputs(d["M"], d["K"], 1, d["r"], device, dtype)
        seed = torch.zeros(1, dtype=torch.int64, device=device)
        block_r = 16 if d["r"] <= 16 else 64
        seg_table, n_segs = philox.segment_table([0, d["r"]], [0.0], block_r, device)
        t = torch.empty(d["M"], d["r"], dtype=torch.float32, device=device)

        def launch(config: dict) -> torch.Tensor:
            with replaced(shrink, "shrink_config", lambda *args, **kwargs: dict(config)):
                shrink.launch_shrink(x, a, scale, seg_table, n_segs, seed, t, block_r, False, "ieee")
            return t
        return TuneRun(launch=launch, reference=(x.double() @ a.double().T) * scale.double(), atol=ATOL[dtype],
                       shape=dict(d))
    return make


def _merge_make(dims: dict, tiny_dims: dict) -> Callable:
    names = ("BLOCK_ROWS", "BLOCK_COLS", "BLOCK_R", "NUM_WARPS")

    def make(device: torch.device, tiny: bool) -> TuneRun:
        merge = _module("merge")
        d = tiny_dims if tiny else dims
        dtype = _dtype(tiny)
        _, w, a, b, scale = _lora_inputs(1, d["K"], d["N"], d["r"], device, dtype)
        original = w.clone()

        def launch(config: dict) -> torch.Tensor:
            with contextlib.ExitStack() as stack:
                for name in names:
                    stack.enter_context(replaced(merge, name, config[name]))
                merge.lora_merge_(w, a, b, scale, 1.0, False, False)
            return w

        exact = original.double() + (b.double() * scale.double()) @ a.double()
        return TuneRun(launch=launch, reference=exact, atol=0.0, shape=dict(d), reset=lambda: w.copy_(original))
    return make


def _rows_make(dims: dict, tiny_dims: dict) -> Callable:
    def make(device: torch.device, tiny: bool) -> TuneRun:
        rows = _module("rows")
        d = tiny_dims if tiny else dims
        dtype = _dtype(tiny)
        n, r = d["adapters"], d["r"]
        x, w, a, b, _ = _lora_inputs(d["M"], d["K"], d["N"], n * r, device, dtype)
        scale = torch.full((n * r,), 2.0, dtype=torch.float32, device=device)
        ids = (torch.arange(d["M"]) % n).to(device)
        rank_ptr = [i * r for i in range(n + 1)]
        seed = torch.zeros(1, dtype=torch.int64, device=device)

        def launch(config: dict) -> torch.Tensor:
            with replaced(rows, "gemm_config", lambda *args, **kwargs: rows.RowsConfig(**config)):
                y, _ = rows.lora_rows_fwd(x, w, None, a, b, scale, rank_ptr, ids, [0.0] * n, seed)
            return y

        x64 = x.double()
        ref = x64 @ w.double().T
        for i in range(n):
            sel = (ids == i).double()[:, None]
            lo, hi = i * r, (i + 1) * r
            ref += sel * ((x64 @ a[lo:hi].double().T) * 2.0) @ b[:, lo:hi].double().T
        return TuneRun(launch=launch, reference=ref, atol=ATOL[dtype], shape=dict(d))
    return make


def _configs(keys: Tuple[str, ...], rows: List[tuple]) -> List[Dict[str, int]]:
    return [dict(zip(keys, row)) for row in rows]


GEMM_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")
SMALL_M_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")
SHRINK_KEYS = ("BLOCK_M", "BLOCK_K", "num_warps", "num_stages")
MERGE_KEYS = ("BLOCK_ROWS", "BLOCK_COLS", "BLOCK_R", "NUM_WARPS")
ROWS_KEYS = ("block_m", "block_n", "block_k", "block_r", "num_warps", "num_stages")
TINY = dict(M=20, K=40, N=48, r=4)

# (kernel, shape_class, default (table lookup), candidates, make, in the quick selection)
_SPECS = [
    ("fused_gemm", "y:bf16:M>256",
     lambda: _module("fused_gemm").gemm_config(4096, 2, False, False),
     _configs(GEMM_KEYS, [(128, 128, 64, 8, 8, 4), (128, 256, 64, 8, 8, 3), (256, 128, 64, 8, 8, 3),
                          (128, 128, 64, 8, 4, 4), (128, 128, 32, 8, 4, 5)]),
     _dense_fwd_case("fused_gemm", "gemm_config", "large_m", dict(M=4096, K=4096, N=4096, r=16), TINY), True),
    ("small_m", "bf16:M<=16",
     lambda: _module("small_m").small_m_config(16, 2, False),
     _configs(SMALL_M_KEYS, [(16, 64, 256, 4, 3), (16, 128, 128, 4, 4), (16, 64, 128, 8, 4), (16, 64, 64, 4, 6),
                             (16, 32, 128, 4, 4)]),
     _dense_fwd_case("small_m", "small_m_config", "small_m", dict(M=16, K=4096, N=4096, r=16), TINY), True),
    ("fused_gemm", "y:bf16:M<=256",
     lambda: _module("fused_gemm").gemm_config(256, 2, False, False),
     _configs(GEMM_KEYS, [(64, 128, 64, 8, 4, 4), (128, 128, 64, 8, 8, 3), (64, 256, 64, 8, 8, 3),
                          (64, 64, 128, 8, 4, 4)]),
     _dense_fwd_case("fused_gemm", "gemm_config", "large_m", dict(M=256, K=4096, N=4096, r=16), TINY), False),
    ("small_m", "bf16:M<=64",
     lambda: _module("small_m").small_m_config(64, 2, False),
     _configs(SMALL_M_KEYS, [(64, 64, 128, 8, 3), (64, 128, 64, 8, 3), (64, 64, 64, 4, 4)]),
     _dense_fwd_case("small_m", "small_m_config", "small_m", dict(M=64, K=4096, N=4096, r=16), TINY), False),
    ("shrink", "bf16:nodrop",
     lambda: _module("shrink").shrink_config(2, False),
     _configs(SHRINK_KEYS, [(128, 64, 4, 3), (64, 64, 4, 4), (64, 256, 4, 2), (128, 128, 8, 3)]),
     _shrink_make(dict(M=4096, K=4096, r=16), dict(M=20, K=40, r=4)), False),
    ("merge", "bf16",
     lambda: {k: getattr(_module("merge"), k) for k in MERGE_KEYS},
     _configs(MERGE_KEYS, [(128, 128, 16, 4), (64, 256, 16, 4), (32, 256, 16, 4), (64, 128, 16, 8)]),
     _merge_make(dict(K=4096, N=4096, r=16), dict(K=40, N=48, r=4)), False),
    ("rows_gemm", "bf16:small",
     lambda: vars(_module("rows").gemm_config(16, 16, torch.bfloat16)),
     _configs(ROWS_KEYS, [(16, 128, 64, 16, 4, 4), (16, 64, 128, 16, 4, 3), (16, 64, 64, 16, 4, 5)]),
     _rows_make(dict(M=16, K=4096, N=4096, r=16, adapters=16), dict(M=12, K=40, N=48, r=4, adapters=3)), False),
]


def interim_cases() -> Tuple[List[Tuple[TuneCase, bool]], List[str]]:
    """([(case, in the quick selection)], problems): a spec whose static table cannot be read is a problem, not a
    crash (the kernels are being rewritten)."""
    cases, problems = [], []
    for kernel, shape_class, default, candidates, make, quick in _SPECS:
        try:
            case = TuneCase(kernel=kernel, shape_class=shape_class, default=dict(default()),
                            candidates=tuple(candidates), make=make, description="interim (gpu_check/tune_spaces.py)")
        except Exception as exc:  # noqa: BLE001
            problems.append(f"{kernel}/{shape_class}: static table unreadable ({type(exc).__name__}: {exc})")
            continue
        cases.append((case, quick))
    return cases, problems
