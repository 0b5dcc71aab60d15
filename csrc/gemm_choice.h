// Which GEMM computes the big product of a call (x @ W^T forward, dy @ W backward), chosen per call from its dtype
// and its number of rows M, by a rule fixed once per process from what this machine and this torch build have:
//   vendor  torch's own GEMM (at::mm / addmm), the one nn.Linear and PEFT get: MKL for fp32, oneDNN (AVX-512 BF16,
//           AMX) for 16-bit where torch routes 16-bit GEMMs to oneDNN, its reference kernel elsewhere. fp32 outputs
//           and the rank term meet in fp32; 16-bit outputs are rounded by the GEMM, then bias + rank term are added in
//           fp32 and rounded again (CONTRACT.md).
//   mixed   MKL's {bf16,f16} x {bf16,f16} -> fp32 GEMM: the base accumulates into fp32 with the rank term, one rounding.
//   direct  the skinny kernels (skinny.h): the weight streamed once in its own dtype, fp32 accumulation, bias and
//           rank term added before the one rounding. For few rows, where the vendor GEMMs spend their time on
//           packing the weight (MKL on CPUs it does not tune for) or run a reference kernel (torch's 16-bit GEMM
//           without oneDNN).
// The rule (auto):
//   direct  when M <= the direct limit of the dtype and form and the avx2 level (or higher) is active. Limits:
//           16-bit without oneDNN: 64 rows; fp32 on non-Intel CPUs: 32 rows forward, 16 backward; otherwise 0 (the
//           vendor GEMM is the tuned one there). See gemm_choice.cpp for the measurements.
//   else    fp32: vendor. bf16: vendor where torch runs bf16 GEMMs on oneDNN, else mixed (when MKL has it).
//           fp16: mixed (when MKL has it; torch's fp16 GEMM is a reference kernel without AVX512-FP16), else vendor.
// Forcing, read at every call (tests and benchmarks switch them between calls):
//   FUSED_LORA_CPU_GEMM=auto|vendor|mixed|direct   one strategy for every call (mixed: 16-bit only; fp32 calls
//                                                  and CPUs without MKL's mixed GEMMs take vendor)
//   FUSED_LORA_CPU_DIRECT_MAX_ROWS=<n>             replaces every direct limit (0: never direct)
//   FUSED_LORA_CPU_BF16_EXACT=1                    bf16 never takes vendor (one rounding)
//   FUSED_LORA_CPU_FP16_FAST=1                     fp16 always takes vendor (torch's fp16 GEMM, two roundings)
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <vector>

namespace fused_lora_cpu {

enum class BaseGemm : int { kVendor = 0, kMixed = 1, kDirect = 2, kCount = 3 };

// The product's layout: x @ W^T (forward: the skinny kernel takes dot products along W's rows) or dy @ W (backward:
// it accumulates W's rows). The skinny kernels' crossover with the vendor GEMMs differs between the two.
enum class GemmForm : int { kNT = 0, kNN = 1 };

const char* base_gemm_name(BaseGemm g);

// The strategy for a GEMM of `form` with 16-bit/fp32 inputs of `dtype` and M rows (the environment, then the rule).
BaseGemm choose_base_gemm(at::ScalarType dtype, int64_t M, GemmForm form);

// What the rule decided on this machine and why, one line per dtype.
std::string gemm_rule_text();

// The direct limit of the rule for `dtype` and `form` (before FUSED_LORA_CPU_DIRECT_MAX_ROWS).
int64_t rule_direct_max_rows(at::ScalarType dtype, GemmForm form);

// Counts of the strategies the ops ran while tracing is on (turning it on clears them), indexed by BaseGemm.
void gemm_trace(bool on);
std::vector<int64_t> gemm_trace_counts();
void gemm_record(BaseGemm g);

}  // namespace fused_lora_cpu
