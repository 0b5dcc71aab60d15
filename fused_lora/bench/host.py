"""`python -m fused_lora bench --ops host`: host time per call at shapes where compute is ~0 (issue 14).

At K = N = 64 and 4 tokens every implementation's arithmetic costs well under a microsecond, so the time per call
is what Python, the dispatcher and autograd cost before (and around) the kernels: the floor of every eager call
on a GPU, where a decode GEMM of a 4096x4096 bf16 weight takes ~12 us.

Rows (calls), all on the CPU with one torch thread:
    eval 1 adapter         forward under no_grad, one adapter active
    eval 2 active          forward under no_grad, two adapters active (stacked along the rank axis)
    eval adapter_names     forward under no_grad, one adapter per sample (PEFT's mixed batch; 3 of 4 rows use
                           an adapter, one "__base__"); the functional column is lora_linear_rows with the ids
                           tensor built once
    train fwd+bwd          forward + backward of one adapter, base frozen, x requires grad, grads reset each call

Columns (implementations): nn.Linear (the same base layer alone: the floor), PEFT's LoRA Linear (the real peft
class), PEFT patched (that layer after fused_lora.integrations.peft.patch_model), FusedLoRALinear, the functional
fused_lora.lora_linear / lora_linear_rows with operands prepared once, and "backend op": the backend module that
serves the call (fused_lora.ops.resolve) called directly with prepared operands, its lora_fwd/lora_rows_fwd (and
lora_bwd for training, without autograd): what the fused call costs below the Python layers. Every row times all of
them in interleaved rounds (A B C, then B C A, ...); the median per call is printed, with fused/PEFT taken per round
(paired) and then its median, so machine load hits both sides of the ratio alike.

Clock: the calling thread's CPU time by default (`--clock thread`), which leaves out the time the thread waits
for a core on a crowded machine; every implementation runs on this one thread (torch.set_num_threads(1)), so its
CPU time is its cost. `--clock wall` uses time.perf_counter.
"""

from __future__ import annotations

import argparse
import math
import os
import textwrap
import time
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from fused_lora.bench.tables import render
from fused_lora.bench.timing import Timings

K = N = 64
TOKENS = 4
RANK = 8
ALPHA = 16.0
CALLS = ("eval 1 adapter", "eval 2 active", "eval adapter_names", "train fwd+bwd")
IMPLS = ("nn.Linear", "PEFT", "PEFT patched", "FusedLoRALinear", "functional", "backend op")
MIXED_NAMES = ["a", "b", "__base__", "a"]

# issue 14's targets for FusedLoRALinear / PEFT (benchmarks, not tests)
TARGETS = {"eval 1 adapter": 0.5, "eval 2 active": 0.5, "eval adapter_names": 0.6, "train fwd+bwd": 1.0}


def _base(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(K, N)


def _peft(base: nn.Linear, names: List[str]):
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as PeftLoraLinear

    config = LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights=False)
    layer = PeftLoraLinear(base, names[0], config=config, r=RANK, lora_alpha=ALPHA)
    for name in names[1:]:
        layer.update_layer(name, RANK, lora_alpha=ALPHA, config=config)
    return layer


def _fused(base: nn.Linear, names: List[str]):
    from fused_lora.layer import FusedLoRALinear

    layer = FusedLoRALinear.from_linear(base, names[0], r=RANK, lora_alpha=ALPHA, init_lora_weights=False)
    for name in names[1:]:
        layer.add_adapter(name, RANK, ALPHA, init_lora_weights=False)
    return layer


def _copy_adapters(src, dst, names: List[str]) -> None:
    with torch.no_grad():
        for n in names:
            dst.lora_A[n].weight.copy_(src.lora_A[n].weight)
            dst.lora_B[n].weight.copy_(src.lora_B[n].weight)


class Layers:
    """The layers one call compares, sharing values: every LoRA layer holds the same adapters a and b."""

    def __init__(self, active: List[str], train: bool):
        from fused_lora.integrations.peft import patch_model

        names = ["a", "b"]
        self.linear = _base()
        self.peft = _peft(_base(), names)
        self.patched = _peft(_base(), names)
        _copy_adapters(self.peft, self.patched, names)
        patch_model(self.patched)
        self.fused = _fused(_base(), names)
        _copy_adapters(self.peft, self.fused, names)
        for layer in (self.peft, self.patched, self.fused):
            layer.set_adapter(active)
        for layer in (self.linear, self.peft.base_layer, self.patched.base_layer, self.fused.base_layer):
            layer.requires_grad_(False)
        for layer in (self.linear, self.peft, self.patched, self.fused):
            layer.train(train)
        self.active = active

    def stacked(self):
        """(lora_a, lora_b, scalings, ranks) of the active adapters, stacked once, for the functional column."""
        a = torch.cat([self.fused.lora_A[n].weight for n in self.active], 0).detach()
        b = torch.cat([self.fused.lora_B[n].weight for n in self.active], 1).detach()
        return a, b, [float(self.fused.scaling[n]) for n in self.active], [RANK] * len(self.active)


