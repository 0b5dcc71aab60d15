"""Ahead-of-time compilation of every Triton kernel config for sm_80 / sm_90, without a GPU.

    python benchmarks/codegen.py --arch 80 90 [--json PATH] [--jobs 2] [--only SUBSTRING] [--summary]
    python benchmarks/codegen.py --arch 80 90 --update-snapshot [--incremental]
    python benchmarks/codegen.py --arch 80 90 --check-snapshot [--sample 12] [--sample-seed S] [--strict] [--json PATH]

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
Every compile is a real one (Triton's cache is not read): a cached binary is looked up by a key that misses some
inputs (benchmarks/codegen_key.py), and the sample check below must see the compiler's output of today.

The snapshot (fused_lora/perf/codegen_gate.json; the cost model's occupancy data too) holds one row per (spec,
arch): the measured result under a content key that changes whenever the compiled code could (what it hashes:
benchmarks/codegen_key.py). The gate's requirements (tensor cores, TMA) are not in it: they are read from the
specs of today and applied to each row.
  --update-snapshot   compiles every (spec, arch) and rewrites the snapshot (--incremental: only those whose key it
                      lacks; rows no current spec has are dropped). Run it after changing a kernel or its configs.
  --check-snapshot    CI (tests/test_codegen.py). Computes every key (imports, no compile); compiles the (spec, arch)
                      pairs whose key the snapshot lacks (changed kernels: gated on a real compile); recompiles a
                      sample of the others that rotates with the git HEAD (else the UTC date) and fails if any
                      result differs from its row (a stale or hand-edited snapshot); gates every pair on its fresh or
                      recorded result. Missing rows only warn (they were compiled and gated); --strict fails on them.
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
from functools import lru_cache

os.environ.pop("TRITON_INTERPRET", None)  # the interpreter cannot compile; this tool must see the real compiler
if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # also when loaded by path (tests)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import codegen_key  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SNAPSHOT = os.path.join(ROOT, "fused_lora", "perf", "codegen_gate.json")
SNAPSHOT_SCHEMA = 1
REFRESH = "python benchmarks/codegen.py --arch 80 90 --update-snapshot"
# What a compile measures: stored in the snapshot, compared by the sample check. "error" is compared by presence.
MEASURED = (
    "registers",
    "spill_stores",
    "spill_loads",
    "stack_frame",
    "shared",
    "mma",
    "tma",
    "tma_loads",
    "ptx_missing",
    "gpu_name",
)

SHARED_LIMIT = {80: 164 * 1024, 90: 228 * 1024}
MATRIX_OPCODES = ("HMMA", "HGMMA", "IMMA", "IGMMA", "QGMMA", "OMMA", "UTCHMMA", "UTCQMMA", "UTCIMMA")
TMA_OPCODES = ("UTMALDG", "UTMASTG", "UTMAPF", "UTMAREDG", "UTMACCTL", "UBLKCP")
_INT_TYPES = ("i1", "i8", "i16", "i32", "i64", "u8", "u16", "u32", "u64")
_SASS_OPCODE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)")


def kernel_modules() -> list[str]:
    import fused_lora.kernels as package

    return sorted(f"fused_lora.kernels.{m.name}" for m in pkgutil.iter_modules(package.__path__))


_ARCHES: dict = {}  # (module, spec name) -> the only arches to compile it for (extra["arches"])
_SPEC_CACHE: dict = {}  # module -> its codegen_specs()


def discover() -> tuple[dict, list]:
    """{module: [spec names]} for modules with codegen_specs, and [(module, error)] for those that fail."""
    found, errors = {}, []
    for name in kernel_modules():
        try:
            module = importlib.import_module(name)
            if hasattr(module, "codegen_specs"):
                specs = _SPEC_CACHE[name] = module.codegen_specs()
                found[name] = [spec.name for spec in specs]
                _ARCHES.update({(name, spec.name): spec.extra["arches"] for spec in specs if "arches" in spec.extra})
        except Exception as exc:  # a broken module fails the gate, it does not hide the others
            errors.append((name, f"{type(exc).__name__}: {exc}"))
    return found, errors


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

    return {
        "registers": grab(r"Used (\d+) registers"),
        "stack_frame": grab(r"(\d+) bytes stack frame"),
        "spill_stores": grab(r"(\d+) bytes spill stores"),
        "spill_loads": grab(r"(\d+) bytes spill loads"),
    }


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


def _options(spec) -> dict:
    return {"num_warps": spec.num_warps, "num_stages": spec.num_stages}


def spec_fields(module_name: str, spec, arch: int) -> dict:
    """What the gate reads from the spec itself (not measured): taken from today's spec for every row."""
    return {
        "module": module_name,
        "name": spec.name,
        "arch": arch,
        "num_warps": spec.num_warps,
        "num_stages": spec.num_stages,
        "uses_tensor_cores": spec.uses_tensor_cores,
        "sm90_mma": spec.extra.get("sm90_mma", "HGMMA"),
        "requires_tma": bool(spec.extra.get("requires_tma")),
    }


