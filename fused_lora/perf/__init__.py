"""The performance MODEL of every execution path (a model, not a measurement): launches, bytes, FLOPs, occupancy
from the committed codegen snapshot, waves and launch gaps on a GPU's published ceilings.

Two users: the CUDA dispatch (fused_lora/ops/cuda_dispatch.py) where no GPU has measured a shape class, and the
reports (fused_lora/bench: `python -m fused_lora bench --model-only`, `info --explain`). It imports no modules,
layers or kernels' launch code beyond kernels/launch_plan.py's description of the launches.
"""
