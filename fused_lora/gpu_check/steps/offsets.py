"""Step `offsets`: tensors past 2^31 elements, where an int32 offset would wrap (bf16, ~4.3 GiB each).

    x_dx:   x [2^19 + 37, 4096]: forward (shrink + fused GEMM), backward (dS/dB, dA over all rows, dX written past
            2^31), through fused_lora.lora_linear and autograd
    rows:   the same x through lora_linear_rows (per-row adapters; rows gathered through the sorted order)
    w_big:  W [65544, 32768]: the decode kernel (M = 5) reading W past 2^31, then merge_ writing W in place
    y_big:  y [65539, 32784] written past 2^31 (K = 64)
Checked on the rows where the offset crosses 2^31 and at both ends (full-size float64 references would not fit);
dA and dB, which sum over every row, against float64 references accumulated in chunks. Each case is judged by the
project's rule (float64 reference, relative to PyTorch's own bf16 error). Dry run: the same code at tiny shapes,
float32, with the Triton kernels under the interpreter.
"""

from __future__ import annotations

import os
import time
from typing import Callable, List, Tuple

import torch
import torch.nn.functional as F

import fused_lora
from fused_lora.gpu_check.context import FAILED, OK, SKIPPED, Context, result, write_json
from fused_lora.gpu_check.judge import ATOL, judge

TWO31 = 2**31
SCALE = 2.0
CHUNK_ROWS = 65536


