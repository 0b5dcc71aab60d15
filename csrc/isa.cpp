// The active ISA level (see isa.h): CPU detection, FUSED_LORA_CPU_ISA at load, the setter and the dispatch trace.
#include "isa.h"

#include <array>
#include <cctype>
#include <cstdlib>

namespace fused_lora_cpu {

namespace {

constexpr const char* kNames[kIsaLevels] = {"baseline", "avx2", "avx512", "avx512_bf16"};
constexpr const char* kKernelNames[static_cast<int>(IsaKernel::kCount)] = {
    "convert", "dropout", "merge", "expand", "outer_acc", "shrink_bf16", "skinny"};

Isa detect_cpu_isa() {
#ifdef FUSED_LORA_X86_LEVELS
  // libgcc's checks include the OS's support for the wider register states (XCR0), not only CPUID.
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("x86-64-v3")) return Isa::kBaseline;
  if (!__builtin_cpu_supports("x86-64-v4")) return Isa::kAvx2;
  if (!__builtin_cpu_supports("avx512bf16")) return Isa::kAvx512;
  return Isa::kAvx512Bf16;
#else
  return Isa::kBaseline;
#endif
}

std::array<std::array<std::atomic<int64_t>, kIsaLevels>, static_cast<int>(IsaKernel::kCount)> g_counts{};

std::string g_env_message;

// FUSED_LORA_CPU_ISA, once, when the extension loads. Loading must not fail over it (the backend would then fall
// back to plain torch without saying why clearly), so a value that cannot be honoured is clamped or ignored, and
// the message is kept for fused_lora.ops.cpp_backend to raise as a warning.
int level_from_env() {
  const Isa cpu = cpu_isa();
  const char* raw = std::getenv("FUSED_LORA_CPU_ISA");
  if (raw == nullptr || *raw == '\0') return static_cast<int>(cpu);
  std::string name(raw);
  Isa wanted;
  if (!parse_isa(name, &wanted)) {
    g_env_message = "FUSED_LORA_CPU_ISA=" + name + " is not a level (expected auto, baseline, avx2, avx512 or "
                    "avx512_bf16); running " + kNames[static_cast<int>(cpu)] + ", the best this CPU supports";
    return static_cast<int>(cpu);
  }
  if (static_cast<int>(wanted) > static_cast<int>(cpu)) {
    g_env_message = "FUSED_LORA_CPU_ISA=" + name + " is beyond what this CPU (or this build) supports; running " +
                    kNames[static_cast<int>(cpu)] + " instead";
    return static_cast<int>(cpu);
  }
  return static_cast<int>(wanted);
}

}  // namespace

namespace isa_detail {
std::atomic<int> active{static_cast<int>(Isa::kBaseline)};
std::atomic<bool> tracing{false};

void record_slow(IsaKernel kernel, Isa level) {
  g_counts[static_cast<int>(kernel)][static_cast<int>(level)].fetch_add(1, std::memory_order_relaxed);
}

namespace {
// Runs when the shared library is loaded: before any op can be called.
const bool g_loaded = [] {
  active.store(level_from_env(), std::memory_order_relaxed);
  return true;
}();
}  // namespace
}  // namespace isa_detail

const char* isa_name(Isa level) { return kNames[static_cast<int>(level)]; }

const char* isa_kernel_name(IsaKernel kernel) { return kKernelNames[static_cast<int>(kernel)]; }

Isa cpu_isa() {
  static const Isa best = detect_cpu_isa();
  return best;
}

std::vector<Isa> isa_paths() {
  std::vector<Isa> out;
  for (int i = 0; i <= static_cast<int>(cpu_isa()); ++i) out.push_back(static_cast<Isa>(i));
  return out;
}

bool parse_isa(const std::string& name, Isa* out) {
  std::string n;
  for (char c : name) n.push_back(static_cast<char>(std::tolower(static_cast<unsigned char>(c))));
  n.erase(0, n.find_first_not_of(" \t"));
  n.erase(n.find_last_not_of(" \t") + 1);
  if (n == "auto") {
    *out = cpu_isa();
    return true;
  }
  for (int i = 0; i < kIsaLevels; ++i) {
    if (n == kNames[i]) {
      *out = static_cast<Isa>(i);
      return true;
    }
  }
  return false;
}

bool set_active_isa(Isa level) {
  if (static_cast<int>(level) > static_cast<int>(cpu_isa())) return false;
  isa_detail::active.store(static_cast<int>(level), std::memory_order_relaxed);
  return true;
}

const std::string& isa_env_message() { return g_env_message; }

void isa_trace(bool on) {
  if (on) {
    for (auto& kernel : g_counts) {
      for (auto& c : kernel) c.store(0, std::memory_order_relaxed);
    }
  }
  isa_detail::tracing.store(on, std::memory_order_relaxed);
}

std::vector<std::vector<int64_t>> isa_trace_counts() {
  std::vector<std::vector<int64_t>> out;
  for (const auto& kernel : g_counts) {
    std::vector<int64_t> row;
    for (const auto& c : kernel) row.push_back(c.load(std::memory_order_relaxed));
    out.push_back(row);
  }
  return out;
}

}  // namespace fused_lora_cpu
