"""Row-strided operands never leak their padding through a vendor GEMM, on every ISA level of the C++ backend.

oneDNN's AMX brgemm (torch's bf16 GEMM on Sapphire Rapids and later; fp16 and fp32-with-bf16-precision too) reads
each row of A up to a multiple of 32 columns and relies on B's zero padding to cancel the extra columns
(uxlfoundation/oneDNN#5717): with padding after a row (x = buf[:, :K]), NaN/Inf there survive `x * 0` and reach the
output. The backend therefore hands every vendor GEMM packed operands (csrc/base_gemm.cpp: gemm_operand).

Most machines cannot run AMX, so this module also replaces torch's CPU GEMMs (aten::mm, mm.out, addmm, addmm.out,
addmm_) with one that reads past the K tail the way the AMX kernel does, in a subprocess, and runs the strided
cases of every op through it: the C++ ops call those GEMMs through the dispatcher, so any operand handed over with
padding shows up as NaN. Where the CPU has AMX, the same cases also run against the real oneDNN, with its default
ISA and capped at AVX512_CORE_BF16.

Run as a script (`python tests/test_cpp_isa_gemm.py [--emulate-tail]`) it executes the cases and exits non-zero on
the first wrong output.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import warnings

import pytest
import torch

MODES = {  # name: (dtype, environment of the C++ backend); every base GEMM of csrc/gemm_choice.h
    "fp32": (torch.float32, {}),
    "fp32_vendor": (torch.float32, {"FUSED_LORA_CPU_GEMM": "vendor"}),
    "fp32_direct": (torch.float32, {"FUSED_LORA_CPU_GEMM": "direct"}),
    "fp16": (torch.float16, {}),
    "fp16_fast": (torch.float16, {"FUSED_LORA_CPU_FP16_FAST": "1"}),
    "bf16": (torch.bfloat16, {}),
    "bf16_vendor": (torch.bfloat16, {"FUSED_LORA_CPU_GEMM": "vendor"}),
    "bf16_direct": (torch.bfloat16, {"FUSED_LORA_CPU_GEMM": "direct"}),
    "bf16_exact": (torch.bfloat16, {"FUSED_LORA_CPU_BF16_EXACT": "1"}),
}
SWITCHES = (
    "FUSED_LORA_CPU_GEMM",
    "FUSED_LORA_CPU_DIRECT_MAX_ROWS",
    "FUSED_LORA_CPU_FP16_FAST",
    "FUSED_LORA_CPU_BF16_EXACT",
)
EMULATED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _tail_rows(a: torch.Tensor) -> tuple[torch.Tensor, int]:
    """a [M, K] as the AMX kernel reads it: each row extended to a multiple of 32 columns with whatever follows it
    in memory (zeros past the end of the storage, which the real kernel never reaches: it copies the last rows)."""
    M, K = a.shape
    Kp = -(-K // 32) * 32
    if Kp == K or M == 0 or a.stride(1) != 1:
        return a, K
    memory = torch.empty(0, dtype=a.dtype).set_(a.untyped_storage())
    ext = torch.zeros(M, Kp, dtype=a.dtype)
    for m in range(M):
        start = a.storage_offset() + m * a.stride(0)
        n = max(0, min(Kp, memory.numel() - start))
        ext[m, :n] = memory[start : start + n]
    return ext, K


def _product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in float64, A's K tail over-read for the dtypes oneDNN runs on AMX, B zero-padded along K."""
    if a.dtype in EMULATED_DTYPES:
        ext, K = _tail_rows(a)
        bz = torch.zeros(ext.shape[1], b.shape[1], dtype=torch.float64)
        bz[:K] = b.to(torch.float64)
        a64 = ext.to(torch.float64)
    else:
        a64, bz = a.to(torch.float64), b.to(torch.float64)
    return torch.bmm(a64[None], bz[None])[0]  # bmm: not one of the replaced ops


