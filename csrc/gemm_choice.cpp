// The per-call choice of the base GEMM (gemm_choice.h): the rule, fixed at the first call of the process from the
// CPU, the ISA level and torch's own routing of 16-bit GEMMs; the environment switches read at every call.
#include "gemm_choice.h"

#include <ATen/core/dispatch/Dispatcher.h>

#include <array>
#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <sstream>

#include "common.h"
#include "isa.h"

namespace fused_lora_cpu {

namespace {

// Rows up to which the skinny kernels beat the vendor GEMM, measured on AMD EPYC 7003 (Zen 3, AVX2, no AVX-512),
// torch 2.13 with MKL 2024.2, 4096 x 4096, r = 16, 1 and 2 threads, interleaved (benchmarks/cpu_vs_peft.py):
//   16-bit: torch's reference kernel loses to both at every M (3.5 ms for one row, 50 ms for 16); MKL's mixed GEMM
//           packs the whole weight per call (28 ms for one row) and catches up with the skinny kernels at about
//           64 rows forward and backward.
//   fp32:   MKL's sgemm packs the weight per call on this CPU (10 ms from 2 rows on, against 3 ms for a streamed
//           pass): the skinny kernels win up to about 32 rows forward, 16 backward.
constexpr int64_t kDirectMaxRows16 = 64;
constexpr int64_t kDirectMaxRowsF32Nt = 32;
constexpr int64_t kDirectMaxRowsF32Nn = 16;

struct Rule {
  bool bf16_onednn = false;  // torch runs bf16 GEMMs on oneDNN here
  bool fp16_onednn = false;
  bool intel = false;        // MKL's small-M kernels are tuned for this CPU
  bool mixed_bf16 = false, mixed_fp16 = false;
  int64_t direct_bf16 = 0, direct_fp16 = 0, direct_f32_nt = 0, direct_f32_nn = 0;
};

bool torch_flag(const char* op) {
  const auto handle = c10::Dispatcher::singleton().findSchema({op, ""});
  if (!handle.has_value()) return false;
  return handle->typed<bool()>().call();
}

bool cpu_is_intel() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  return __builtin_cpu_is("intel");
#else
  return false;
#endif
}

const Rule& rule() {
  static const Rule r = [] {
    Rule x;
    const bool onednn_on = at::globalContext().userEnabledMkldnn();
    x.bf16_onednn = onednn_on && torch_flag("mkldnn::_is_mkldnn_bf16_supported");
    x.fp16_onednn = onednn_on && torch_flag("mkldnn::_is_mkldnn_fp16_supported");
    x.intel = cpu_is_intel();
    x.mixed_bf16 = mixed_gemm_available(at::kBFloat16);
    x.mixed_fp16 = mixed_gemm_available(at::kHalf);
    x.direct_bf16 = x.bf16_onednn ? 0 : kDirectMaxRows16;
    x.direct_fp16 = x.fp16_onednn ? 0 : kDirectMaxRows16;
    x.direct_f32_nt = x.intel ? 0 : kDirectMaxRowsF32Nt;
    x.direct_f32_nn = x.intel ? 0 : kDirectMaxRowsF32Nn;
    return x;
  }();
  return r;
}

const char* env(const char* name) {
  const char* v = std::getenv(name);
  return (v == nullptr || *v == '\0') ? nullptr : v;
}

bool env_flag(const char* name) {
  const char* v = env(name);
  return v != nullptr && std::strcmp(v, "1") == 0;
}

// FUSED_LORA_CPU_GEMM; kCount for auto/unset.
BaseGemm forced_gemm() {
  const char* v = env("FUSED_LORA_CPU_GEMM");
  if (v == nullptr || std::strcmp(v, "auto") == 0) return BaseGemm::kCount;
  for (int g = 0; g < static_cast<int>(BaseGemm::kCount); ++g) {
    if (std::strcmp(v, base_gemm_name(static_cast<BaseGemm>(g))) == 0) return static_cast<BaseGemm>(g);
  }
  TORCH_CHECK_VALUE(false, "FUSED_LORA_CPU_GEMM=", v, " is not a strategy; expected auto, vendor, mixed or direct");
  return BaseGemm::kCount;
}

int64_t direct_limit(at::ScalarType dtype, GemmForm form) {
  if (const char* v = env("FUSED_LORA_CPU_DIRECT_MAX_ROWS")) {
    char* end = nullptr;
    errno = 0;
    const long long n = std::strtoll(v, &end, 10);
    TORCH_CHECK_VALUE(errno == 0 && end != v && *end == '\0' && n >= 0, "FUSED_LORA_CPU_DIRECT_MAX_ROWS=", v,
                      " is not a row count; expected an integer >= 0");
    return n;
  }
  return rule_direct_max_rows(dtype, form);
}

bool mixed_here(at::ScalarType dtype) {
  return dtype == at::kBFloat16 ? rule().mixed_bf16 : dtype == at::kHalf ? rule().mixed_fp16 : false;
}

std::atomic<bool> g_tracing{false};
std::array<std::atomic<int64_t>, static_cast<size_t>(BaseGemm::kCount)> g_counts{};

}  // namespace

