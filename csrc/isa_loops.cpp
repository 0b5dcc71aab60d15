// One build of the generic loops (isa_loops.inc) per ISA level, each in its own namespace, and the dispatch to the
// active level's build. Explicit per-level builds replace GCC's target_clones: an ifunc picks its clone once, when
// the library loads, and no run-time setting can choose another.
#include "isa_loops.h"

#include <c10/util/Half.h>

#include <cmath>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define FUSED_LORA_HAVE_FLOAT16 1
#endif

namespace fused_lora_cpu {

namespace isa_baseline {
constexpr Isa kLevel = Isa::kBaseline;
#include "isa_loops.inc"
}  // namespace isa_baseline

#ifdef FUSED_LORA_X86_LEVELS
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
namespace isa_avx2 {
constexpr Isa kLevel = Isa::kAvx2;
#include "isa_loops.inc"
}  // namespace isa_avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
namespace isa_avx512 {
constexpr Isa kLevel = Isa::kAvx512;
#include "isa_loops.inc"
}  // namespace isa_avx512
#pragma GCC pop_options
#endif

const LoopTable* loop_table_for(Isa level) {
  switch (level) {
    case Isa::kBaseline: return &isa_baseline::table;
#ifdef FUSED_LORA_X86_LEVELS
    case Isa::kAvx2: return &isa_avx2::table;
    case Isa::kAvx512: return &isa_avx512::table;
#endif
    default: return nullptr;
  }
}

const LoopTable& loops(IsaKernel kernel) {
  const LoopTable* table = &isa_baseline::table;
#ifdef FUSED_LORA_X86_LEVELS
  switch (active_isa()) {
    case Isa::kAvx512Bf16:
    case Isa::kAvx512: table = &isa_avx512::table; break;
    case Isa::kAvx2: table = &isa_avx2::table; break;
    default: break;
  }
#endif
  isa_record(kernel, table->level);
  return *table;
}

}  // namespace fused_lora_cpu
