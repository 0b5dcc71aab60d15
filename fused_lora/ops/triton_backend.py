"""The op contract on Triton: launchers live with their kernels in fused_lora.kernels."""
from fused_lora.kernels.dense import dropout_keep, lora_bwd, lora_fwd  # noqa: F401
from fused_lora.kernels.merge import lora_merge_  # noqa: F401
from fused_lora.kernels.rows import lora_rows_bwd, lora_rows_fwd  # noqa: F401
