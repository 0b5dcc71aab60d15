"""The project's one performance MODEL (a model, not a measurement): every execution path's launches, bytes, FLOPs,
occupancy from the committed codegen snapshot, waves, tails and launch gaps on a GPU's published ceilings.

    gpu_model.py   the rule that times a launch (cuBLAS's and ours alike), PDL overlap, and every assumption with its
                   range and evidence
    plans.py       which launches each implementation makes (ours come from kernels/launch_plan.py)
    cost_model.py  totals per implementation, host time, and `compare`, the CUDA dispatch's rule
    regimes.py     issue 13's regimes and targets
    occupancy.py   registers / shared memory per kernel config (codegen_gate.json)

Two users: the CUDA dispatch (fused_lora/ops/cuda_dispatch.py) where no GPU has measured a shape class, and the
reports (fused_lora/bench: `python -m fused_lora bench --model-only`, `info --explain`). It imports no modules,
layers or kernels' launch code beyond kernels/launch_plan.py's description of the launches, which counts and never
times.
"""
