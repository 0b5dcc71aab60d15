"""`fused-lora merge`: merge PEFT LoRA/AdaLoRA adapters into a safetensors checkpoint, verified, atomically."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from typing import Optional

from fused_lora.merge_cli import signals
from fused_lora.merge_cli.adapters import AdapterSpec
from fused_lora.merge_cli.errors import MergeError, OutputError, one_line
from fused_lora.merge_cli.workspace import Workspace, sweep

DESCRIPTION = """\
Merge one or more PEFT adapters into a Hugging Face safetensors checkpoint (single file or shards with
model.safetensors.index.json). Each merged weight gets W + sum_i w_i s_i B_i A_i in one rounding (float32
accumulation), every other tensor is copied bit-exactly, dtypes and the shard layout are kept, and
non-weight files (config, tokenizer, ...) are copied. The result is written beside --out and moved into
place only once it is complete and verified."""

EPILOG = """\
adapters:
  --adapter DIR[:WEIGHT]   repeatable; WEIGHT (default 1) multiplies that adapter's scaling (and its
                           lora_B.bias term). LoRA (rsLoRA, rank/alpha patterns, lora_bias, fan_in_fan_out,
                           embeddings, modules_to_save) and AdaLoRA adapters are understood.
  --initial-adapter DIR    for OLoRA/PiSSA/CorDA adapters, trained from a base that PEFT mutated to
                           W - s B0 A0: DIR holds the adapter as saved right after initialisation. It pairs
                           with the --adapter given just before it, and the two are merged against the
                           ORIGINAL --base as one rank-2r adapter ([A; A0], [B, -B0], same scaling).
                           Adapters already converted by PEFT (path_initial_model_for_weight_conversion)
                           need no --initial-adapter.
exit status:
  0       merged, verified and moved into place
  1       internal error (a bug; please report it with the line on stderr)
  2       bad input or failed verification: one line on stderr names the file and the key
  3       I/O error: disk full, read-only file system, permission denied, a failed rename; one line on
          stderr names the path and the cause (e.g. "No space left on device (ENOSPC)")
  128+N   stopped by signal N: 130 SIGINT (Ctrl-C), 143 SIGTERM (kill, timeout, docker stop, systemd),
          129 SIGHUP (ignored if it was ignored at start, as under nohup)
output and cleanup:
  The result is written into a hidden folder .OUT.tmp-PID-XXXXXXXX beside --out (with a lock file
  .OUT.tmp-PID-XXXXXXXX.lock held while the merge runs) and renamed to --out only when complete and
  verified. On any error or stop signal the hidden folder is removed and --out is left as it was (with
  --force, the old --out is replaced only by that final rename). Inputs are never modified. What a merge
  killed outright (kill -9, power loss) leaves behind is removed by the next merge to the same --out,
  which names what it removed; folders whose merge is still running are left alone.
