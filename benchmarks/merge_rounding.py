"""What a second rounding costs when merging a LoRA adapter into low-precision weights.

PEFT's LoRA Linear.merge with adapters in the weight's dtype forms the delta B @ A * s and adds it to W: on GPU
the bf16 GEMM's output is rounded, the product with s is rounded, and the sum is rounded (three roundings); on
CPU it computes the delta in fp32, rounds it to bf16, and rounds the sum (two). fused_lora.merge_ adds the fp32
delta to the upcast W and rounds once. Each is compared with the float64-exact W + delta rounded once:

    python benchmarks/merge_rounding.py [--n 4096] [--r 16] [--dtype bfloat16]

Prints, per method: the share of elements equal to the correctly rounded value, the largest error in units in the
last place (ulp of the exact result), and the mean absolute error relative to the exact value.
"""

from __future__ import annotations

import argparse

import torch

import fused_lora


def _ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of `dtype` values at |x| (x float64), floored at the dtype's subnormal spacing."""
    mantissa_bits, subnormal_exp = {torch.bfloat16: (7, -133), torch.float16: (10, -24)}[dtype]
    _, exponent = torch.frexp(x)
    return torch.ldexp(torch.ones_like(x), (exponent - 1 - mantissa_bits).clamp_min(subnormal_exp))


def _peft_merged(w, a, b, r, s):
    """The real PEFT LoRA Linear's merge (this machine's CPU path) on a copy of w."""
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as PeftLinear

    base = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype)
    base.weight.data.copy_(w)
    layer = PeftLinear(base, "default", LoraConfig(r=r, lora_alpha=s * r), r=r, lora_alpha=s * r)
    layer.lora_A["default"].weight.data = a.clone()
    layer.lora_B["default"].weight.data = b.clone()
    layer.merge(safe_merge=True)
    return base.weight.data


def measure(n: int, r: int, dtype: torch.dtype, seed: int = 0) -> dict[str, dict[str, float]]:
    g = torch.Generator().manual_seed(seed)
    # typical magnitudes: trained weights ~ N(0, 0.02), a trained adapter's delta about 1-10% of them
    w = (torch.randn(n, n, generator=g) * 0.02).to(dtype)
    a = torch.randn(r, n, generator=g) / n**0.5
    b = torch.randn(n, r, generator=g) * 0.02
    s = 2.0

    a_low, b_low = a.to(dtype), b.to(dtype)
    exact = w.double() + s * (b_low.double() @ a_low.double())  # the adapters as stored, in W's dtype
    correctly_rounded = exact.to(dtype)
    peft_cpu = _peft_merged(w, a_low, b_low, r, s)
    gpu_like = w + (b_low @ a_low) * s  # PEFT's GPU order: GEMM output, scaling and sum each rounded
    ours = w.clone()
    fused_lora.merge_(ours, a_low, b_low, s)

    ulp = _ulp(exact, dtype)
    # ulp counts mean little where W and delta cancel; judged where |exact| >= 2^-8 (|W| + |delta|)
    not_cancelling = exact.abs() >= 2.0**-8 * (w.double().abs() + (exact - w.double()).abs())
    results = {}
    for name, merged in (
        ("PEFT merge, CPU (2 roundings)", peft_cpu),
        ("PEFT order on GPU (3)", gpu_like),
        ("fused_lora.merge_ (1)", ours),
    ):
        err = (merged.double() - exact).abs()
        results[name] = {
            "exactly_rounded_pct": 100.0 * (merged == correctly_rounded).double().mean().item(),
            "max_ulp": (err / ulp)[not_cancelling].max().item(),
            "mean_abs_err_rel_to_exact_rounding": (
                err.mean() / (correctly_rounded.double() - exact).abs().mean()
            ).item(),
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    print(
        f"merge of a rank-{args.r} adapter into a {args.n}x{args.n} {args.dtype} weight "
        f"(backend: {fused_lora.backend_info().splitlines()[0]})"
    )
    print(f"{'method':30s} {'exactly rounded':>16s} {'max err (ulp)*':>16s} {'mean |err| / one-rounding':>26s}")
    for name, row in measure(args.n, args.r, dtype).items():
        print(
            f"{name:30s} {row['exactly_rounded_pct']:15.2f}% {row['max_ulp']:16.2f} "
            f"{row['mean_abs_err_rel_to_exact_rounding']:26.2f}"
        )
    print("* where the exact value is not a cancellation: |W + delta| >= 2^-8 (|W| + |delta|)")


if __name__ == "__main__":
    main()