def _op_operands(scalings: List[float], ranks: List[int]):
    """(backend module, per-rank scale, rank_ptr, zero dropout rates, seed) as the ops take them."""
    from fused_lora.ops import resolve

    scale = torch.tensor([s for s, r in zip(scalings, ranks) for _ in range(r)], dtype=torch.float32)
    ptr = [0]
    for r in ranks:
        ptr.append(ptr[-1] + r)
    return resolve(torch.device("cpu")), scale, ptr, [0.0] * len(ranks), torch.zeros(1, dtype=torch.int64)


def _eval_fns(layers: Layers, x: torch.Tensor, adapter_names: Optional[List[str]]) -> Dict[str, Callable]:
    import fused_lora

    base = layers.fused.base_layer
    weight, bias = base.weight.detach(), base.bias.detach()
    if adapter_names is None:
        a, b, scalings, ranks = layers.stacked()
        scaling = scalings[0] if len(scalings) == 1 else scalings
        splits = None if len(ranks) == 1 else ranks
        impl, scale, ptr, rates, seed = _op_operands(scalings, ranks)

        def functional():
            return fused_lora.lora_linear(x, base.weight, base.bias, a, b, scaling, rank_splits=splits)

        return {
            "nn.Linear": lambda: layers.linear(x),
            "PEFT": lambda: layers.peft(x),
            "PEFT patched": lambda: layers.patched(x),
            "FusedLoRALinear": lambda: layers.fused(x),
            "functional": functional,
            "backend op": lambda: impl.lora_fwd(x, weight, bias, a, b, scale, ptr, rates, seed),
        }
    a = torch.cat([layers.fused.lora_A[n].weight for n in ("a", "b")], 0).detach()
    b = torch.cat([layers.fused.lora_B[n].weight for n in ("a", "b")], 1).detach()
    index = {"a": 0, "b": 1}
    ids = torch.tensor([index.get(n, -1) for n in adapter_names])
    scalings = [float(layers.fused.scaling[n]) for n in ("a", "b")]
    impl, scale, ptr, rates, seed = _op_operands(scalings, [RANK, RANK])

    def rows():
        return fused_lora.lora_linear_rows(
            x, base.weight, base.bias, a, b, scalings, [RANK, RANK], ids, check_ids=False
        )

    return {
        "nn.Linear": lambda: layers.linear(x),
        "PEFT": lambda: layers.peft(x, adapter_names=adapter_names),
        "PEFT patched": lambda: layers.patched(x, adapter_names=adapter_names),
        "FusedLoRALinear": lambda: layers.fused(x, adapter_names=adapter_names),
        "functional": rows,
        "backend op": lambda: impl.lora_rows_fwd(x, weight, bias, a, b, scale, ptr, ids, rates, seed),
    }


def _train_fns(layers: Layers) -> Dict[str, Callable]:
    import fused_lora

    gen = torch.Generator().manual_seed(1)
    dy = torch.randn(TOKENS, N, generator=gen)
    base = layers.fused.base_layer
    a0, b0, scalings, _ = layers.stacked()
    lora_a, lora_b = a0.clone().requires_grad_(True), b0.clone().requires_grad_(True)

    def step(module_call: Callable, params: List[torch.Tensor]) -> Callable:
        x = torch.randn(TOKENS, K, generator=gen).requires_grad_(True)

        def call():
            x.grad = None
            for p in params:
                p.grad = None
            module_call(x).backward(dy)

        return call

    def lora_params(layer):
        return [p for p in layer.parameters() if p.requires_grad]

    impl, scale, ptr, rates, seed = _op_operands(scalings, [RANK])
    x_op, weight, bias = torch.randn(TOKENS, K, generator=gen), base.weight.detach(), base.bias.detach()

    def op_step():
        y, t = impl.lora_fwd(x_op, weight, bias, a0, b0, scale, ptr, rates, seed)
        return impl.lora_bwd(dy, x_op, weight, a0, b0, scale, t, ptr, rates, seed, True)

    return {
        "nn.Linear": step(layers.linear, []),
        "PEFT": step(layers.peft, lora_params(layers.peft)),
        "PEFT patched": step(layers.patched, lora_params(layers.patched)),
        "FusedLoRALinear": step(layers.fused, lora_params(layers.fused)),
        "functional": step(
            lambda x: fused_lora.lora_linear(x, base.weight, base.bias, lora_a, lora_b, scalings[0], training=True),
            [lora_a, lora_b],
        ),
        "backend op": op_step,
    }


def build(call: str) -> Dict[str, Callable]:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(TOKENS, K, generator=gen)
    if call == "eval 1 adapter":
        return _eval_fns(Layers(["a"], train=False), x, None)
    if call == "eval 2 active":
        return _eval_fns(Layers(["a", "b"], train=False), x, None)
    if call == "eval adapter_names":
        return _eval_fns(Layers(["a"], train=False), x, MIXED_NAMES)
    if call == "train fwd+bwd":
        return _train_fns(Layers(["a"], train=True))
    raise ValueError(f"unknown call {call!r}; expected one of {', '.join(CALLS)}")


