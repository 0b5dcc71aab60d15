"""Step `graphs`: FusedLoRALinear's eval forward captured in a CUDA graph and replayed, equal to eager.

Scenarios on a bf16 layer with three adapters (float32 adapters over the bf16 base, as PEFT makes them):
one adapter active, all three active (stacked ranks), and per-sample adapter_ids (-1 = none). Each is warmed up
on a side stream (as torch.cuda.graph requires), captured once, then replayed twice with new inputs (and new ids)
copied into the captured buffers: the replay must read them from device memory, not have them baked in.
Bit-identical to the eager call is expected (same kernels, same order); a small difference is reported, a large
one fails. Dry run: the same scenarios run eagerly on the CPU (interpreter), twice, to prove the plumbing.
"""

from __future__ import annotations

import os
from typing import Callable, List, Tuple

import torch
from torch import nn

from fused_lora.gpu_check.context import FAILED, OK, SKIPPED, Context, result, write_json
from fused_lora.layer import FusedLoRALinear

SEQUENCES, TOKENS = 16, 1  # a decode batch: where graphs pay off


def make_layer(K: int, N: int, device, dtype) -> FusedLoRALinear:
    torch.manual_seed(0)
    base = nn.Linear(K, N, bias=True, device=device, dtype=dtype)
    layer = FusedLoRALinear.from_linear(base, "a", r=8, lora_alpha=16, init_lora_weights=False)
    layer.add_adapter("b", r=16, lora_alpha=16, init_lora_weights=False)
    layer.add_adapter("c", r=4, lora_alpha=8, lora_dropout=0.1, init_lora_weights=False)
    return layer.eval()


def scenarios(layer: FusedLoRALinear) -> List[Tuple[str, Callable, bool]]:
    """(name, configure the layer, uses adapter_ids)."""
    return [
        ("one adapter", lambda: layer.set_adapter("a"), False),
        ("three active", lambda: layer.set_adapter(["a", "b", "c"]), False),
        ("adapter_ids", lambda: layer.set_adapter("a"), True),
    ]


def _inputs(K, device, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(SEQUENCES, TOKENS, K, generator=gen).to(device, dtype)
    ids = torch.randint(-1, 3, (SEQUENCES,), generator=gen).to(device)
    return x, ids


def compare(replayed: torch.Tensor, eager: torch.Tensor) -> Tuple[bool, str]:
    if torch.equal(replayed, eager):
        return True, "bit-identical"
    diff = (replayed.float() - eager.float()).abs().max().item()
    scale = eager.float().abs().max().item() or 1.0
    ok = diff <= 1e-2 * scale
    return ok, f"{'close' if ok else 'DIFFERENT'}: max |replay - eager| {diff:.3e} (max |y| {scale:.3e})"


def capture_and_replay(layer, configure, with_ids, K, device, dtype) -> Tuple[bool, str]:
    configure()
    x_static, ids_static = _inputs(K, device, dtype, seed=1)

    def forward():
        return layer(x_static, adapter_ids=ids_static) if with_ids else layer(x_static)

    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                forward()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y_static = forward()
        notes = []
        for trial in (2, 3):
            x_new, ids_new = _inputs(K, device, dtype, seed=trial)
            x_static.copy_(x_new)
            ids_static.copy_(ids_new)
            graph.replay()
            torch.cuda.synchronize()
            eager = layer(x_new, adapter_ids=ids_new) if with_ids else layer(x_new)
            ok, text = compare(y_static, eager)
            notes.append(text)
            if not ok:
                return False, f"replay {trial - 1}: {text}"
    return True, "; ".join(sorted(set(notes)))


def eager_twice(layer, configure, with_ids, K, device, dtype) -> Tuple[bool, str]:
    configure()
    x, ids = _inputs(K, device, dtype, seed=1)
    with torch.no_grad():
        first = layer(x, adapter_ids=ids) if with_ids else layer(x)
        second = layer(x, adapter_ids=ids) if with_ids else layer(x)
    ok, text = compare(second, first)
    return ok and first.shape == (SEQUENCES, TOKENS, layer.out_features), f"eager twice {text}"


def run(ctx: Context) -> dict:
    if ctx.dry_run:
        os.environ["FUSED_LORA_BACKEND"] = "triton"
        device, dtype, K, N, fn = torch.device("cpu"), torch.float32, 40, 24, eager_twice
    else:
        device, dtype, K, N, fn = torch.device("cuda"), torch.bfloat16, 512, 384, capture_and_replay
    layer = make_layer(K, N, device, dtype)
    records, failed = [], 0
    for name, configure, with_ids in scenarios(layer):
        try:
            ok, text = fn(layer, configure, with_ids, K, device, dtype)
        except Exception as exc:  # noqa: BLE001 - a failed capture must not hide the other scenarios
            first_line = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            ok, text = False, f"{type(exc).__name__}: {first_line}"
            if device.type == "cuda":
                try:
                    torch.cuda.synchronize()
                except Exception:  # noqa: BLE001 - the context may be gone; later scenarios will say so
                    pass
        failed += not ok
        records.append({"scenario": name, "ok": ok, "detail": text})
        print(f"{name}: {'ok' if ok else 'FAILED'}: {text}", flush=True)
    write_json(ctx.path("graphs.json"), records)
    summary = "; ".join(f"{r['scenario']}: {'ok' if r['ok'] else 'FAILED'} ({r['detail']})" for r in records)
    if failed:
        return result(FAILED, summary, artifacts=["graphs.json"], data={"scenarios": records})
    if ctx.dry_run:
        return result(
            SKIPPED,
            "CUDA graphs need a GPU; the scenarios ran eagerly on the CPU (interpreter): " + summary,
            artifacts=["graphs.json"],
            data={"scenarios": records},
        )
    return result(OK, summary, artifacts=["graphs.json"], data={"scenarios": records})
