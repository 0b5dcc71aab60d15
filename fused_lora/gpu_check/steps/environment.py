"""Step `environment`: what the kit runs on. Fails when torch < 2.11 or triton < 3.6 (the oldest tested), or, in
a dry run, when triton's interpreter cannot work with this numpy (triton < 3.8 with numpy >= 2.4)."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys

from fused_lora.gpu_check.context import FAILED, OK, Context, result

MIN_TORCH = (2, 11)
MIN_TRITON = (3, 6)
CUDA_TOOL_DIRS = ("/usr/local/cuda/bin", "/usr/local/cuda/compute-sanitizer", "/opt/nvidia/bin")


def version_tuple(text: str) -> tuple:
    return tuple(int(p) for p in re.findall(r"\d+", text.split("+")[0])[:2])


def find_tool(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    for directory in CUDA_TOOL_DIRS:
        candidate = os.path.join(directory, name)
        if os.access(candidate, os.X_OK):
            return candidate
    return ""


def _first_line(cmd, timeout=20) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        lines = [ln.strip() for ln in (out.stdout + out.stderr).splitlines() if ln.strip()]
        return " / ".join(lines[-2:]) if lines else f"exit {out.returncode}"
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unavailable ({type(exc).__name__})"


def _version_of(module: str, load: bool = False):
    """The package's version; from its metadata unless `load` (transformers alone takes seconds to import)."""
    try:
        if load:
            return __import__(module).__version__
        from importlib.metadata import version

        return version(module)
    except Exception as exc:  # optional packages: say what happened
        return f"unavailable ({type(exc).__name__}: {exc})"[:120]


def run(ctx: Context) -> dict:
    import numpy
    import torch

    info = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "numpy": numpy.__version__,
        "triton": _version_of("triton", load=True),
        "transformers": _version_of("transformers"),
        "peft": _version_of("peft"),
        "kernels_dir": os.path.join(ctx.root, "kernels"),
    }
    problems = []
    if version_tuple(torch.__version__) < MIN_TORCH:
        problems.append(f"torch {torch.__version__} < {'.'.join(map(str, MIN_TORCH))}")
    if info["triton"].startswith("unavailable"):
        problems.append(f"triton {info['triton']}")
    elif version_tuple(info["triton"]) < MIN_TRITON:
        problems.append(f"triton {info['triton']} < {'.'.join(map(str, MIN_TRITON))}")
    elif ctx.dry_run and version_tuple(info["triton"]) < (3, 8) and version_tuple(numpy.__version__) >= (2, 4):
        problems.append(
            f"triton {info['triton']}'s interpreter fails with numpy {numpy.__version__}: "
            "install numpy<2.4 for a dry run"
        )

    cuda = bool(torch.cuda.is_available())
    info["cuda"] = cuda
    if cuda:
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name,
            capability=list(torch.cuda.get_device_capability(0)),
            sms=props.multi_processor_count,
            memory_gib=round(props.total_memory / 2**30, 1),
            device_count=torch.cuda.device_count(),
        )
    else:
        info["cuda_detail"] = (
            "torch is a CPU build"
            if torch.version.cuda is None
            else f"torch built for CUDA {torch.version.cuda} sees no device"
        )
    info["device"] = info["gpu"] if (cuda and not ctx.dry_run) else "cpu"
    smi = find_tool("nvidia-smi")
    if smi:
        info["nvidia_smi"] = _first_line(
            [smi, "--query-gpu=name,driver_version,clocks.max.sm,power.limit", "--format=csv,noheader"]
        )
    info["compute_sanitizer"] = find_tool("compute-sanitizer")
    if info["compute_sanitizer"]:
        info["compute_sanitizer_version"] = _first_line([info["compute_sanitizer"], "--version"])
    info["ncu"] = find_tool("ncu")
    # Triton builds its launcher with the host C compiler at first use
    info["cc"] = shutil.which(os.environ.get("CC", "")) or shutil.which("gcc") or shutil.which("cc") or ""
    if not info["cc"] and cuda and not ctx.dry_run:
        problems.append("no C compiler (gcc/cc): Triton cannot build its kernel launcher")
    try:
        from fused_lora import backend_info

        info["backends"] = backend_info().replace("\n", "; ")
    except Exception as exc:  # noqa: BLE001
        problems.append(f"fused_lora.backend_info failed: {type(exc).__name__}: {exc}")

    found = (
        f"python {info['python']}, torch {info['torch']} (CUDA {info['torch_cuda']}), triton {info['triton']}, "
        f"numpy {info['numpy']}; device {info['device']}"
        + (
            f" (sm_{''.join(map(str, info['capability']))}, {info['sms']} SMs, {info['memory_gib']} GiB)"
            if cuda
            else f" ({info.get('cuda_detail')})"
        )
        + f"; compute-sanitizer {'found' if info['compute_sanitizer'] else 'not found'}"
    )
    print(found)
    for key, value in info.items():
        print(f"  {key}: {value}")
    if problems:
        return result(FAILED, "; ".join(problems) + " | found " + found, data=info)
    return result(OK, found, data=info)
