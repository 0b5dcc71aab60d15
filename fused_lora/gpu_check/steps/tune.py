"""Step `tune`: time candidate launch configs per kernel and shape class; write the winners as this GPU's tuned
configs (kernels/tuned.py's writer, schema in its docstring) to <out>/tuned/<gpu-slug>.json.

Cases come from `tune_space()` of each kernel module (kernels/tuned.py: TuneCase), else from the interim spaces in
fused_lora/gpu_check/tune_spaces.py. For each case: every config is launched once and its output judged against
the float64 reference (a config further from it than 2 x the default's error + atol is "wrong" and never chosen);
the good ones are timed interleaved (fused_lora.gpu_check.timers); a candidate replaces the default only when its
paired median beats it by TUNE_MARGIN. All configs are compiled first by parallel warm-up processes. The file
starts from the committed kernels/tuned/<gpu-slug>.json, so kernels not re-tuned keep their entries; commit it by
copying it there. The step then reads the file back through tuned_config() in a fresh process.

Dry run: two cases at tiny float32 shapes on the CPU (interpreter), default plus one candidate, written under a
dry-run GPU name: the plumbing end to end, timings meaningless.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import subprocess
import time
from typing import Dict, List, Tuple

import torch

from fused_lora.gpu_check import timers, warm
from fused_lora.gpu_check.context import FAILED, OK, Context, result, write_json
from fused_lora.gpu_check.judge import judge
from fused_lora.gpu_check.tune_spaces import interim_cases

DRY_RUN_GPU = "dry-run cpu (not a GPU)"


def discover() -> Tuple[List, List[str], set]:
    """([TuneCase], problems, {(kernel, shape_class) of the quick selection}): the kernel modules' (and the CUDA
    dispatch's) own tune_space() first (a case whose description starts with "quick" joins the quick selection), the
    interim spaces for the rest."""
    import fused_lora.kernels as package
    from fused_lora.kernels.tuned import TuneCase

    cases, problems, quick = [], [], set()
    # the kernel modules, plus the CUDA dispatch: it lives in fused_lora.ops because it composes two backends, and
    # its decision (fused kernels or the cuBLAS composition, per shape class) is measured like a kernel config
    modules = [f"fused_lora.kernels.{info.name}" for info in pkgutil.iter_modules(package.__path__)]
    modules.append("fused_lora.ops.cuda_dispatch")
    for name in modules:
        try:
            module = importlib.import_module(name)
            space = getattr(module, "tune_space", None)
            if space is not None:
                for case in space():
                    if not isinstance(case, TuneCase):
                        raise TypeError(f"tune_space() gave {type(case).__name__}, not TuneCase")
                    cases.append(case)
        except Exception as exc:  # noqa: BLE001 - one broken module must not hide the others
            problems.append(f"{name}.tune_space: {type(exc).__name__}: {exc}")
    have = {(c.kernel, c.shape_class) for c in cases}
    interim, interim_problems = interim_cases()
    problems += interim_problems
    for case, in_quick in interim:
        if (case.kernel, case.shape_class) not in have:
            cases.append(case)
            if in_quick:
                quick.add((case.kernel, case.shape_class))
    quick |= {(c.kernel, c.shape_class) for c in cases if c.description.startswith("quick")}
    return cases, problems, quick


def _selection(ctx: Context, cases: List, quick: set) -> List[Tuple[object, List[dict]]]:
    """[(case, configs to try: the default first)] for this mode."""
    if ctx.dry_run:
        chosen, per_case = [c for c in cases if (c.kernel, c.shape_class) in quick][:2], 1
    elif ctx.quick:
        chosen, per_case = [c for c in cases if (c.kernel, c.shape_class) in quick], 3
    else:
        chosen, per_case = cases, 5
    out = []
    for case in chosen:
        configs = [dict(case.default)]
        for cand in case.candidates:
            merged = dict(case.default, **cand)
            if merged not in configs and len(configs) <= per_case:
                configs.append(merged)
        out.append((case, configs))
    return out


def tune_case(
    case, configs: List[dict], device: torch.device, tiny: bool, rounds: int, reps: int, max_seconds: float
) -> dict:
    run = case.make(device, tiny)
    reset = run.reset or (lambda: None)
    reset()
    default_out = run.launch(configs[0]).clone()
    reset()
    reference = run.reference if run.reference is not None else default_out.double()
    candidates = []
    for i, config in enumerate(configs):
        rec = {"config": config, "status": "ok"}
        try:
            out = run.launch(config).clone()
            reset()
            ok, text = judge(f"config {i}", out, reference, default_out, run.atol)
            if not ok:
                rec.update(status="wrong", detail=text)
        except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory: not a candidate
            rec.update(status="error", detail=f"{type(exc).__name__}: {str(exc).strip()[:200]}")
        candidates.append(rec)
    good = [i for i, rec in enumerate(candidates) if rec["status"] == "ok"]
    if 0 not in good:
        raise RuntimeError(f"the default config itself fails: {candidates[0].get('detail')}")
    fns = {str(i): (lambda c=configs[i]: run.launch(c)) for i in good}
    timings = timers.interleaved(
        fns, device, rounds=rounds, reps=reps, after_each={k: reset for k in fns}, max_seconds=max_seconds
    )
    for i in good:
        candidates[i]["median_us"] = round(timings.spread(str(i)).median * 1e6, 2)
    best, best_speedup = 0, 1.0
    for i in good[1:]:
        ratio = timings.ratio("0", str(i))  # default time / candidate time, paired per round
        if ratio is not None and ratio.median > best_speedup:
            best, best_speedup = i, ratio.median
    from fused_lora.kernels.tuned import TUNE_MARGIN

    chosen = best if best_speedup >= TUNE_MARGIN else 0
    return {
        "config": configs[chosen],
        "default": configs[0],
        "shape": run.shape,
        "median_us": candidates[chosen]["median_us"],
        "default_median_us": candidates[0]["median_us"],
        "speedup": round(best_speedup if chosen else 1.0, 4),
        "candidates": candidates,
        "triton": _triton_version(),
        "date": time.strftime("%Y-%m-%d"),
    }


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except Exception:  # noqa: BLE001
        return "unavailable"


def read_back(ctx: Context, gpu: str, directory: str, results: Dict[str, Dict[str, dict]]) -> List[str]:
    """Check in a fresh process that tuned_config() returns each written config, and the default elsewhere."""
    probe = {"results": {k: {c: e["config"] for c, e in v.items()} for k, v in results.items()}}
    code = (
        "import json, sys\n"
        "from fused_lora.gpu_check.bootstrap import ensure_checkout\n"
        "ensure_checkout()\n"
        "from fused_lora.kernels.tuned import tuned_config\n"
        "want = json.loads(sys.argv[1])['results']\n"
        "bad = []\n"
        "for kernel, classes in want.items():\n"
        "    for shape_class, config in classes.items():\n"
        "        default = {k: -1 for k in config}\n"
        "        got = tuned_config(kernel, shape_class, default)\n"
        "        if got != config: bad.append(f'{kernel}/{shape_class}: got {got}, wrote {config}')\n"
        "        if tuned_config(kernel, shape_class + ':absent', default) != default:\n"
        "            bad.append(f'{kernel}/{shape_class}:absent did not fall back to the default')\n"
        "print(json.dumps(bad))\n"
    )
    env = dict(os.environ, FUSED_LORA_TUNED_DIR=directory, FUSED_LORA_TUNED_GPU=gpu, FUSED_LORA_TUNED="1")
    done = subprocess.run(
        [ctx.python, "-c", code, json.dumps(probe)], capture_output=True, text=True, cwd=ctx.root, env=env, timeout=120
    )
    if done.returncode != 0:
        return [f"read-back process failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}"]
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(ctx: Context) -> dict:
    from fused_lora.kernels import tuned

    device = torch.device(ctx.device)
    tiny = ctx.dry_run
    gpu = DRY_RUN_GPU if ctx.dry_run else str(ctx.info.get("gpu") or torch.cuda.get_device_name(0))
    cases, problems, quick = discover()
    selection = _selection(ctx, cases, quick)
    if not selection:
        return result(FAILED, "no tune cases: " + ("; ".join(problems) or "none defined"))
    jobs = [[case.kernel, case.shape_class, -1] for case, _ in selection]
    for case, configs in selection:
        for config in configs[1:]:
            index = next(i for i, c in enumerate(case.candidates) if dict(case.default, **c) == config)
            jobs.append([case.kernel, case.shape_class, index])
    workers = 1 if ctx.dry_run else max(2, min(8, (ctx.info.get("cpus") or 8) // 2))
    warmed = warm.spawn(
        ctx, "tune", {"jobs": jobs, "tiny": tiny}, workers, timeout_s=min(0.4 * ctx.budget_s, ctx.remaining() - 20)
    )
    results: Dict[str, Dict[str, dict]] = {}
    records, errors, left_out = [], [], []
    for n, (case, configs) in enumerate(selection):
        left = len(selection) - n
        if ctx.remaining() < 12:
            left_out.append(f"{case.kernel}/{case.shape_class}")
            continue
        try:
            entry = tune_case(
                case,
                configs,
                device,
                tiny,
                rounds=2 if tiny else 5,
                reps=1 if tiny else 3,
                max_seconds=max(2.0, (ctx.remaining() - 10) / left / 2),
            )
            results.setdefault(case.kernel, {})[case.shape_class] = entry
            records.append(
                f"{case.kernel}/{case.shape_class}: x{entry['speedup']} "
                f"({entry['median_us']}us vs default {entry['default_median_us']}us)"
            )
            print(records[-1], flush=True)
        except Exception as exc:  # noqa: BLE001
            errors.append(f"{case.kernel}/{case.shape_class}: {type(exc).__name__}: {str(exc)[:200]}")
            print(errors[-1], flush=True)
    data = {
        "gpu": gpu,
        "cases": len(selection),
        "problems": problems,
        "errors": errors,
        "left_out": left_out,
        "warm": warmed,
    }
    if not results:
        return result(FAILED, "no case tuned: " + "; ".join(errors + problems)[:600], data=data)
    out_dir = os.path.dirname(ctx.path("tuned", "x"))
    meta = {
        "capability": ctx.info.get("capability"),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "command": f"scripts/gpu_check.sh ({ctx.mode})",
        "margin": tuned.TUNE_MARGIN,
    }
    path = tuned.write_tuned(gpu, results, out_dir=out_dir, meta=meta)
    mismatches = read_back(ctx, gpu, out_dir, results)
    data.update(path=os.path.relpath(path, ctx.out), read_back=mismatches or "ok")
    write_json(ctx.path("tune.json"), dict(data, results=results))
    detail = (
        f"{len(records)} of {len(selection)} cases tuned -> {os.path.relpath(path, ctx.out)} (commit as "
        f"kernels/tuned/{os.path.basename(path)}); "
        + "; ".join(records)
        + (f"; errors: {'; '.join(errors)}" if errors else "")
        + (f"; left out (budget): {', '.join(left_out)}" if left_out else "")
        + (f"; problems: {'; '.join(problems)}" if problems else "")
        + (f"; read-back: {'; '.join(mismatches)}" if mismatches else "; read back through tuned_config: ok")
    )
    if ctx.dry_run:
        detail = "dry run (CPU interpreter, tiny shapes: plumbing only) " + detail
    status = FAILED if (errors or mismatches) else OK
    return result(status, detail, artifacts=[os.path.relpath(path, ctx.out), "tune.json"], data=data)
