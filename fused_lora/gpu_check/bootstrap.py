"""Run this checkout as if it were installed, without installing it (the GPU image may lack setuptools/wheel).

`fused_lora` comes from the checkout because the kit puts its root first on PYTHONPATH; `fused_lora.kernels`
lives in kernels/ (the package_dir of the build), which no path entry provides, so a meta path finder maps that
name to <root>/kernels. The finder goes first on sys.meta_path and answers for every fused_lora.* module: found in
the checkout, or not found at all, never taken from an editable install of another checkout further down.
The C++ CPU backend is not built: the kit's CPU work runs on whatever fused_lora.ops.backends finds.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
from importlib.machinery import PathFinder

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KERNELS = "fused_lora.kernels"


class _KernelsFromCheckout(importlib.abc.MetaPathFinder):
    def __init__(self, kernels_dir: str):
        self.kernels_dir = kernels_dir

    def find_spec(self, fullname, path=None, target=None):
        if fullname == KERNELS:
            return importlib.util.spec_from_file_location(
                fullname, os.path.join(self.kernels_dir, "__init__.py"), submodule_search_locations=[self.kernels_dir]
            )
        if not fullname.startswith("fused_lora."):
            return None
        parent = sys.modules.get(fullname.rpartition(".")[0])
        spec = PathFinder.find_spec(fullname, list(getattr(parent, "__path__", None) or []))
        if spec is None:
            raise ModuleNotFoundError(f"No module named {fullname!r} in the checkout", name=fullname)
        return spec


def ensure_checkout(root: str = ROOT) -> str:
    """Make fused_lora and fused_lora.kernels resolve to `root`; returns the kernels directory in use."""
    kernels_dir = os.path.join(root, "kernels")
    if not os.path.isfile(os.path.join(kernels_dir, "__init__.py")):
        raise RuntimeError(f"{kernels_dir} is not the kernels package of a fused_lora checkout")
    if root not in sys.path:
        sys.path.insert(0, root)
    if not any(isinstance(f, _KernelsFromCheckout) for f in sys.meta_path):
        sys.meta_path.insert(0, _KernelsFromCheckout(kernels_dir))
    loaded = sys.modules.get(KERNELS)
    if loaded is not None and os.path.dirname(os.path.abspath(loaded.__file__)) != kernels_dir:
        raise RuntimeError(
            f"{KERNELS} was imported from {loaded.__file__} before the kit could point it at {kernels_dir}"
        )
    import fused_lora

    package_dir = os.path.dirname(os.path.abspath(fused_lora.__file__))
    if package_dir != os.path.join(root, "fused_lora"):
        raise RuntimeError(
            f"fused_lora resolves to {package_dir}, not this checkout ({root}): put {root} first on "
            "PYTHONPATH (scripts/gpu_check.sh does)"
        )
    return kernels_dir