def measure(spec, arch: int) -> dict:
    """Compile one spec for one arch and read registers, spills, shared memory, MMA/TMA opcodes and PTX patterns."""
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    from triton.compiler import ASTSource

    row = {}
    try:
        src = ASTSource(spec.fn, spec.signature, spec.constexprs, _attrs(spec))
        # Triton already runs ptxas with -v; printing its log saves a second ptxas run. Never a cache hit: the
        # result must be today's compiler output (see the module docstring).
        knobs.nvidia.dump_ptxas_log = True
        knobs.compilation.always_compile = True
        captured = io.StringIO()
        with contextlib.redirect_stdout(captured):
            kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=_options(spec))
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
                log = subprocess.run(
                    [
                        get_ptxas(arch).path,
                        "-v",
                        "--regAllocOptLevel=2",
                        f"--gpu-name={gpu_name}",
                        ptx,
                        "-o",
                        os.path.join(tmp, "v.cubin"),
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stderr
            sass = subprocess.run(
                [_tool("cuobjdump"), "-sass", cubin], capture_output=True, text=True, check=True
            ).stdout
        row.update(parse_ptxas(log))
        row["mma"] = count_matrix_ops(sass)
        row["tma"] = count_tma_ops(sass)
        row["tma_loads"] = row["tma"].get("UTMALDG", 0)
        row["ptx_missing"] = [
            name
            for name, pattern in spec.extra.get("ptx_patterns", {}).items()
            if not re.search(pattern, kernel.asm["ptx"])
        ]
        row["gpu_name"] = gpu_name
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {str(exc)[:2000]}"
    return row


def compile_one(module_name: str, index: int, arch: int) -> dict:
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
    spec = _spec(module_name, index)
    row = spec_fields(module_name, spec, arch)
    row["key"] = spec_key(spec, arch)["key"]  # of the source this process compiles (a file may change meanwhile)
    start = time.time()
    row.update(measure(spec, arch))
    row["seconds"] = round(time.time() - start, 2)
    row["failures"] = gate(row)
    return row


@lru_cache(maxsize=1)
def _tool_hash() -> str:
    """Everything that turns a compile into a row: a change here makes every recorded row suspect."""
    return codegen_key.tool_hash(
        [
            measure,
            _attrs,
            _options,
            parse_ptxas,
            count_matrix_ops,
            count_tma_ops,
            MATRIX_OPCODES,
            TMA_OPCODES,
            _SASS_OPCODE.pattern,
            _INT_TYPES,
            MEASURED,
            SNAPSHOT_SCHEMA,
        ],
        [_tool("cuobjdump")],
    )


def spec_key(spec, arch: int) -> dict:
    """{"key": content key, "kernel"/"toolchain"/"config": what changed when a key did} (codegen_key.py)."""
    return codegen_key.key_parts(spec, arch, _attrs(spec), _options(spec), _tool_hash())


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
    return (
        f"  sm_{r['arch']:<3} {r['name']:<58} w{r['num_warps']} s{r['num_stages']} "
        f"regs {str(r.get('registers', '?')):>3}  spill {spill:>7}  stack {str(r.get('stack_frame', '?')):>4}  "
        f"smem {str(r.get('shared', '?')):>6}  {mma:<22} tma {r.get('tma_loads', '?')}  {status}"
    )


def summary_table(rows: list[dict]) -> str:
    """One Markdown row per kernel and arch: how many configs, the worst registers/shared memory, and the MMA
    opcodes seen (the README's codegen summary)."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["name"].split("[")[0], r["arch"]), []).append(r)
    lines = [
        "| kernel | arch | configs | registers (max) | spill bytes | shared KiB (max) | matrix instructions | "
        "TMA loads (max) | gate |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (kernel, arch), mine in sorted(groups.items()):
        regs = max((r.get("registers") or 0) for r in mine)
        spills = sum((r.get("spill_stores") or 0) + (r.get("spill_loads") or 0) for r in mine)
        smem = max((r.get("shared") or 0) for r in mine) / 1024
        mma = sorted({k for r in mine for k, v in r.get("mma", {}).items() if v})
        status = "pass" if not any(r["failures"] for r in mine) else "FAIL"
        tma = max((r.get("tma_loads") or 0) for r in mine)
        lines.append(
            f"| {kernel} | sm_{arch} | {len(mine)} | {regs} | {spills} | {smem:.0f} | "
            f"{', '.join(mma) or '-'} | {tma} | {status} |"
        )
    return "\n".join(lines)


# ---- the snapshot ------------------------------------------------------------------------------------------------
def _shown(path: str) -> str:
    return os.path.relpath(path, ROOT) if path.startswith(ROOT + os.sep) else path


def load_snapshot(path: str = SNAPSHOT) -> dict:
    """{content key: row}; empty when there is none or its schema is not this tool's."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        data = json.load(f)
    if data.get("schema") != SNAPSHOT_SCHEMA:
        print(f"note: {_shown(path)} has schema {data.get('schema')}, this tool {SNAPSHOT_SCHEMA}: no row is used")
        return {}
    return {row["key"]: row for row in data["rows"]}


def snapshot_row(row: dict, parts: dict) -> dict:
    keep = {k: row[k] for k in ("module", "name", "arch", "num_warps", "num_stages")}
    keep.update({k: row[k] for k in MEASURED if k in row})
    if "error" in row:
        keep["error"] = row["error"]
    keep.update(parts)
    return keep


def write_snapshot(rows: list[dict], path: str = SNAPSHOT) -> None:
    """One row per line, sorted by module, name and arch: a kernel change shows as a change of its lines."""
    import triton

    rows = sorted(rows, key=lambda r: (r["module"], r["name"], r["arch"]))
    head = {
        "schema": SNAPSHOT_SCHEMA,
        "about": "codegen gate results per (spec, arch) under a content key; written "
        "by benchmarks/codegen.py --update-snapshot, read by its --check-snapshot and fused_lora.perf.occupancy",
        "refresh": REFRESH,
        "triton": triton.__version__,
    }
    lines = [f" {json.dumps(k)}: {json.dumps(v)}," for k, v in head.items()]
    body = ",\n".join("  " + json.dumps(r) for r in rows)
    with open(path, "w") as f:
        f.write("{\n" + "\n".join(lines) + '\n "rows": [\n' + body + "\n ]\n}\n")


def sample_seed() -> str:
    """The git HEAD (a rerun of one commit checks the same rows), else the UTC date."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        if head.returncode == 0 and head.stdout.strip():
            return "HEAD " + head.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return "date " + time.strftime("%Y-%m-%d", time.gmtime())


def choose_sample(keys: list[str], count: int, seed: str) -> set:
    return set(sorted(keys, key=lambda k: codegen_key.sha256(f"{seed}:{k}"))[:count])


def differences(fresh: dict, recorded: dict) -> list[str]:
    diffs = [
        f"{k} {recorded.get(k)} recorded, {fresh.get(k)} compiled" for k in MEASURED if fresh.get(k) != recorded.get(k)
    ]
    if ("error" in fresh) != ("error" in recorded):
        diffs.append(f"compile error {'recorded' if 'error' in recorded else 'now'}")
    return diffs


def why_missing(parts: dict, before: dict | None) -> str:
    if before is None:
        return "not in the snapshot"
    changed = [name for name in ("kernel", "config", "toolchain") if parts[name] != before.get(name)]
    return f"{'/'.join(changed) or 'key'} changed"


# ---- modes ------------------------------------------------------------------------------------------------------
def select(found: dict, arches: list[int], only: str = "") -> list[tuple]:
    """(module, spec index, arch) of every compile the arguments ask for."""
    return [
        (module, i, arch)
        for module, names in found.items()
        for i, name in enumerate(names)
        if only in name
        for arch in arches
        if arch in _ARCHES.get((module, name), [arch])
    ]


def compile_all(work: list[tuple], jobs: int, keys: dict | None = None) -> list[dict]:
    """Compile in `jobs` processes; with `keys` ({item: key parts} computed here), a row whose worker saw another
    source is an error, never recorded under this process's key."""
    rows = []
    ctx = multiprocessing.get_context("spawn")  # a fresh process: no state from an earlier compile or import
    with futures.ProcessPoolExecutor(max_workers=max(1, jobs), mp_context=ctx) as pool:
        pending = {pool.submit(compile_one, *item): item for item in work}
        for done in futures.as_completed(pending):
            module, i, arch = pending[done]
            try:
                row = done.result()
            except Exception as exc:  # a crashed worker (e.g. ptxas segfault took it down)
                row = dict(
                    spec_fields(module, _spec(module, i), arch),
                    error=f"worker failed: {exc}",
                    failures=["compile error"],
                )
            row["index"] = i
            if keys is not None and "key" in row and row["key"] != keys[(module, i, arch)]["key"]:
                row["error"] = "the kernel source changed while this run compiled it: rerun"
                row["failures"] = gate(row)
            rows.append(row)
            print(
                f"[{len(rows)}/{len(work)}] sm_{row['arch']} {row['name']} {row.get('seconds', '?')}s "
                f"{'ok' if not row['failures'] else 'FAIL ' + '; '.join(row['failures'])}",
                flush=True,
            )
            if "error" in row:
                print("    " + row["error"].replace("\n", "\n    ")[:1500], flush=True)
    return rows


def print_tables(rows: list[dict], found: dict) -> None:
    for module in found:
        mine = sorted((r for r in rows if r["module"] == module), key=lambda r: (r["name"], r["arch"]))
        if mine:
            print(f"\n{module}")
            print("\n".join(_fmt_row(r) for r in mine))


def current_keys(found: dict, work: list[tuple], snap: dict) -> dict:
    """{(module, index, arch): key parts} of every spec on the arches compiled now and those the snapshot has, not
    only of `work` (--only, --arch): a row is an orphan only if no current spec has its key."""
    everything = select(found, sorted({arch for _, _, arch in work} | {row["arch"] for row in snap.values()}))
    return {item: spec_key(_spec(item[0], item[1]), item[2]) for item in everything}


def update_snapshot(found: dict, work: list[tuple], jobs: int, incremental: bool, path: str) -> int:
    old = load_snapshot(path)
    keys = current_keys(found, work, old)
    todo = [item for item in work if not incremental or keys[item]["key"] not in old]
    print(
        f"compiling {len(todo)} of {len(work)} (spec, arch) pairs"
        f"{' (those missing from the snapshot)' if incremental else ''}",
        flush=True,
    )
    start = time.time()
    fresh = compile_all(todo, jobs, keys)
    # kept: the rows whose key is still current and that were not compiled now; rows of changed specs go
    current, recompiled = {p["key"] for p in keys.values()}, {keys[item]["key"] for item in todo}
    kept = [row for key, row in old.items() if key in current and key not in recompiled]
    moved = [r for r in fresh if "key" in r and r["key"] != keys[(r["module"], r["index"], r["arch"])]["key"]]
    rows = kept + [snapshot_row(r, keys[(r["module"], r["index"], r["arch"])]) for r in fresh if r not in moved]
    write_snapshot(rows, path)
    for r in moved:
        print(f"NOT RECORDED sm_{r['arch']} {r['name']}: its source changed during the run; rerun with --incremental")
    print_tables(fresh, found)
    failed = [r for r in fresh if r["failures"]]
    print(
        f"\n{len(fresh)} compiled in {time.time() - start:.0f}s, {len(kept)} rows kept; wrote {len(rows)} rows to "
        f"{_shown(path)}; {len(failed)} failed the gate: {'PASS' if not failed else 'FAIL'}"
    )
    return 0 if not failed and not moved else 1


def check_snapshot(
    found: dict, work: list[tuple], jobs: int, sample: int, seed: str | None, strict: bool, path: str
) -> tuple:
    """(exit status, result rows, report of the snapshot check)."""
    start = time.time()
    snap = load_snapshot(path)
    keys = current_keys(found, work, snap)
    by_name = {(r["module"], r["name"], r["arch"]): r for r in snap.values()}
    missing = [item for item in work if keys[item]["key"] not in snap]
    seed = seed or sample_seed()
    sampled_keys = choose_sample([keys[item]["key"] for item in work if keys[item]["key"] in snap], sample, seed)
    sampled = [item for item in work if keys[item]["key"] in sampled_keys]
    print(
        f"snapshot {_shown(path)}: {len(work)} (spec, arch) pairs, {len(work) - len(missing)} "
        f"recorded; keys in {time.time() - start:.1f}s. Compiling {len(missing)} missing and {len(sampled)} "
        f"sampled ({seed})",
        flush=True,
    )
    fresh = {(r["module"], r["index"], r["arch"]): r for r in compile_all(missing + sampled, jobs, keys)}

    rows, stale, why = [], [], {}
    for item in work:
        module, i, arch = item
        spec, parts = _spec(module, i), keys[item]
        if item in fresh:
            row = dict(fresh[item], source="compiled")
            if parts["key"] in snap:
                diffs = differences(row, snap[parts["key"]])
                row["source"] = "sampled"
                if diffs:
                    stale.append(f"sm_{arch} {spec.name}: " + "; ".join(diffs))
            else:
                row["why"] = why[item] = why_missing(parts, by_name.get((module, spec.name, arch)))
        else:
            recorded = snap[parts["key"]]
            row = dict(
                spec_fields(module, spec, arch),
                **{k: recorded[k] for k in MEASURED if k in recorded},
                source="snapshot",
            )
            if "error" in recorded:
                row["error"] = recorded["error"]
            row["failures"] = gate(row)
        row["key"] = parts["key"]
        rows.append(row)

    compiled = [r for r in rows if r["source"] != "snapshot"]
    if compiled:
        print_tables(compiled, found)
    failed = [r for r in rows if r["failures"]]
    orphans = len(set(snap) - {parts["key"] for parts in keys.values()})
    ok = not failed and not stale and not (strict and missing)
    print(
        f"\n{len(rows)} gated: {len(rows) - len(compiled)} from the snapshot, {len(sampled)} sampled and "
        f"recompiled, {len(missing)} compiled as missing; {time.time() - start:.0f}s"
    )
    for r in failed:
        print(
            f"GATE FAILED sm_{r['arch']} {r['name']}: {'; '.join(r['failures'])} "
            f"[{r.get('why', 'recorded result') if r['source'] != 'sampled' else 'sampled'}]"
        )
    for line in stale:
        print(f"STALE SNAPSHOT ROW {line}")
    if stale:
        print(
            "  a recorded result differs from today's compile of the same key: the snapshot was edited by hand or "
            "its key misses an input (benchmarks/codegen_key.py); rewrite it with a full --update-snapshot"
        )
    if missing:
        print(
            f"{'MISSING' if strict else 'warning'}: {len(missing)} (spec, arch) pairs are not in the snapshot "
            f"(compiled and gated above):"
        )
        for item in missing[:40]:
            print(f"  sm_{item[2]} {_spec(item[0], item[1]).name}: {why[item]}")
        if len(missing) > 40:
            print(f"  ... and {len(missing) - 40} more")
    if orphans:
        print(f"note: {orphans} snapshot rows belong to no current spec (changed or removed)")
    if stale:
        print(f"refresh the snapshot: {REFRESH}")
    elif missing or orphans:
        print(f"refresh the snapshot: {REFRESH} --incremental  (compiles only the missing pairs)")
    print("PASS" if ok else "FAIL")
    report = {
        "path": _shown(path),
        "seed": seed,
        "missing": [f"sm_{a} {_spec(m, i).name}" for m, i, a in missing],
        "sampled": [f"sm_{a} {_spec(m, i).name}" for m, i, a in sampled],
        "stale": stale,
        "orphans": orphans,
    }
    return (0 if ok else 1), rows, report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--json", help="write every result row to this file")
    parser.add_argument("--jobs", type=int, default=2, help="compile processes")
    parser.add_argument("--only", default="", help="compile only specs whose name contains this")
    parser.add_argument("--summary", action="store_true", help="end with a per-kernel Markdown summary table")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--update-snapshot", action="store_true", help=f"compile and rewrite {SNAPSHOT}")
    mode.add_argument(
        "--check-snapshot",
        action="store_true",
        help="gate every config from the snapshot, compiling what it lacks and a sample (CI)",
    )
    parser.add_argument(
        "--incremental",
        action="store_true",
        help="--update-snapshot: compile only the pairs whose key the snapshot lacks",
    )
    parser.add_argument("--sample", type=int, default=12, help="--check-snapshot: recorded rows to recompile")
    parser.add_argument(
        "--sample-seed",
        help="--check-snapshot: choose the sample with this seed (default: the git HEAD, else the UTC date)",
    )
    parser.add_argument("--strict", action="store_true", help="--check-snapshot: fail on missing rows too")
    parser.add_argument("--snapshot", help=f"the snapshot file (default {_shown(SNAPSHOT)})")
    args = parser.parse_args(argv)
    path = os.path.abspath(args.snapshot or SNAPSHOT)
    if args.incremental and not args.update_snapshot:
        parser.error("--incremental goes with --update-snapshot")

    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
    found, errors = discover()
    for name, err in errors:
        print(f"IMPORT FAILED {name}: {err}", flush=True)
    work = select(found, args.arch, args.only)
    if args.update_snapshot:
        if errors:
            print("not writing the snapshot: a module failed to import (its rows would be dropped)")
            return 1
        return update_snapshot(found, work, args.jobs, args.incremental, path)

    start = time.time()
    snapshot_report = None
    if args.check_snapshot:
        status, rows, snapshot_report = check_snapshot(
            found, work, args.jobs, args.sample, args.sample_seed, args.strict, path
        )
    else:
        print(
            f"compiling {len(work)} kernels ({sum(map(len, found.values()))} specs in {len(found)} modules, "
            f"arch {args.arch}, {args.jobs} processes)",
            flush=True,
        )
        rows = compile_all(work, args.jobs)
        print_tables(rows, found)
    rows.sort(key=lambda r: (r["module"], r["name"], r["arch"]))
    failed = [r for r in rows if r["failures"]]
    ok = not failed and not errors and (not args.check_snapshot or status == 0)
    if not args.check_snapshot:
        print(
            f"\n{len(rows)} compiled in {time.time() - start:.0f}s; {len(failed)} failed the gate"
            f"{'; ' + str(len(errors)) + ' modules failed to import' if errors else ''}: {'PASS' if ok else 'FAIL'}"
        )
    elif errors:
        print(f"{len(errors)} modules failed to import: FAIL")
    if args.summary:
        print("\n" + summary_table(rows))
    if args.json:
        report = {
            "ok": ok,
            "arches": args.arch,
            "modules": found,
            "import_errors": errors,
            "spec_arches": {name: arches for (_, name), arches in _ARCHES.items()},
            "results": rows,
        }
        if snapshot_report is not None:
            report["snapshot"] = snapshot_report
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
