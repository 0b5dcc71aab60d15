"""What the sanitizer step runs under compute-sanitizer: `python -m fused_lora.gpu_check.sanitize_target CASE`.

    rows_bwd     lora_linear_rows forward + backward over 5 adapters with dropout, odd shapes, some rows without
                 an adapter: the per-row kernels, whose backward writes split partials of dA/dB and sums them
                 in a fixed order after a ticket (racecheck/memcheck territory)
    safe_merge   merge_(safe=True) of an adapter that would overflow one element: must raise, W bit-identical;
                 then a clean safe merge that must apply (both passes of the two-pass kernel)

Exit status 0 when the results are right; compute-sanitizer adds its own (--error-exitcode) for what it finds.
The same script runs on the CPU (interpreter) in a dry run.
"""

from __future__ import annotations

import os
import sys

import torch

import fused_lora
from fused_lora.gpu_check.bootstrap import ensure_checkout


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu")


def rows_bwd(device: torch.device) -> str:
    gen = torch.Generator().manual_seed(0)
    M, K, N, ranks = 45, 72, 40, [3, 8, 1, 16, 5]
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    R = sum(ranks)
    x = torch.randn(M, K, generator=gen).to(device, dtype).requires_grad_(True)
    w = (torch.randn(N, K, generator=gen) / K**0.5).to(device, dtype)
    a = (torch.randn(R, K, generator=gen) / K**0.5).to(device, dtype).requires_grad_(True)
    b = (torch.randn(N, R, generator=gen) / 4).to(device, dtype).requires_grad_(True)
    ids = torch.randint(-1, len(ranks), (M,), generator=gen).to(device)
    dy = torch.randn(M, N, generator=gen).to(device, dtype)
    torch.manual_seed(1)
    y = fused_lora.lora_linear_rows(
        x, w, None, a, b, [1.0, 0.5, 2.0, 1.5, 0.25], ranks, ids, dropout_p=[0.0, 0.2, 0.0, 0.1, 0.0], training=True
    )
    y.backward(dy)
    if device.type == "cuda":
        torch.cuda.synchronize()
    grads = [x.grad, a.grad, b.grad]
    if not all(bool(torch.isfinite(g).all()) for g in grads):
        raise AssertionError("non-finite gradients from the per-row backward")
    # an adapter with no rows gets exactly zero gradient: its rank slice of dA must never be written
    used = set(ids.tolist())
    lo = 0
    for i, r in enumerate(ranks):
        if i not in used and bool(a.grad[lo : lo + r].any()):
            raise AssertionError(f"adapter {i} has no rows but a non-zero dA")
        lo += r
    return f"rows_bwd ok (M={M}, {len(ranks)} adapters, {dtype})"


def safe_merge(device: torch.device) -> str:
    gen = torch.Generator().manual_seed(2)
    N, K, r = 70, 53, 5
    dtype = torch.float16
    w = torch.randn(N, K, generator=gen).to(device, dtype)
    a = (torch.randn(r, K, generator=gen) * 0.3).to(device, torch.float32)
    b = (torch.randn(N, r, generator=gen) * 0.3).to(device, torch.float32)
    w[7, 9] = torch.finfo(dtype).max
    a[:, 9] = 40.0
    b[7, :] = 40.0
    before = w.clone()
    try:
        fused_lora.merge_(w, a, b, 1.0, safe=True)
    except ValueError:
        pass
    else:
        raise AssertionError("a merge that overflows float16 was applied with safe=True")
    if not torch.equal(w.view(torch.int16), before.view(torch.int16)):
        raise AssertionError("the refused safe merge changed W")
    a[:, 9] = 0.01
    b[7, :] = 0.01
    w[7, 9] = 1.0
    fused_lora.merge_(w, a, b, 1.0, safe=True)
    if torch.equal(w, before):
        raise AssertionError("the clean safe merge did not apply")
    return "safe_merge ok (refused, W unchanged; clean merge applied)"


CASES = {"rows_bwd": rows_bwd, "safe_merge": safe_merge}


def main(argv=None) -> int:
    ensure_checkout()
    names = (argv if argv is not None else sys.argv[1:]) or list(CASES)
    device = _device()
    if device.type == "cpu":
        os.environ["FUSED_LORA_BACKEND"] = "triton"  # the kernels under the interpreter, not the C++ backend
    for name in names:
        print(CASES[name](device), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
