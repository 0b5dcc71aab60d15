"""`python -m fused_lora {bench,merge,info}` (also installed as the `fused-lora` script)."""

from __future__ import annotations

import argparse
import sys
import textwrap

_DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}


def _info(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="fused-lora info",
        description="which backend runs on each device; --explain: the CUDA dispatch's choice for one shape, and why",
    )
    p.add_argument(
        "--explain",
        nargs=5,
        metavar=("M", "N", "K", "r", "dtype"),
        help="tokens, output features, input features, rank, dtype (fp32|fp16|bf16)",
    )
    p.add_argument("--adapters", type=int, default=1, help="adapters in a mixed batch (per-row selection)")
    p.add_argument("--dropout", action="store_true", help="an adapter has dropout > 0")
    p.add_argument("--fp32-adapters", action="store_true", help="fp32 adapters over a 16-bit model")
    args = p.parse_args(argv)
    import torch

    from fused_lora import backend_info

    lines = backend_info().splitlines()
    if not torch.cuda.is_available():
        # backend_info names what would serve CUDA tensors; say plainly that there are none here
        lines = [
            line
            if not line.startswith("cuda:")
            else f"cuda: no CUDA device (CUDA tensors would run {line.split(':', 1)[1].strip()}, per-shape "
            "dispatch between the Triton kernels and the cuBLAS composition)"
            for line in lines
        ]
    print("\n".join(textwrap.fill(line, width=100, subsequent_indent="    ") for line in lines))
    if args.explain:
        m, n, k, r, dtype = args.explain
        if dtype.lower() not in _DTYPES:
            p.error(f"dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
        try:
            M, N, K, R = (int(v) for v in (m, n, k, r))
        except ValueError:
            p.error(f"M N K r must be integers, got {m} {n} {k} {r}")
        from fused_lora.ops.cuda_dispatch import explain

        print()
        print(
            explain(M, N, K, R, getattr(torch, _DTYPES[dtype.lower()]), args.adapters, args.dropout, args.fp32_adapters)
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = (
        "usage: fused-lora {bench,merge,info} [options]\n"
        "  bench  measure the overhead of unmerged LoRA (merged / PEFT / addmm / fused) on this device\n"
        "  merge  merge PEFT adapters into a safetensors checkpoint, verified\n"
        "  info   which backend runs on each device; info --explain M N K r dtype: the dispatch's choice"
    )
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "bench":
        from fused_lora.bench.report import main as bench_main

        return bench_main(rest)
    if command == "merge":
        from fused_lora.merge_cli.cli import main as merge_main

        return merge_main(rest)
    if command == "info":
        return _info(rest)
    print(f"fused-lora: unknown command {command!r}\n{usage}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