def check_rows(M: int, row_len: int) -> List[int]:
    """Both ends, the middle, and the rows around the one whose first element sits at offset 2^31."""
    cross = TWO31 // row_len
    rows = {0, 1, M // 2, M - 2, M - 1, cross - 1, cross, cross + 1}
    return sorted(r for r in rows if 0 <= r < M)


def _rand(shape, dtype, device, scale=1.0, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(shape, generator=gen, device=device, dtype=dtype) * scale


def case_x_dx(dims, dtype, device) -> List[Tuple[bool, str]]:
    M, K, N, r = dims["M"], dims["K"], dims["N"], dims["r"]
    x = _rand((M, K), dtype, device, seed=1).requires_grad_(True)
    w = _rand((N, K), dtype, device, K**-0.5, seed=2)
    a = _rand((r, K), dtype, device, K**-0.5, seed=3).requires_grad_(True)
    b = _rand((N, r), dtype, device, r**-0.5, seed=4).requires_grad_(True)
    dy = _rand((M, N), dtype, device, seed=5)
    y = fused_lora.lora_linear(x, w, None, a, b, SCALE, training=True)
    y.backward(dy)
    rows = torch.tensor(check_rows(M, K), device=device)
    out = []
    xr, dyr = x.detach()[rows], dy[rows]
    f64 = lambda t: t.detach().double()  # noqa: E731
    y64 = f64(xr) @ f64(w).T + SCALE * (f64(xr) @ f64(a).T) @ f64(b).T
    y_t = F.linear(xr, w) + SCALE * (xr @ a.detach().T) @ b.detach().T
    out.append(judge("y rows", y.detach()[rows], y64, y_t, ATOL[dtype]))
    dx64 = f64(dyr) @ f64(w) + SCALE * (f64(dyr) @ f64(b)) @ f64(a)
    dx_t = dyr @ w + SCALE * (dyr @ b.detach()) @ a.detach()
    out.append(judge("dX rows", x.grad[rows], dx64, dx_t, ATOL[dtype]))
    del y, dx_t, y_t
    # dA = s (dY B)^T x and dB = s dY^T (x A^T), summed over all M rows: float64 in chunks of rows
    ds64 = SCALE * (f64(dy) @ f64(b))  # [M, r]
    da64 = torch.zeros(r, K, dtype=torch.float64, device=device)
    t64 = torch.empty(M, r, dtype=torch.float64, device=device)
    for lo in range(0, M, CHUNK_ROWS):
        xc = x.detach()[lo : lo + CHUNK_ROWS].double()
        da64 += ds64[lo : lo + CHUNK_ROWS].T @ xc
        t64[lo : lo + CHUNK_ROWS] = xc @ f64(a).T
        del xc
    db64 = SCALE * f64(dy).T @ t64
    da_t = (SCALE * (dy @ b.detach())).T @ x.detach()
    db_t = SCALE * dy.T @ (x.detach() @ a.detach().T)
    out.append(judge("dA", a.grad, da64, da_t, ATOL[dtype]))
    out.append(judge("dB", b.grad, db64, db_t, ATOL[dtype]))
    return out


def case_rows(dims, dtype, device) -> List[Tuple[bool, str]]:
    M, K, N, r, n = dims["M"], dims["K"], dims["N"], dims["r"], 4
    x = _rand((M, K), dtype, device, seed=11)
    w = _rand((N, K), dtype, device, K**-0.5, seed=12)
    a = _rand((n * r, K), dtype, device, K**-0.5, seed=13)
    b = _rand((N, n * r), dtype, device, r**-0.5, seed=14)
    ids = torch.randint(-1, n, (M,), generator=torch.Generator(device=device).manual_seed(15), device=device)
    with torch.no_grad():
        y = fused_lora.lora_linear_rows(x, w, None, a, b, SCALE, [r] * n, ids)
    rows = torch.tensor(check_rows(M, K), device=device)
    xr, idr = x[rows].double(), ids[rows]
    y64 = xr @ w.double().T
    y_t = F.linear(x[rows], w)
    for i in range(n):
        sel = (idr == i).double()[:, None]
        lo, hi = i * r, (i + 1) * r
        y64 = y64 + sel * SCALE * (xr @ a[lo:hi].double().T) @ b[:, lo:hi].double().T
        y_t = y_t + (sel.to(dtype) * SCALE * (x[rows] @ a[lo:hi].T) @ b[:, lo:hi].T)
    return [judge("rows y", y[rows], y64, y_t, ATOL[dtype])]


def case_w_big(dims, dtype, device) -> List[Tuple[bool, str]]:
    M, K, N, r = dims["M"], dims["K"], dims["N"], dims["r"]
    w = _rand((N, K), dtype, device, K**-0.5, seed=21)
    x = _rand((M, K), dtype, device, seed=22)
    a = _rand((r, K), dtype, device, K**-0.5, seed=23)
    b = _rand((N, r), dtype, device, r**-0.5, seed=24)
    with torch.no_grad():
        y = fused_lora.lora_linear(x, w, None, a, b, SCALE)
    y64 = torch.empty(M, N, dtype=torch.float64, device=device)
    lora64 = SCALE * (x.double() @ a.double().T)
    for lo in range(0, N, 8192):
        y64[:, lo : lo + 8192] = x.double() @ w[lo : lo + 8192].double().T + lora64 @ b[lo : lo + 8192].double().T
    y_t = F.linear(x, w) + SCALE * (x @ a.T) @ b.T
    out = [judge("decode y (W past 2^31)", y, y64, y_t, ATOL[dtype])]
    rows = torch.tensor(check_rows(N, K), device=device)
    before = w[rows].clone()
    fused_lora.merge_(w, a, b, SCALE)
    exact = before.double() + SCALE * b[rows].double() @ a.double()
    peft_way = before + (SCALE * b[rows] @ a).to(dtype)  # the delta rounded first, then added
    out.append(judge("merged W rows", w[rows], exact, peft_way, 0.0))
    return out


def case_y_big(dims, dtype, device) -> List[Tuple[bool, str]]:
    M, K, N, r = dims["M"], dims["K"], dims["N"], dims["r"]
    x = _rand((M, K), dtype, device, seed=31)
    w = _rand((N, K), dtype, device, K**-0.5, seed=32)
    a = _rand((r, K), dtype, device, K**-0.5, seed=33)
    b = _rand((N, r), dtype, device, r**-0.5, seed=34)
    with torch.no_grad():
        y = fused_lora.lora_linear(x, w, None, a, b, SCALE)
    rows = torch.tensor(check_rows(M, N), device=device)
    xr = x[rows]
    y64 = xr.double() @ w.double().T + SCALE * (xr.double() @ a.double().T) @ b.double().T
    y_t = F.linear(xr, w) + SCALE * (xr @ a.T) @ b.T
    return [judge("y rows (y past 2^31)", y[rows], y64, y_t, ATOL[dtype])]


# name, function, dims on the GPU, dims for a dry run, in the quick selection
CASES: List[Tuple[str, Callable, dict, dict, bool]] = [
    ("x_dx", case_x_dx, dict(M=2**19 + 37, K=4096, N=64, r=16), dict(M=70, K=24, N=8, r=4), True),
    ("w_big", case_w_big, dict(M=5, K=32768, N=65544, r=16), dict(M=5, K=40, N=33, r=3), True),
    ("rows", case_rows, dict(M=2**19 + 37, K=4096, N=64, r=16), dict(M=50, K=24, N=8, r=2), False),
    ("y_big", case_y_big, dict(M=65539, K=64, N=32784, r=16), dict(M=70, K=16, N=40, r=4), False),
]


def elements(dims: dict) -> int:
    return max(dims["M"] * dims["K"], dims["M"] * dims["N"], dims["N"] * dims["K"])


def run(ctx: Context) -> dict:
    if ctx.dry_run:
        os.environ["FUSED_LORA_BACKEND"] = "triton"  # the kernels, under the interpreter
        device, dtype = torch.device("cpu"), torch.float32
    else:
        device, dtype = torch.device("cuda"), torch.bfloat16
    lines, failed, records = [], 0, []
    for name, fn, gpu_dims, tiny_dims, quick in CASES:
        if ctx.quick and not quick and not ctx.dry_run:
            records.append({"case": name, "status": "skipped", "detail": "full run only"})
            continue
        if ctx.remaining() < 15:
            records.append({"case": name, "status": "skipped", "detail": "budget spent"})
            continue
        dims = tiny_dims if ctx.dry_run else gpu_dims
        began = time.time()
        try:
            checks = fn(dims, dtype, device)
            ok = all(passed for passed, _ in checks)
            detail = "; ".join(text for _, text in checks)
        except Exception as exc:  # noqa: BLE001 - one case's failure must not hide the others
            ok, detail = False, f"{type(exc).__name__}: {str(exc).strip()[:300]}"
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        failed += not ok
        records.append(
            {
                "case": name,
                "dims": dims,
                "elements": elements(dims),
                "past_2_31": elements(dims) > TWO31,
                "status": "ok" if ok else "failed",
                "seconds": round(time.time() - began, 1),
                "detail": detail,
            }
        )
        lines.append(f"{name} {'ok' if ok else 'FAILED'}")
        print(f"{name} ({dims}): {'ok' if ok else 'FAILED'}: {detail}", flush=True)
    write_json(ctx.path("offsets.json"), records)
    ran = [r for r in records if r["status"] != "skipped"]
    if failed:
        bad = next(r for r in records if r["status"] == "failed")
        return result(
            FAILED,
            f"{failed} of {len(ran)} cases failed; {bad['case']}: {bad['detail'][:300]}",
            artifacts=["offsets.json"],
            data={"cases": records},
        )
    if ctx.dry_run:
        return result(
            SKIPPED,
            f"tensors past 2^31 elements need a GPU; the step's code ran at tiny shapes "
            f"(float32, interpreter): {', '.join(lines)}",
            artifacts=["offsets.json"],
            data={"cases": records},
        )
    if not ran:
        return result(FAILED, "no case ran within the budget", data={"cases": records})
    return result(
        OK,
        f"{len(ran)} cases past 2^31 elements: {', '.join(lines)}",
        artifacts=["offsets.json"],
        data={"cases": records},
    )
