// Which ISA-specific code the C++ backend runs. Levels, lowest first, named after the code that exists for them:
//   baseline     portable x86-64 (SSE2) builds of the generic loops (or the only build off x86-64 / off GCC)
//   avx2         the generic loops compiled for x86-64-v3 (AVX2, FMA, F16C), plus the AVX2 skinny GEMM tiles
//                (skinny.h), which every higher level runs too
//   avx512       the generic loops compiled for x86-64-v4, plus the hand-written AVX-512 expand and dA/dB kernels
//   avx512_bf16  avx512 plus the AVX512-BF16 dot-product shrink (bf16 x and A, bf16 dy and B)
// The active level is the best one the CPU (and this build) supports, capped by FUSED_LORA_CPU_ISA (read once when
// the extension loads) or by set_active_isa (tests, benchmarks). Every ISA-specific kernel dispatches on
// active_isa() at each call, so a capped level really runs the lower level's code, on any CPU.
// AMX is not a level here: no code of ours uses it. oneDNN (under torch's bf16 GEMMs) picks AMX itself, capped by
// ONEDNN_MAX_CPU_ISA, which oneDNN reads once, at its first use in the process.
#pragma once

#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

// The avx2/avx512/avx512_bf16 code is built with GCC's per-function targets ("arch=x86-64-v3/v4" needs GCC 11);
// other compilers and other CPUs get the baseline level only.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && (__GNUC__ >= 11)
#define FUSED_LORA_X86_LEVELS 1
#endif

namespace fused_lora_cpu {

enum class Isa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };
constexpr int kIsaLevels = 4;

// Families of kernels whose code differs per level; the trace counts which level each dispatch picked.
enum class IsaKernel : int { kConvert = 0, kDropout, kMerge, kExpand, kOuterAcc, kShrinkBf16, kSkinny, kCount };

namespace isa_detail {
extern std::atomic<int> active;
extern std::atomic<bool> tracing;
void record_slow(IsaKernel kernel, Isa level);
}  // namespace isa_detail

inline Isa active_isa() { return static_cast<Isa>(isa_detail::active.load(std::memory_order_relaxed)); }

inline bool isa_at_least(Isa level) { return static_cast<int>(active_isa()) >= static_cast<int>(level); }

// Counts one dispatch of `kernel` to `level` while tracing is on (a relaxed load of a flag otherwise).
inline void isa_record(IsaKernel kernel, Isa level) {
  if (isa_detail::tracing.load(std::memory_order_relaxed)) isa_detail::record_slow(kernel, level);
}

const char* isa_name(Isa level);
const char* isa_kernel_name(IsaKernel kernel);
// The best level this CPU and this build support.
Isa cpu_isa();
// Levels this machine can run, lowest first.
std::vector<Isa> isa_paths();
// "auto" gives cpu_isa(); false for a name that is no level.
bool parse_isa(const std::string& name, Isa* out);
// Sets the active level; false (nothing changed) when the CPU or the build cannot run it.
bool set_active_isa(Isa level);
// What loading made of FUSED_LORA_CPU_ISA when it could not be honoured as given ("" otherwise).
const std::string& isa_env_message();

// Trace of the dispatches: on/off (turning it on clears the counts), and the counts [kernel][level].
void isa_trace(bool on);
std::vector<std::vector<int64_t>> isa_trace_counts();

}  // namespace fused_lora_cpu
