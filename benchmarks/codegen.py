"""Ahead-of-time compilation of every Triton kernel config for sm_80 / sm_90, without a GPU.

    python benchmarks/codegen.py --arch 80 90 [--json PATH] [--jobs 2] [--only SUBSTRING] [--summary]

Every module of fused_lora.kernels that defines `codegen_specs()` is found with pkgutil. Each spec is compiled
with triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32)); Triton itself picks "sm_90a" for
arch 90 (wgmma needs the arch-specific target). From the result:
  registers / spills / stack   the same ptxas Triton used, rerun with -v on the ptx
  shared                       kernel.metadata.shared (bytes)
  matrix instructions          opcode counts in `cuobjdump -sass` (HMMA, HGMMA, IMMA, ...)
  TMA instructions             opcode counts in the same SASS (UTMALDG loads, UTMASTG stores, ...); the JSON row
                               has them as "tma" and the load count as "tma_loads"
Gate (exit status 1 if any fails): no spills, shared <= 164 KiB (sm_80) / 228 KiB (sm_90), and a spec with
uses_tensor_cores=True shows HMMA on sm_80 and HGMMA on sm_90. A spec whose tile cannot feed wgmma (an MMA with
fewer than 64 rows per warpgroup) says so with extra={"sm90_mma": "HMMA"}, and then needs HMMA on sm_90. A spec with
extra={"requires_tma": True} must show UTMALDG on sm_90 and later; extra={"arches": [90]} limits a spec to those
arches (TMA kernels have nothing to compile for sm_80). extra={"ptx_patterns": {name: regex}}: each regex must match
the PTX (e.g. the memory ordering of a split reduction, kernels/spec.py SPLIT_REDUCTION_PTX).

Arguments are compiled as Triton specializes them at run time for 16-byte aligned tensors and integers divisible
by 16 ("tt.divisibility" 16), the case that decides vectorization and pipelining; a spec lists integer
arguments that are not known to be multiples of 16 in extra["unaligned"], or gives the full attrs in extra["attrs"].
"""
from __future__ import annotations

import argparse
import concurrent.futures as futures
import contextlib
import importlib
import io
import json
import multiprocessing
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
import warnings

os.environ.pop("TRITON_INTERPRET", None)  # the interpreter cannot compile; this tool must see the real compiler

SHARED_LIMIT = {80: 164 * 1024, 90: 228 * 1024}
MATRIX_OPCODES = ("HMMA", "HGMMA", "IMMA", "IGMMA", "QGMMA", "OMMA", "UTCHMMA", "UTCQMMA", "UTCIMMA")
TMA_OPCODES = ("UTMALDG", "UTMASTG", "UTMAPF", "UTMAREDG", "UTMACCTL", "UBLKCP")
_INT_TYPES = ("i1", "i8", "i16", "i32", "i64", "u8", "u16", "u32", "u64")
_SASS_OPCODE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)")


def kernel_modules() -> list[str]:
    import fused_lora.kernels as package
    return sorted(f"fused_lora.kernels.{m.name}" for m in pkgutil.iter_modules(package.__path__))


_ARCHES: dict = {}  # (module, spec name) -> the only arches to compile it for (extra["arches"])


def discover() -> tuple[dict, list]:
    """{module: [spec names]} for modules with codegen_specs, and [(module, error)] for those that fail."""
    found, errors = {}, []
    for name in kernel_modules():
        try:
            module = importlib.import_module(name)
            if hasattr(module, "codegen_specs"):
                specs = module.codegen_specs()
                found[name] = [spec.name for spec in specs]
                _ARCHES.update({(name, spec.name): spec.extra["arches"] for spec in specs if "arches" in spec.extra})
        except Exception as exc:  # a broken module fails the gate, it does not hide the others
            errors.append((name, f"{type(exc).__name__}: {exc}"))
    return found, errors


_SPEC_CACHE: dict = {}


def _spec(module_name: str, index: int):
    if module_name not in _SPEC_CACHE:
        _SPEC_CACHE[module_name] = importlib.import_module(module_name).codegen_specs()
    return _SPEC_CACHE[module_name][index]


def _attrs(spec) -> dict:
    if "attrs" in spec.extra:
        return spec.extra["attrs"]
    unaligned = set(spec.extra.get("unaligned", ()))
    attrs = {}
    for i, name in enumerate(spec.fn.arg_names):
        ty = spec.signature.get(name, "constexpr")
        if ty.startswith("*") or (ty in _INT_TYPES and ty != "i1" and name not in unaligned):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return attrs


