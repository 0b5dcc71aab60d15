"""fused_lora: unmerged LoRA at the cost of merged weights.

    y = x W^T + b + sum_i s_i * (dropout_i(x) A_i^T) B_i^T

Triton kernels on CUDA, a C++ backend on CPU, plain torch as the reference; see backend_info().
"""

from fused_lora.functional import lora_linear, lora_linear_rows, merge_, unmerge_
from fused_lora.ops.backends import backend_info

__version__ = "0.1.0"

__all__ = ["lora_linear", "lora_linear_rows", "merge_", "unmerge_", "backend_info", "FusedLoRALinear", "replace_linear"]


def __getattr__(name):
    # the layer imports nn machinery; keep `import fused_lora` light for the functional API and the CLI
    if name in ("FusedLoRALinear", "replace_linear"):
        from fused_lora import layer

        return getattr(layer, name)
    raise AttributeError(f"module 'fused_lora' has no attribute {name!r}")
