"""Triton kernels of fused_lora, installed as fused_lora.kernels (no autograd, no modules)."""