def parse_ptxas(log: str) -> dict:
    def grab(pattern):
        m = re.search(pattern, log)
        return int(m.group(1)) if m else None
    return {"registers": grab(r"Used (\d+) registers"),
            "stack_frame": grab(r"(\d+) bytes stack frame"),
            "spill_stores": grab(r"(\d+) bytes spill stores"),
            "spill_loads": grab(r"(\d+) bytes spill loads")}


def count_matrix_ops(sass: str, opcodes=MATRIX_OPCODES) -> dict:
    counts = {}
    for opcode in _SASS_OPCODE.findall(sass):
        base = opcode.split(".")[0]
        if base in opcodes:
            counts[base] = counts.get(base, 0) + 1
    return counts


def count_tma_ops(sass: str) -> dict:
    """TMA (bulk tensor copy) instructions by opcode: UTMALDG is a tile load through a descriptor."""
    return count_matrix_ops(sass, TMA_OPCODES)


def _tool(name: str) -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_one(module_name: str, index: int, arch: int) -> dict:
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    from triton.compiler import ASTSource

    spec = _spec(module_name, index)
    row = {"module": module_name, "name": spec.name, "arch": arch, "num_warps": spec.num_warps,
           "num_stages": spec.num_stages, "uses_tensor_cores": spec.uses_tensor_cores,
           "sm90_mma": spec.extra.get("sm90_mma", "HGMMA"), "requires_tma": bool(spec.extra.get("requires_tma"))}
    start = time.time()
    try:
        src = ASTSource(spec.fn, spec.signature, spec.constexprs, _attrs(spec))
        # Triton already runs ptxas with -v; printing its log saves a second ptxas run. A cache hit runs no
        # ptxas, so then the same ptxas is run here on the ptx.
        knobs.nvidia.dump_ptxas_log = True
        captured = io.StringIO()
        with contextlib.redirect_stdout(captured):
            kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                    options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
        log = captured.getvalue()
        row["shared"] = int(kernel.metadata.shared)
        gpu_name = sm_arch_from_capability(arch)
        with tempfile.TemporaryDirectory() as tmp:
            ptx, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
            with open(ptx, "w") as f:
                f.write(kernel.asm["ptx"])
            with open(cubin, "wb") as f:
                f.write(kernel.asm["cubin"])
            if "registers" not in log:  # same ptxas and flags as Triton's make_cubin
                log = subprocess.run([get_ptxas(arch).path, "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu_name}",
                                      ptx, "-o", os.path.join(tmp, "v.cubin")],
                                     capture_output=True, text=True, check=True).stderr
            sass = subprocess.run([_tool("cuobjdump"), "-sass", cubin], capture_output=True, text=True,
                                  check=True).stdout
        row.update(parse_ptxas(log))
        row["mma"] = count_matrix_ops(sass)
        row["tma"] = count_tma_ops(sass)
        row["tma_loads"] = row["tma"].get("UTMALDG", 0)
        row["ptx_missing"] = [name for name, pattern in spec.extra.get("ptx_patterns", {}).items()
                              if not re.search(pattern, kernel.asm["ptx"])]
        row["gpu_name"] = gpu_name
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {str(exc)[:2000]}"
    row["seconds"] = round(time.time() - start, 2)
    row["failures"] = gate(row)
    return row


def gate(row: dict) -> list[str]:
    if "error" in row:
        return ["compile error"]
    failures = []
    if (row.get("spill_stores") or 0) + (row.get("spill_loads") or 0) > 0:
        failures.append(f"spills {row['spill_stores']}/{row['spill_loads']} B")
    if row.get("registers") is None:
        failures.append("ptxas -v printed no register count")
    limit = SHARED_LIMIT.get(row["arch"])
    if limit is not None and row["shared"] > limit:
        failures.append(f"shared {row['shared']} B > {limit} B")
    if row["uses_tensor_cores"]:
        need = "HMMA" if row["arch"] < 90 else row["sm90_mma"]
        if row["mma"].get(need, 0) == 0:
            failures.append(f"no {need}")
    if row.get("requires_tma") and row["arch"] >= 90 and row.get("tma_loads", 0) == 0:
        failures.append("no UTMALDG (TMA loads)")
    failures.extend(f"ptx lacks {name}" for name in row.get("ptx_missing", ()))
    return failures