"""


class _AdapterAction(argparse.Action):
    def __call__(self, parser, namespace, value, option_string=None):
        specs = getattr(namespace, "adapters", None) or []
        if option_string == "--initial-adapter":
            if not specs:
                raise argparse.ArgumentError(self, "must follow the --adapter it belongs to")
            if specs[-1].initial is not None:
                raise argparse.ArgumentError(self, f"{specs[-1].folder} already has an initial adapter")
            specs[-1].initial = value
        else:
            specs.append(_parse_adapter(value))
        namespace.adapters = specs


def _parse_adapter(value: str) -> AdapterSpec:
    folder, _sep, weight = value.rpartition(":")
    if _sep and folder and not os.path.isdir(value):
        try:
            return AdapterSpec(folder, float(weight))
        except ValueError:
            pass
    return AdapterSpec(value, 1.0)


class _ArgError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2, as for every other bad input
        raise _ArgError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fused-lora merge",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--base", required=True, metavar="DIR", help="Hugging Face checkpoint folder")
    parser.add_argument(
        "--adapter",
        action=_AdapterAction,
        required=True,
        metavar="DIR[:WEIGHT]",
        dest="adapters",
        help="PEFT adapter folder, optionally with a weight (repeatable)",
    )
    parser.add_argument(
        "--initial-adapter",
        action=_AdapterAction,
        metavar="DIR",
        dest="adapters",
        help="initial OLoRA/PiSSA adapter paired with the preceding --adapter (see below)",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (must not exist)")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    parser.add_argument(
        "--no-verify", dest="verify", action="store_false", help="skip the float64 probe check of every merged weight"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar, no summary")
    parser.add_argument("--verbose", action="store_true", help="print the error of every merged tensor")
    return parser


def _overlaps(a: str, b: str) -> bool:
    a, b = os.path.realpath(a), os.path.realpath(b)
    return a == b or a.startswith(b.rstrip(os.sep) + os.sep) or b.startswith(a.rstrip(os.sep) + os.sep)


def _check_output(out: str, inputs: list[str], force: bool, log) -> str:
    out = os.path.abspath(out)
    for folder in inputs:
        if _overlaps(out, folder):
            raise MergeError(out, None, f"--out overlaps the input {folder}; inputs are never modified")
    # before the existence check: a merge killed while replacing --out may have left it moved aside
    sweep(out, lambda path: any(_overlaps(path, folder) for folder in inputs), log)
    if os.path.lexists(out) and not force:
        raise MergeError(out, None, "already exists (pass --force to replace it)")
    if os.path.lexists(out) and not os.path.isdir(out):
        raise MergeError(out, None, "exists and is not a folder")
    parent = os.path.dirname(out)
    if not os.path.isdir(parent):
        raise MergeError(parent, None, "parent folder of --out does not exist")
    return out


class _RunState:
    """What main() needs to know to describe an interrupted or failed run truthfully."""

    workspace: Optional[Workspace] = None


def run(args, out: str, log, state: _RunState) -> int:
    from tqdm import tqdm

    from fused_lora import __version__
    from fused_lora.merge_cli.adapters import load_adapter
    from fused_lora.merge_cli.checkpoint import open_checkpoint
    from fused_lora.merge_cli.execute import write_checkpoint
    from fused_lora.merge_cli.plan import build_plan

    with signals.interruptible():
        adapters = [load_adapter(spec) for spec in args.adapters]
        checkpoint = open_checkpoint(args.base)
        plans = build_plan(adapters, checkpoint)
    if not plans:
        raise MergeError(args.adapters[0].folder, None, "the adapters hold no tensors to merge")
    records = [a.record() for a in adapters]

    def shard_metadata(shard, touched):
        meta = dict(shard.metadata)
        history = []
        if "fused_lora.merges" in meta:
            try:
                history = list(json.loads(meta["fused_lora.merges"]))
            except (ValueError, TypeError):
                history = []
        history.append({"tool": f"fused_lora {__version__}", "adapters": records, "merged_tensors": touched})
        meta["fused_lora.merges"] = json.dumps(history, separators=(",", ":"))
        meta["fused_lora.version"] = __version__
        return meta

    total = sum(len(s.entries) for s in checkpoint.shards)
    # Outside the interruptible regions a stop signal only waits: creating, renaming into place and
    # removing the temporary folder are never cut short by it.
    workspace = state.workspace = Workspace.create(out)
    try:
        with signals.interruptible():
            with tqdm(
                total=total,
                unit="tensor",
                desc="merge",
                disable=True if args.quiet else None,
                file=sys.stderr,
                leave=False,
            ) as progress:
                results = write_checkpoint(checkpoint, plans, workspace.folder, shard_metadata, args.verify, progress)
        workspace.install()
    except BaseException:
        workspace.discard()
        raise
    for leftover in workspace.leftovers:
        log(f"note: could not remove {leftover}; the next merge to {out} removes it")
    merged = sum(1 for p in plans.values() if p.lora_a)
    if checkpoint.skipped_files:
        log(
            f"note: not copied (weights in another format, they would be unmerged): "
            f"{', '.join(checkpoint.skipped_files)}"
        )
    log(f"merged {len(adapters)} adapter(s) into {merged} weight(s) of {args.base} -> {out}")
    if args.verbose:
        for r in results:
            log(f"  {r.name}: max relative error {r.rel_err:.3e} (bound {r.bound:.3e}, {r.dtype})")
    if results:
        worst = max(results, key=lambda r: r.rel_err / r.bound)
        log(
            f"verified {len(results)} tensor(s) on random probes: max relative error {worst.rel_err:.3e} "
            f"(bound {worst.bound:.3e}, {worst.dtype}) at {worst.name}"
        )
    elif not args.verify:
        log("verification skipped (--no-verify)")
    return 0


def _aftermath(out: str, state: _RunState) -> str:
    """How the output stands after a failure or a stop signal, for the one line on stderr."""
    ws = state.workspace
    if ws is not None and ws.installed:
        return f"{out} is complete and verified"
    if ws is not None and ws.leftovers:
        return f"could not remove {'; '.join(ws.leftovers)} (the next merge to {out} removes it)"
    return f"nothing written, {out} unchanged" if ws is None else f"temporary files removed, {out} unchanged"


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _ArgError as exc:
        print(f"fused-lora merge: error: {one_line(exc)} (see --help)", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    log = (lambda _msg: None) if args.quiet else (lambda msg: print(msg, flush=True))
    out = os.path.abspath(args.out)
    state = _RunState()
    with signals.handled():
        try:
            _check_output(
                args.out,
                [args.base] + [s.folder for s in args.adapters] + [s.initial for s in args.adapters if s.initial],
                args.force,
                log,
            )
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                code = run(args, out, log, state)
            for w in caught:
                log(f"note: {one_line(w.message)}")
            signum = signals.pending()  # one that came during the final rename, which it did not cut short
            if signum is not None:
                raise signals.Stopped(signum)
            return code
        except signals.Stopped as exc:
            print(f"fused-lora merge: stopped by {exc.name}; {_aftermath(out, state)}", file=sys.stderr)
            return exc.exit_status
        except MergeError as exc:
            after = "" if state.workspace is None else f"; {_aftermath(out, state)}"  # bad input: nothing began
            print(f"fused-lora merge: error: {one_line(exc)}{after}", file=sys.stderr)
            return 2
        except OutputError as exc:
            print(f"fused-lora merge: error: {one_line(exc)}; {_aftermath(out, state)}", file=sys.stderr)
            return 3
        except KeyboardInterrupt:  # SIGINT where no handler could be installed (main() off the main thread)
            print(f"fused-lora merge: interrupted; {_aftermath(out, state)}", file=sys.stderr)
            return 130
        except OSError as exc:  # an I/O failure no layer attributed; still the environment's, not the inputs'
            print(
                f"fused-lora merge: error: {exc.filename or ''}: {one_line(exc)}; {_aftermath(out, state)}",
                file=sys.stderr,
            )
            return 3
        except Exception as exc:  # noqa: BLE001 - a bug: still one line, but a different status
            print(f"fused-lora merge: internal error: {type(exc).__name__}: {one_line(exc)}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
