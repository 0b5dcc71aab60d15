"""CPU, bf16, 4096->4096, r = 16, 512 and 2048 tokens: fused_lora's forward+backward against a bound on PEFT's.

benchmarks/cpu_vs_peft.py cannot time PEFT's (or merged's) bf16 forward+backward at these sizes on a CPU whose torch
bf16 GEMM is a reference kernel (minutes per call). PEFT's forward alone is a lower bound of its forward+backward,
so fused forward+backward < PEFT forward alone shows issue 14's "forward+backward <= PEFT" there.

    python benchmarks/cpu_bf16_backward_bound.py
"""

import time

import torch

import fused_lora


def main() -> None:
    torch.manual_seed(0)
    K = N = 4096
    r = 16
    for M in (512, 2048):
        x = torch.randn(M, K).bfloat16().requires_grad_()
        w = (torch.randn(N, K) / K**0.5).bfloat16()
        a = (torch.randn(r, K) / K**0.5).bfloat16().requires_grad_()
        b = (torch.randn(N, r) / r**0.5).bfloat16().requires_grad_()
        dy = torch.randn(M, N).bfloat16()
        times = []
        for _ in range(4):
            start = time.perf_counter()
            fused_lora.lora_linear(x, w, None, a, b, 2.0).backward(dy)
            times.append(time.perf_counter() - start)
            x.grad = a.grad = b.grad = None
        fused = sorted(times)[1]
        # PEFT's forward, one call (each takes seconds): base Linear + lora_B(lora_A(x)) * scaling, all bf16
        base = torch.nn.Linear(K, N, bias=False).bfloat16()
        lora_a = torch.nn.Linear(K, r, bias=False).bfloat16()
        lora_b = torch.nn.Linear(r, N, bias=False).bfloat16()
        with torch.no_grad():
            start = time.perf_counter()
            base(x) + lora_b(lora_a(x)) * 2.0
            peft_forward = time.perf_counter() - start
        print(
            f"M={M}: fused forward+backward {fused * 1e3:.1f} ms (2nd best of 4), PEFT forward alone "
            f"{peft_forward * 1e3:.1f} ms: fused fwd+bwd / PEFT fwd = {fused / peft_forward:.2f} "
            f"(torch threads {torch.get_num_threads()})"
        )


if __name__ == "__main__":
    main()