def _fmt_row(r: dict) -> str:
    mma = ",".join(f"{k}:{v}" for k, v in sorted(r.get("mma", {}).items())) or "-"
    spill = f"{r.get('spill_stores', '?')}/{r.get('spill_loads', '?')}"
    status = "ok" if not r["failures"] else "FAIL: " + "; ".join(r["failures"])
    return (f"  sm_{r['arch']:<3} {r['name']:<58} w{r['num_warps']} s{r['num_stages']} "
            f"regs {str(r.get('registers', '?')):>3}  spill {spill:>7}  stack {str(r.get('stack_frame', '?')):>4}  "
            f"smem {str(r.get('shared', '?')):>6}  {mma:<22} tma {r.get('tma_loads', '?')}  {status}")


def summary_table(rows: list[dict]) -> str:
    """One Markdown row per kernel and arch: how many configs, the worst registers/shared memory, and the MMA
    opcodes seen (the README's codegen summary)."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["name"].split("[")[0], r["arch"]), []).append(r)
    lines = ["| kernel | arch | configs | registers (max) | spill bytes | shared KiB (max) | matrix instructions | "
             "TMA loads (max) | gate |", "|---|---|---|---|---|---|---|---|---|"]
    for (kernel, arch), mine in sorted(groups.items()):
        regs = max((r.get("registers") or 0) for r in mine)
        spills = sum((r.get("spill_stores") or 0) + (r.get("spill_loads") or 0) for r in mine)
        smem = max((r.get("shared") or 0) for r in mine) / 1024
        mma = sorted({k for r in mine for k, v in r.get("mma", {}).items() if v})
        status = "pass" if not any(r["failures"] for r in mine) else "FAIL"
        tma = max((r.get("tma_loads") or 0) for r in mine)
        lines.append(f"| {kernel} | sm_{arch} | {len(mine)} | {regs} | {spills} | {smem:.0f} | "
                     f"{', '.join(mma) or '-'} | {tma} | {status} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--json", help="write every result row to this file")
    parser.add_argument("--jobs", type=int, default=2, help="compile processes")
    parser.add_argument("--only", default="", help="compile only specs whose name contains this")
    parser.add_argument("--summary", action="store_true", help="end with a per-kernel Markdown summary table")
    args = parser.parse_args(argv)

    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
    found, errors = discover()
    for name, err in errors:
        print(f"IMPORT FAILED {name}: {err}", flush=True)
    work = [(module, i, arch) for module, names in found.items() for i, name in enumerate(names)
            if args.only in name for arch in args.arch if arch in _ARCHES.get((module, name), [arch])]
    print(f"compiling {len(work)} kernels ({sum(map(len, found.values()))} specs in {len(found)} modules, "
          f"arch {args.arch}, {args.jobs} processes)", flush=True)

    rows = []
    start = time.time()
    ctx = multiprocessing.get_context("spawn")  # a fresh process: no state from an earlier compile or import
    with futures.ProcessPoolExecutor(max_workers=max(1, args.jobs), mp_context=ctx) as pool:
        pending = {pool.submit(compile_one, *item): item for item in work}
        for done in futures.as_completed(pending):
            try:
                row = done.result()
            except Exception as exc:  # a crashed worker (e.g. ptxas segfault took it down)
                module, i, arch = pending[done]
                row = {"module": module, "name": found[module][i], "arch": arch, "num_warps": 0, "num_stages": 0,
                       "error": f"worker failed: {exc}", "failures": ["compile error"]}
            rows.append(row)
            print(f"[{len(rows)}/{len(work)}] sm_{row['arch']} {row['name']} {row.get('seconds', '?')}s "
                  f"{'ok' if not row['failures'] else 'FAIL ' + '; '.join(row['failures'])}", flush=True)
            if "error" in row:
                print("    " + row["error"].replace("\n", "\n    ")[:1500], flush=True)

    rows.sort(key=lambda r: (r["module"], r["name"], r["arch"]))
    for module in found:
        mine = [r for r in rows if r["module"] == module]
        if mine:
            print(f"\n{module}")
            print("\n".join(_fmt_row(r) for r in mine))
    failed = [r for r in rows if r["failures"]]
    ok = not failed and not errors
    print(f"\n{len(rows)} compiled in {time.time() - start:.0f}s; {len(failed)} failed the gate"
          f"{'; ' + str(len(errors)) + ' modules failed to import' if errors else ''}: {'PASS' if ok else 'FAIL'}")
    if args.summary:
        print("\n" + summary_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ok": ok, "arches": args.arch, "modules": found, "import_errors": errors,
                       "spec_arches": {name: arches for (_, name), arches in _ARCHES.items()}, "results": rows},
                      f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
