"""Build of fused_lora: the Python package, kernels/ as fused_lora.kernels, and the C++ CPU backend (csrc/).

The C++ extension is optional at build time: where no compiler works, the package installs without it and
fused_lora.backend_info() says that the CPU backend fell back to plain torch.
"""

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cpp_extension():
    """The extension and its build command, or ([], {}) where torch's C++ tooling is unusable."""
    if os.environ.get("FUSED_LORA_NO_EXT") == "1":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception as exc:  # torch missing from the build environment
        print(f"fused_lora: building without the C++ backend ({exc})", file=sys.stderr)
        return [], {}

    class OptionalBuildExtension(BuildExtension):
        """Installs the pure-Python package when the compiler fails, instead of failing the install."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:
                print(f"fused_lora: C++ backend not built ({exc}); CPU ops fall back to plain torch", file=sys.stderr)

    sources = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))
    if not sources:
        return [], {}
    ext = CppExtension(
        name="fused_lora._C",
        sources=sources,
        extra_compile_args=["-O3", "-fopenmp"],
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _cpp_extension()

setup(
    packages=[
        "fused_lora",
        "fused_lora.kernels",
        "fused_lora.ops",
        "fused_lora.integrations",
        "fused_lora.bench",
        "fused_lora.perf",
        "fused_lora.merge_cli",
        "fused_lora.gpu_check",
        "fused_lora.gpu_check.steps",
    ],
    package_dir={"fused_lora.kernels": "kernels"},
    # the op contract; the codegen snapshot the cost model reads; tuned configs a GPU check left (kernels/tuned.py)
    package_data={
        "fused_lora.ops": ["CONTRACT.md"],
        "fused_lora.perf": ["codegen_gate.json"],
        "fused_lora.kernels": ["tuned/*.json"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
