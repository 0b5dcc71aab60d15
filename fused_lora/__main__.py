"""`python -m fused_lora {bench,merge,info}` (also installed as the `fused-lora` script)."""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = ("usage: fused-lora {bench,merge,info} [options]\n"
             "  bench  measure the overhead of unmerged LoRA (merged / PEFT / addmm / fused) on this device\n"
             "  merge  merge PEFT adapters into a safetensors checkpoint, verified\n"
             "  info   which backend runs on each device")
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
        from fused_lora import backend_info
        print(backend_info())
        return 0
    print(f"fused-lora: unknown command {command!r}\n{usage}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
