// The per-task bodies of the skinny kernels (skinny.h), one build per code path: the AVX2 tiles (skinny_avx2.cpp)
// and the portable loops (skinny.cpp). skinny.cpp splits a call into tasks and picks the build.
#pragma once

#include "skinny.h"

namespace fused_lora_cpu {

// out rows [i0, i1) x columns [n0, n1) of skinny_nt.
void nt_block_avx2(const NtProduct& p, int64_t i0, int64_t i1, int64_t n0, int64_t n1);
void nt_block_generic(const NtProduct& p, int64_t i0, int64_t i1, int64_t n0, int64_t n1);

// skinny_nn tasks split K on multiples of this many columns (a multiple of every AVX2 panel width).
constexpr int64_t kNnColumnQuantum = 64;
// out rows [i0, i1) x columns [k0, k1) of skinny_nn.
void nn_block_avx2(const NnProduct& p, int64_t i0, int64_t i1, int64_t k0, int64_t k1);
void nn_block_generic(const NnProduct& p, int64_t i0, int64_t i1, int64_t k0, int64_t k1);

// acc[0, width) += sum_{n in [n0, n1)} g(i, n) * w[n, k0 ...] (rows of w streamed whole), and the last step of an
// output row: out[i, k0 ...] = round(base + colscale * acc).
void nn_row_accumulate_avx2(const StridedF32& g, const MatRef& w, int64_t i, int64_t n0, int64_t n1, int64_t k0,
                            int64_t width, float* acc);
void nn_row_finish_avx2(const NnProduct& p, int64_t i, int64_t k0, int64_t width, const float* acc);

void transpose_avx2(const MatRef& src, int64_t N, int64_t R, float* dst);
void transpose_generic(const MatRef& src, int64_t N, int64_t R, float* dst);

}  // namespace fused_lora_cpu
