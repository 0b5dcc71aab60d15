"""Interim tune spaces for kernels whose modules do not define tune_space() yet (kernels/tuned.py: TuneCase).

The launchers pick their tiles from static tables (fused_gemm.gemm_config, decode.decode_config (small_m before
the decode rewrite), shrink.shrink_config, merge's module constants). Here each case runs the real launcher with
that table function replaced by a candidate for the duration of one launch, so the candidates go through exactly
the production code path. The case's kernel name, shape class and default are read from the table itself: where
it asks the tuned store (config.tuned), the store is bypassed and the names it was asked with recorded, so the
tuned file holds exactly the keys the launcher will look up. When a kernel module grows its own tune_space() for
the same (kernel, shape_class), the tune step uses that one instead. A table that is renamed or changes signature
makes its case a reported problem; it never breaks the other cases.
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
    w = (torch.randn(N, K, generator=gen) * K**-0.5).to(device, dtype)
    a = (torch.randn(r, K, generator=gen) * K**-0.5).to(device, dtype)
    b = (torch.randn(N, r, generator=gen) * r**-0.5).to(device, dtype)
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

        return TuneRun(
            launch=launch, reference=(x.double() @ a.double().T) * scale.double(), atol=ATOL[dtype], shape=dict(d)
        )

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


def _configs(keys: Tuple[str, ...], rows: List[tuple]) -> List[Dict[str, int]]:
    return [dict(zip(keys, row)) for row in rows]


def static_entry(module, table: str, args: tuple, fallback: Tuple[str, str]) -> Tuple[str, str, dict]:
    """(kernel, shape_class, static config) of a table lookup, as the launcher would make it. Where the table asks
    the tuned store (config.tuned -> tuned_config), the store is bypassed and its (kernel, shape_class) recorded, so
    the case uses the launcher's own names; otherwise `fallback` names it."""
    seen = {}

    def spy(kernel, shape_class, default, device=None):
        seen.update(kernel=kernel, shape_class=shape_class)
        return dict(default)

    try:
        store = importlib.import_module("fused_lora.kernels.config")
    except ImportError:
        store = None
    if store is not None and hasattr(store, "tuned_config"):
        with replaced(store, "tuned_config", spy):
            default = getattr(module, table)(*args)
    else:
        default = getattr(module, table)(*args)
    return seen.get("kernel", fallback[0]), seen.get("shape_class", fallback[1]), dict(default)


GEMM_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")
DECODE_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")
SHRINK_KEYS = ("BLOCK_M", "BLOCK_K", "num_warps", "num_stages")
MERGE_KEYS = ("BLOCK_ROWS", "BLOCK_COLS", "BLOCK_R", "NUM_WARPS")
TINY = dict(M=20, K=40, N=48, r=4)
DECODE_TABLES = (("decode", "decode_config"), ("small_m", "small_m_config"))  # after / before the decode rewrite


def _decode_args(name: str, M: int, r: int, N: int) -> tuple:
    if name == "decode":
        decode = _module("decode")
        # N picks the tile width (32-column tiles at M <= 16 where 64 would need K split): the class the launch uses
        return (M, 2, decode.rank_mode(False, r, 1), False, None, N)
    return (M, 2, False)


def _gemm(M: int, quick: bool, candidates):
    module = _module("fused_gemm")
    kernel, shape_class, default = static_entry(
        module, "gemm_config", (M, 2, False, False), ("fused_gemm", f"16bit:M{'>' if M > 256 else '<='}256")
    )
    make = _dense_fwd_case("fused_gemm", "gemm_config", "large_m", dict(M=M, K=4096, N=4096, r=16), TINY)
    return TuneCase(
        kernel,
        shape_class,
        default,
        tuple(_configs(GEMM_KEYS, candidates)),
        make,
        "interim: fused_gemm.gemm_config replaced per launch",
    ), quick


def _decode(M: int, quick: bool, candidates):
    for name, table in DECODE_TABLES:
        try:
            module = _module(name)
        except ImportError:
            continue
        shape = dict(M=M, K=4096, N=4096, r=16)
        kernel, shape_class, default = static_entry(
            module, table, _decode_args(name, M, shape["r"], shape["N"]), (name, f"16bit:M<={16 if M <= 16 else 64}")
        )
        make = _dense_fwd_case(name, table, "small_m", shape, TINY)
        return TuneCase(
            kernel,
            shape_class,
            default,
            tuple(_configs(DECODE_KEYS, candidates)),
            make,
            f"interim: {name}.{table} replaced per launch",
        ), quick
    raise ImportError(f"none of {', '.join(n for n, _ in DECODE_TABLES)} in fused_lora.kernels")


def _shrink(quick: bool, candidates):
    kernel, shape_class, default = static_entry(
        _module("shrink"), "shrink_config", (2, False), ("shrink", "16bit:dropout=False")
    )
    return TuneCase(
        kernel,
        shape_class,
        default,
        tuple(_configs(SHRINK_KEYS, candidates)),
        _shrink_make(dict(M=4096, K=4096, r=16), dict(M=20, K=40, r=4)),
        "interim: shrink.shrink_config replaced per launch",
    ), quick


def _merge(quick: bool, candidates):
    merge = _module("merge")
    default = {k: getattr(merge, k) for k in MERGE_KEYS}
    return TuneCase(
        "merge",
        "16bit",
        default,
        tuple(_configs(MERGE_KEYS, candidates)),
        _merge_make(dict(K=4096, N=4096, r=16), dict(K=40, N=48, r=4)),
        "interim: merge's module constants replaced per launch (not read from the store yet)",
    ), quick


# most useful first; the quick run takes the ones marked True
_SPECS: List[Callable[[], Tuple[TuneCase, bool]]] = [
    lambda: _gemm(
        4096,
        True,
        [
            (128, 128, 64, 8, 8, 4),
            (128, 256, 64, 8, 8, 3),
            (256, 128, 64, 8, 8, 3),
            (128, 128, 64, 8, 4, 4),
            (128, 128, 32, 8, 4, 5),
        ],
    ),
    lambda: _decode(
        16,
        True,
        [(16, 64, 256, 4, 3), (16, 128, 128, 4, 4), (16, 64, 128, 8, 4), (16, 64, 64, 4, 6), (16, 32, 128, 4, 4)],
    ),
    lambda: _gemm(
        256, False, [(64, 128, 64, 8, 4, 4), (128, 128, 64, 8, 8, 3), (64, 256, 64, 8, 8, 3), (64, 64, 128, 8, 4, 4)]
    ),
    lambda: _decode(64, False, [(64, 64, 128, 8, 3), (64, 128, 64, 8, 3), (64, 64, 64, 4, 4)]),
    lambda: _shrink(False, [(128, 64, 4, 3), (64, 64, 4, 4), (64, 256, 4, 2), (128, 128, 8, 3)]),
    lambda: _merge(False, [(128, 128, 16, 4), (64, 256, 16, 4), (32, 256, 16, 4), (64, 128, 16, 8)]),
]


def interim_cases() -> Tuple[List[Tuple[TuneCase, bool]], List[str]]:
    """([(case, in the quick selection)], problems): a spec whose static table cannot be read is a problem, not a
    crash (the kernels change under it)."""
    cases, problems = [], []
    for spec in _SPECS:
        try:
            cases.append(spec())
        except Exception as exc:  # noqa: BLE001
            problems.append(f"interim tune space unavailable: {type(exc).__name__}: {exc}")
    return cases, problems
