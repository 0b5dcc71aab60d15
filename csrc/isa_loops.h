// The generic loops of the backend (conversions, dropout bits, merge and expand tiles), compiled once per ISA level
// (isa_loops.cpp) and called through the table of the active level: the compiler vectorises each build for its
// level, and a capped level runs that level's build on any CPU.
#pragma once

#include "isa.h"

#include <cstdint>

namespace fused_lora_cpu {

constexpr int64_t kExpandRows = 4;
constexpr int64_t kExpandCols = 64;
// Philox quads generated per batch: structure-of-arrays of this length vectorises across quads.
constexpr int64_t kQuadBatch = 256;

struct LoopTable {
  Isa level;
  // one row of n elements (element stride `stride`) to fp32
  void (*bf16_to_f32)(const uint16_t* src, int64_t stride, int64_t n, float* dst);
  void (*f16_to_f32)(const uint16_t* src, int64_t stride, int64_t n, float* dst);
  void (*f32_to_f32)(const float* src, int64_t stride, int64_t n, float* dst);
  // n contiguous fp32 values rounded (to nearest even) into contiguous 16-bit values
  void (*f32_to_bf16)(const float* src, int64_t n, uint16_t* dst);
  void (*f32_to_f16)(const float* src, int64_t n, uint16_t* dst);
  void (*add_inplace)(float* dst, const float* src, int64_t n);
  // words[(q - q0) * 4 + lane] = Philox4x32-10(counter = (q lo, q hi, salt, 0), key)[lane], n <= kQuadBatch
  void (*philox_quads)(uint64_t q0, int64_t n, uint32_t key0, uint32_t key1, uint32_t salt, uint32_t* words);
  void (*multiply_inplace)(float* dst, const float* mult, int64_t n);
  void (*multiply_into)(float* dst, const float* a, const float* mult, int64_t n);
  // row += delta; whether every result stays below `threshold` in magnitude (NaN fails)
  bool (*add_check_finite)(float* row, const float* delta, int64_t n, float threshold);
  // acc[i][n] = bias[n0 + n] + sum_j t[i, j] * bt[j, n0 + n] for i < nrows (<= 4), n < ncols (<= 64)
  void (*expand_tile)(const float* t, int64_t ldt, int64_t nrows, int64_t R, const float* bt, int64_t N,
                      const float* bias, int64_t n0, int64_t ncols, float (*acc)[kExpandCols]);
};

// The table for the active level (the avx512 build serves avx512_bf16 too), the dispatch counted for `kernel`.
const LoopTable& loops(IsaKernel kernel);
// The table built for `level` (nullptr where this build has none), for the tests that the builds differ.
const LoopTable* loop_table_for(Isa level);

}  // namespace fused_lora_cpu