def _addmm64(c, a, b, beta, alpha):
    acc = alpha * _product(a, b)
    if beta != 0:  # beta == 0: C is not read (NaN in it must not show)
        acc = acc + beta * c.to(torch.float64)
    return acc


def install_tail_reading_gemm() -> torch.library.Library:
    """Replaces torch's CPU GEMMs by the over-reading one for this process (kept while the Library lives)."""

    def mm(a, b):
        return _product(a, b).to(a.dtype)

    def mm_out(a, b, *, out):
        return out.copy_(_product(a, b))

    def addmm(c, a, b, *, beta=1, alpha=1):
        return _addmm64(c, a, b, beta, alpha).to(c.dtype)

    def addmm_out(c, a, b, *, beta=1, alpha=1, out):
        return out.copy_(_addmm64(c, a, b, beta, alpha))

    def addmm_(c, a, b, *, beta=1, alpha=1):
        return c.copy_(_addmm64(c, a, b, beta, alpha))

    lib = torch.library.Library("aten", "IMPL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
        for name, fn in (
            ("mm", mm),
            ("mm.out", mm_out),
            ("addmm", addmm),
            ("addmm.out", addmm_out),
            ("addmm_", addmm_),
        ):
            lib.impl(name, fn, "CPU")
    return lib


def _padded(t: torch.Tensor) -> torch.Tensor:
    """The same values with NaN after every row (2-D) or between elements (1-D)."""
    if t.dim() == 1:
        wide = torch.full((2 * t.numel(),), float("nan"), dtype=t.dtype)
        wide[::2] = t
        return wide[::2]
    wide = torch.full((t.shape[0], t.shape[1] + 5), float("nan"), dtype=t.dtype)
    wide[:, : t.shape[1]] = t
    return wide[:, : t.shape[1]]


def _check(name: str, ours: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype) -> str | None:
    if not torch.isfinite(ours).all():
        return f"{name}: {int((~torch.isfinite(ours)).sum())} of {ours.numel()} values not finite"
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    err = (ours.to(torch.float64) - ref64).abs().max().item() if ours.numel() else 0.0
    bound = tol * (1.0 + ref64.abs().max().item())
    return None if err <= bound else f"{name}: max abs err {err:.3e} > {bound:.3e}"


def run_cases(levels: list[str] | None = None) -> list[str]:
    """Every op with all operands row-strided (NaN padding) and a strided bias, per ISA level and mode, against the
    float64 reference; returns the failures."""
    from fused_lora import reference as ref
    from fused_lora.ops import cpp_backend as cb

    gen = torch.Generator().manual_seed(7)
    K, N, ranks = 45, 29, [1, 7, 4]  # K, N and every rank off multiples of 32 (and of 16)
    rank_ptr = [0, 1, 8, 12]
    seed = torch.tensor([11], dtype=torch.int64)
    failures, count = [], 0
    # 37 rows: the few-rows path (csrc/lora_small.cpp); 70: the row-block loops
    for level, M, (mode, (dtype, env)) in itertools.product(levels or cb.isa_paths(), (37, 70), MODES.items()):
        row_ids = torch.randint(-1, len(ranks), (M,), generator=gen)
        for key in SWITCHES:
            os.environ.pop(key, None)
        os.environ.update(env)
        x = torch.randn(M, K, generator=gen).to(dtype)
        w = (torch.randn(N, K, generator=gen) / K**0.5).to(dtype)
        b = torch.randn(N, generator=gen).to(dtype)
        a = (torch.randn(sum(ranks), K, generator=gen) / K**0.5).to(dtype)
        bb = torch.randn(N, sum(ranks), generator=gen).to(dtype)
        dy = torch.randn(M, N, generator=gen).to(dtype)
        scale = torch.rand(sum(ranks), generator=gen) + 0.5
        d64 = [v.to(torch.float64) for v in (x, w, b, a, bb, dy)]
        strided = [_padded(v) for v in (x, w, b, a, bb, dy)]
        xs, ws, bs, as_, bbs, dys = strided
        x64, w64, b64, a64, bb64, dy64 = d64
        for dps in ([0.0, 0.0, 0.0], [0.0, 0.3, 0.0]):
            tag = f"{level}/{mode}/M={M}/dropout={dps}"
            with cb.use_isa(level):
                y, t = cb.lora_fwd(xs, ws, bs, as_, bbs, scale, rank_ptr, dps, seed)
                grads = cb.lora_bwd(dys, xs, ws, as_, bbs, scale, _padded(t), rank_ptr, dps, seed, True)
                y_r, t_r = cb.lora_rows_fwd(xs, ws, bs, as_, bbs, scale, rank_ptr, row_ids, dps, seed)
                grads_r = cb.lora_rows_bwd(
                    dys, xs, ws, as_, bbs, scale, _padded(t_r), rank_ptr, row_ids, dps, seed, True
                )
            want_y, _ = ref.lora_fwd(x64, w64, b64, a64, bb64, scale, rank_ptr, dps, seed)
            want_g = ref.lora_bwd(dy64, x64, w64, a64, bb64, scale, t.double(), rank_ptr, dps, seed, True)
            want_yr, _ = ref.lora_rows_fwd(x64, w64, b64, a64, bb64, scale, rank_ptr, row_ids, dps, seed)
            want_gr = ref.lora_rows_bwd(
                dy64, x64, w64, a64, bb64, scale, t_r.double(), rank_ptr, row_ids, dps, seed, True
            )
            outputs = [("y", y, want_y), ("rows y", y_r, want_yr)]
            outputs += [(n, g, r) for n, g, r in zip(("dx", "dA", "dB"), grads, want_g)]
            outputs += [(f"rows {n}", g, r) for n, g, r in zip(("dx", "dA", "dB"), grads_r, want_gr)]
            for name, ours, want in outputs:
                count += 1
                problem = _check(name, ours, want.to(torch.float64), dtype)
                if problem:
                    failures.append(f"{tag}: {problem}")
    print(f"{count} outputs checked, {len(failures)} wrong")
    return failures


def _run_script(extra_args: list[str], env_update: dict[str, str | None]) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    for key, value in env_update.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run(
        [sys.executable, os.path.abspath(__file__), *extra_args],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _cpp_backend_or_skip():
    try:
        from fused_lora.ops import cpp_backend  # noqa: F401
    except ImportError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"C++ backend not built: {exc}")


def test_strided_operands_through_a_gemm_that_reads_past_the_k_tail():
    _cpp_backend_or_skip()
    proc = _run_script(["--emulate-tail"], {})
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@pytest.mark.skipif(
    "amx_bf16" not in _cpu_flags(),
    reason="no AMX on this CPU: oneDNN's AMX bf16 kernels (whose K-tail reads go past a row's end) "
    "cannot run here; the emulated test above covers the layouts",
)
@pytest.mark.parametrize("onednn_isa", [None, "AVX512_CORE_BF16"], ids=["onednn_default_amx", "onednn_avx512_bf16"])
def test_strided_operands_with_real_onednn_isa(onednn_isa):
    """oneDNN reads ONEDNN_MAX_CPU_ISA once per process, so each cap gets its own subprocess."""
    _cpp_backend_or_skip()
    proc = _run_script([], {"ONEDNN_MAX_CPU_ISA": onednn_isa, "DNNL_MAX_CPU_ISA": onednn_isa})
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]


if __name__ == "__main__":
    keep = None
    if "--emulate-tail" in sys.argv:
        torch.set_num_threads(1)  # the replaced GEMMs run Python: keep every call on this thread
        keep = install_tail_reading_gemm()
    wrong = run_cases()
    for line in wrong[:40]:
        print(line)
    sys.exit(1 if wrong else 0)