def check_outputs_agree(fns: Dict[str, Callable], call: str) -> None:
    """The LoRA columns compute the same thing (a benchmark of a wrong answer measures nothing)."""
    if call == "train fwd+bwd":
        return
    with torch.no_grad():
        outs = {name: fn() for name, fn in fns.items() if name != "nn.Linear"}
    outs["backend op"] = outs["backend op"][0]
    ref = outs["PEFT"]
    for name, out in outs.items():
        if not torch.allclose(out, ref, rtol=1e-4, atol=1e-5):
            raise AssertionError(
                f"host bench, {call}: {name} differs from PEFT by {(out - ref).abs().max().item():.3e}"
            )


CLOCKS = {"thread": time.thread_time, "wall": time.perf_counter}


def _per_call(fn: Callable, calls: int, clock: Callable[[], float]) -> float:
    start = clock()
    for _ in range(calls):
        fn()
    return (clock() - start) / calls


def time_rounds(
    fns: Dict[str, Callable], rounds: int, min_sample_s: float, clock: Callable[[], float], warmup: int = 20
) -> Timings:
    """Per-call seconds of every callable, one sample per round, rounds interleaved (round i starts at callable
    i mod n); a sample repeats its callable until it lasts at least min_sample_s on `clock`."""
    names = list(fns)
    calls = {}
    for name in names:
        for _ in range(warmup):
            fns[name]()
        probe = _per_call(fns[name], 10, clock)
        calls[name] = max(10, math.ceil(min_sample_s / max(probe, 1e-7)))
    timings = Timings({name: [] for name in names})
    for i in range(rounds):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            timings.samples[name].append(_per_call(fns[name], calls[name], clock))
    return timings


def measure(call: str, rounds: int, min_sample_s: float, clock: str = "thread") -> Timings:
    fns = build(call)
    check_outputs_agree(fns, call)
    if call.startswith("eval"):
        with torch.no_grad():
            return time_rounds(fns, rounds, min_sample_s, CLOCKS[clock])
    return time_rounds(fns, rounds, min_sample_s, CLOCKS[clock])


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:.1f}"


def table(results: Dict[str, Timings], clock: str = "thread") -> str:
    short = {"FusedLoRALinear": "Fused", "PEFT patched": "patched", "backend op": "op alone"}
    columns = ["call"] + [short.get(name, name) for name in IMPLS] + ["fused/PEFT", "target"]
    rows = []
    for call, timings in results.items():
        ratio = timings.ratio("FusedLoRALinear", "PEFT")
        rows.append(
            [call]
            + [_us(timings.spread(name).median) for name in IMPLS]
            + [f"{ratio.median:.2f}" if ratio else "-", f"<= {TARGETS[call]:.1f}"]
        )
    return render(
        f"host time per call, us (median, {clock} clock; K = N = {K}, {TOKENS} tokens, r = {RANK}, "
        f"CPU, {torch.get_num_threads()} thread)",
        columns,
        rows,
        caption="Fused: FusedLoRALinear; patched: PEFT's layer after patch_model; op alone: the backend's "
        "op called directly; fused/PEFT: Fused over PEFT, paired per round, median",
    )


def extra_lines(results: Dict[str, Timings]) -> List[str]:
    lines = []
    for call in ("eval 1 adapter", "eval 2 active"):
        if call in results:
            t = results[call]
            over = t.spread("FusedLoRALinear").median - t.spread("nn.Linear").median
            lines.append(f"{call}: FusedLoRALinear - nn.Linear = {over * 1e6:.1f} us (stretch goal: <= 15 us)")
    for call, t in results.items():
        ratio = t.ratio("PEFT patched", "PEFT")
        if ratio:
            lines.append(f"{call}: PEFT patched / PEFT = {ratio.median:.2f} [p20 {ratio.p20:.2f}, p80 {ratio.p80:.2f}]")
    return lines


def run(
    calls=CALLS, rounds: int = 15, min_sample_s: float = 0.01, clock: str = "thread", echo=print
) -> Dict[str, Timings]:
    torch.set_num_threads(1)
    results = {}
    for call in calls:
        results[call] = measure(call, rounds, min_sample_s, clock)
    echo(table(results, clock))
    for line in extra_lines(results):
        echo(textwrap.fill(line, width=100, subsequent_indent="  "))
    try:
        echo(
            f"1-min load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (ratios are "
            "paired per round; absolute us move with the load)"
        )
    except OSError:
        pass
    return results


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="fused-lora bench --ops host", description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument(
        "--min-sample-seconds", type=float, default=0.01, help="each sample repeats a call until it lasts this long"
    )
    p.add_argument("--calls", default=",".join(CALLS), help=f"comma list of: {', '.join(CALLS)}")
    p.add_argument(
        "--clock",
        choices=list(CLOCKS),
        default="thread",
        help="thread: this thread's CPU time (default; steadier on a shared machine); wall: perf_counter",
    )
    args = p.parse_args(argv)
    calls = [c.strip() for c in args.calls.split(",") if c.strip()]
    for call in calls:
        if call not in CALLS:
            p.error(f"unknown call {call!r}; expected one of {', '.join(CALLS)}")
    run(calls, rounds=args.rounds, min_sample_s=args.min_sample_seconds, clock=args.clock)
    return 0
