"""Child process of one step: `python -m fused_lora.gpu_check.step NAME CONTEXT.json RESULT.json`.

Whatever happens inside the step (an exception, a CUDA error, Ctrl-C at the budget) ends as a result file with a
status and a detail line; the traceback goes to the step's log (stderr).
"""

from __future__ import annotations

import importlib
import resource
import sys
import time
import traceback

from fused_lora.gpu_check.bootstrap import ensure_checkout
from fused_lora.gpu_check.context import FAILED, Context, read_json, result, write_json

STEP_MODULES = {
    "environment": "environment",
    "tests": "tests",
    "offsets": "offsets",
    "sanitizer": "sanitizer",
    "graphs": "graphs",
    "compile": "torch_compile",
    "tune": "tune",
    "bench": "bench",
}


def run_step(name: str, ctx: Context) -> dict:
    try:
        module = importlib.import_module(f"fused_lora.gpu_check.steps.{STEP_MODULES[name]}")
        out = module.run(ctx)
        if not isinstance(out, dict) or "status" not in out:
            return result(FAILED, f"step returned {out!r}, not a result dict")
        return out
    except KeyboardInterrupt:
        return result(
            FAILED, f"stopped at its time budget ({ctx.budget_s:.0f}s) after {time.time() - ctx.started:.0f}s"
        )
    except BaseException as exc:  # noqa: BLE001 - the result must say what went wrong, whatever it was
        traceback.print_exc()
        return result(
            FAILED, f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:500]
        )


def main(argv=None) -> int:
    name, ctx_path, result_path = (argv if argv is not None else sys.argv[1:])[:3]
    ctx = Context.from_json(read_json(ctx_path))
    ctx.started = time.time()
    ensure_checkout(ctx.root)
    out = run_step(name, ctx)
    # CPU seconds of the step and everything it waited for (pytest shards, warm-up workers, the sanitizer)
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    out["cpu_s"] = round(sum(u.ru_utime + u.ru_stime for u in usage), 1)
    write_json(result_path, out)
    print(f"[{name}] {out['status']}: {out.get('detail', '')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