const char* base_gemm_name(BaseGemm g) {
  switch (g) {
    case BaseGemm::kVendor: return "vendor";
    case BaseGemm::kMixed: return "mixed";
    case BaseGemm::kDirect: return "direct";
    default: return "?";
  }
}

int64_t rule_direct_max_rows(at::ScalarType dtype, GemmForm form) {
  if (!isa_at_least(Isa::kAvx2)) return 0;  // below avx2 the skinny kernels are portable loops
  switch (dtype) {
    case at::kBFloat16: return rule().direct_bf16;
    case at::kHalf: return rule().direct_fp16;
    case at::kFloat: return form == GemmForm::kNT ? rule().direct_f32_nt : rule().direct_f32_nn;
    default: return 0;
  }
}

BaseGemm choose_base_gemm(at::ScalarType dtype, int64_t M, GemmForm form) {
  const bool lowp = dtype == at::kBFloat16 || dtype == at::kHalf;
  const BaseGemm forced = forced_gemm();
  if (forced == BaseGemm::kDirect) return forced;
  if (forced == BaseGemm::kVendor) return forced;
  if (forced == BaseGemm::kMixed) return lowp && mixed_here(dtype) ? BaseGemm::kMixed : BaseGemm::kVendor;
  if (dtype == at::kHalf && env_flag("FUSED_LORA_CPU_FP16_FAST")) return BaseGemm::kVendor;
  if (M <= direct_limit(dtype, form)) return BaseGemm::kDirect;
  if (!lowp) return BaseGemm::kVendor;
  if (dtype == at::kBFloat16 && rule().bf16_onednn && !env_flag("FUSED_LORA_CPU_BF16_EXACT")) {
    return BaseGemm::kVendor;
  }
  return mixed_here(dtype) ? BaseGemm::kMixed : BaseGemm::kVendor;
}

std::string gemm_rule_text() {
  const Rule& r = rule();
  std::ostringstream s;
  const auto limit = [](at::ScalarType dtype) {
    const int64_t nt = rule_direct_max_rows(dtype, GemmForm::kNT), nn = rule_direct_max_rows(dtype, GemmForm::kNN);
    if (nt == 0 && nn == 0) return std::string();
    return "direct up to " + std::to_string(nt) + " rows forward, " + std::to_string(nn) + " backward, then ";
  };
  s << "float32: " << limit(at::kFloat) << "vendor (MKL sgemm; "
    << (r.intel ? "Intel CPU: MKL's small-M kernels are tuned here" : "non-Intel CPU: MKL packs the weight per call")
    << ")\n";
  s << "bfloat16: " << limit(at::kBFloat16)
    << (r.bf16_onednn ? "vendor (torch runs bf16 GEMMs on oneDNN here)"
                      : r.mixed_bf16 ? "mixed (torch has no oneDNN bf16 GEMM here: its reference kernel is slow)"
                                     : "vendor (no MKL mixed GEMM in this torch)")
    << "\n";
  s << "float16: " << limit(at::kHalf)
    << (r.mixed_fp16 ? "mixed (MKL f16f16f32)" : "vendor (no MKL mixed GEMM in this torch)")
    << (r.fp16_onednn ? "; torch runs fp16 GEMMs on oneDNN here" : "") << "\n";
  if (!isa_at_least(Isa::kAvx2)) s << "(ISA level below avx2: no direct kernels by the rule)\n";
  return s.str();
}

void gemm_trace(bool on) {
  if (on) {
    for (auto& c : g_counts) c.store(0, std::memory_order_relaxed);
  }
  g_tracing.store(on, std::memory_order_relaxed);
}

std::vector<int64_t> gemm_trace_counts() {
  std::vector<int64_t> out;
  for (const auto& c : g_counts) out.push_back(c.load(std::memory_order_relaxed));
  return out;
}

void gemm_record(BaseGemm g) {
  if (g_tracing.load(std::memory_order_relaxed)) {
    g_counts[static_cast<size_t>(g)].fetch_add(1, std::memory_order_relaxed);
  }
}

}  // namespace fused_lora_cpu
