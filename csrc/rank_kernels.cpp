// The two skinny products of the rank term, written here because a vendor GEMM spends more time on their
// shapes (inner or outer dimension = rank, 1..64) than on the arithmetic:
//   expand: out[row] = round(bias + t[row] @ B^T), or round(out[row] + bias + t[row] @ B^T) onto a base
//           already in the output -- rounded straight into the output dtype, one pass over the output
//   shrink: t[row] = x[row] @ A^T for bf16 x and bf16 A, with AVX512-BF16 dot products (exact products,
//           fp32 accumulation), at the avx512_bf16 level.
// Which code runs follows the active ISA level (isa.h): the hand-written AVX-512 kernels at avx512 and above, the
// level's build of the generic loops below it. Every kernel honours its operands' row strides and masks its tails:
// nothing past a row's last column is read.
#include "common.h"
#include "isa_loops.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>

namespace fused_lora_cpu {

namespace {

#ifdef FUSED_LORA_X86_LEVELS
// Loads 16 lanes of fp32 / bf16 / fp16 from `src` as fp32; FULL: all 16 lanes (a plain load, no mask to
// apply), else lanes outside `m` read as 0.
template <int OUT, bool FULL>  // OUT 0: fp32, 1: bf16, 2: fp16
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512 load16(const void* src, __mmask16 m) {
  if constexpr (OUT == 0) {
    return FULL ? _mm512_loadu_ps(src) : _mm512_maskz_loadu_ps(m, src);
  } else {
    const __m256i h = FULL ? _mm256_loadu_si256(static_cast<const __m256i*>(src)) : _mm256_maskz_loadu_epi16(m, src);
    if constexpr (OUT == 1) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    return _mm512_cvtph_ps(h);
  }
}

template <bool FULL>
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline void store_halves(void* dst, __m256i h, __mmask16 m) {
  if constexpr (FULL) {
    _mm256_storeu_si256(static_cast<__m256i*>(dst), h);
  } else {
    _mm256_mask_storeu_epi16(dst, m, h);
  }
}

// Stores 16 fp32 lanes into `dst` as fp32 / bf16 / fp16, rounding to nearest even; FULL: all 16 lanes (a plain
// store: masked stores cost more than plain ones on some CPUs), else `m` masks the lanes.
template <int OUT, bool FULL = false>  // OUT 0: fp32, 1: bf16, 2: fp16
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline void store16(void* dst, __m512 v, __mmask16 m) {
  if constexpr (OUT == 0) {
    if constexpr (FULL) {
      _mm512_storeu_ps(dst, v);
    } else {
      _mm512_mask_storeu_ps(dst, m, v);
    }
  } else if constexpr (OUT == 1) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
    store_halves<FULL>(dst, _mm512_cvtepi32_epi16(r), m);
  } else {
    store_halves<FULL>(dst, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), m);
  }
}

// RM output rows (<= 4) of out = bias + t @ bt (ACC: out += bias + t @ bt, the small term summed first so that
// its fp32 accuracy does not depend on the base's magnitude), 64 columns per step with the accumulators in
// registers. The output row is read right before it is written: one pass, the line already in L1 for the store.
template <int RM, int OUT, bool ACC>
__attribute__((target("avx512f,avx512bw,avx512vl")))
void expand_rows_avx512(const float* t, int64_t ldt, int64_t R, const float* bt, int64_t N, const float* bias,
                        char* const* out_rows) {
  constexpr int64_t item = OUT == 0 ? 4 : 2;
  char* row[RM];  // local copies: stores through char* could otherwise alias out_rows and force reloads
  for (int i = 0; i < RM; ++i) row[i] = out_rows[i];
  int64_t n0 = 0;
  for (; n0 + 64 <= N; n0 += 64) {
    __m512 acc[RM][4];
    for (int v = 0; v < 4; ++v) {
      const __m512 b0 = bias ? _mm512_loadu_ps(bias + n0 + 16 * v) : _mm512_setzero_ps();
      for (int i = 0; i < RM; ++i) acc[i][v] = b0;
    }
    for (int64_t j = 0; j < R; ++j) {
      __m512 bv[4];
      for (int v = 0; v < 4; ++v) bv[v] = _mm512_loadu_ps(bt + j * N + n0 + 16 * v);
      for (int i = 0; i < RM; ++i) {
        const __m512 ti = _mm512_set1_ps(t[i * ldt + j]);
        for (int v = 0; v < 4; ++v) acc[i][v] = _mm512_fmadd_ps(ti, bv[v], acc[i][v]);
      }
    }
    for (int i = 0; i < RM; ++i) {
      for (int v = 0; v < 4; ++v) {
        char* dst = row[i] + (n0 + 16 * v) * item;
        if constexpr (ACC) acc[i][v] = _mm512_add_ps(acc[i][v], load16<OUT, true>(dst, 0xffff));
        store16<OUT, true>(dst, acc[i][v], 0xffff);
      }
    }
  }
  for (; n0 < N; n0 += 16) {
    const int64_t left = N - n0;
    const __mmask16 m = left >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << left) - 1);
    __m512 acc[RM];
    const __m512 b0 = bias ? _mm512_maskz_loadu_ps(m, bias + n0) : _mm512_setzero_ps();
    for (int i = 0; i < RM; ++i) acc[i] = b0;
    for (int64_t j = 0; j < R; ++j) {
      const __m512 bv = _mm512_maskz_loadu_ps(m, bt + j * N + n0);
      for (int i = 0; i < RM; ++i) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(t[i * ldt + j]), bv, acc[i]);
    }
    for (int i = 0; i < RM; ++i) {
      char* dst = row[i] + n0 * item;
      if constexpr (ACC) acc[i] = _mm512_add_ps(acc[i], load16<OUT, false>(dst, m));
      store16<OUT>(dst, acc[i], m);
    }
  }
}

// acc[j, w] += sum_i coef[i, j] * src[i, w] for NJ ranks j, 16 columns w per step, the NJ accumulators
// in registers across all rows i. SRC: 0 fp32, 1 bf16.
template <int NJ, int SRC>
__attribute__((target("avx512f,avx512bw,avx512vl")))
void outer_acc_avx512(const void* src, int64_t ld_src, int64_t nrows, const float* coef, int64_t ldc, int64_t W,
                      float* acc) {
  for (int64_t w0 = 0; w0 < W; w0 += 16) {
    const int64_t left = W - w0;
    const __mmask16 m = left >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << left) - 1);
    __m512 a[NJ];
    for (int j = 0; j < NJ; ++j) a[j] = _mm512_maskz_loadu_ps(m, acc + j * W + w0);
    for (int64_t i = 0; i < nrows; ++i) {
      __m512 sv;
      if constexpr (SRC == 0) {
        sv = _mm512_maskz_loadu_ps(m, static_cast<const float*>(src) + i * ld_src + w0);
      } else {
        const __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(src) + i * ld_src + w0);
        sv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
      }
      const float* c = coef + i * ldc;
      for (int j = 0; j < NJ; ++j) a[j] = _mm512_fmadd_ps(_mm512_set1_ps(c[j]), sv, a[j]);
    }
    for (int j = 0; j < NJ; ++j) _mm512_mask_storeu_ps(acc + j * W + w0, m, a[j]);
  }
}

template <int SRC>
void outer_acc_any(const void* src, int64_t ld_src, int64_t nrows, const float* coef, int64_t ldc, int64_t R,
                   int64_t W, float* acc) {
  int64_t j = 0;
  for (; j + 16 <= R; j += 16) outer_acc_avx512<16, SRC>(src, ld_src, nrows, coef + j, ldc, W, acc + j * W);
  for (; j + 8 <= R; j += 8) outer_acc_avx512<8, SRC>(src, ld_src, nrows, coef + j, ldc, W, acc + j * W);
  for (; j + 4 <= R; j += 4) outer_acc_avx512<4, SRC>(src, ld_src, nrows, coef + j, ldc, W, acc + j * W);
  for (; j + 2 <= R; j += 2) outer_acc_avx512<2, SRC>(src, ld_src, nrows, coef + j, ldc, W, acc + j * W);
  for (; j < R; ++j) outer_acc_avx512<1, SRC>(src, ld_src, nrows, coef + j, ldc, W, acc + j * W);
}

template <int OUT, bool ACC>
void expand_rows_avx512_any(const float* t, int64_t ldt, int64_t nrows, int64_t R, const float* bt, int64_t N,
                            const float* bias, char* base, const int64_t* rows, int64_t row0) {
  constexpr int64_t item = OUT == 0 ? 4 : 2;
  char* out_rows[4];
  for (int64_t i0 = 0; i0 < nrows; i0 += 4) {
    const int64_t nr = std::min<int64_t>(4, nrows - i0);
    for (int64_t i = 0; i < nr; ++i) out_rows[i] = base + (rows ? rows[i0 + i] : row0 + i0 + i) * N * item;
    const float* ti = t ? t + i0 * ldt : nullptr;
    switch (nr) {
      case 4: expand_rows_avx512<4, OUT, ACC>(ti, ldt, R, bt, N, bias, out_rows); break;
      case 3: expand_rows_avx512<3, OUT, ACC>(ti, ldt, R, bt, N, bias, out_rows); break;
      case 2: expand_rows_avx512<2, OUT, ACC>(ti, ldt, R, bt, N, bias, out_rows); break;
      default: expand_rows_avx512<1, OUT, ACC>(ti, ldt, R, bt, N, bias, out_rows); break;
    }
  }
}

template <int OUT>
void expand_rows_avx512_mode(const float* t, int64_t ldt, int64_t nrows, int64_t R, const float* bt, int64_t N,
                             const float* bias, char* base, const int64_t* rows, int64_t row0, bool accumulate) {
  if (accumulate) {
    expand_rows_avx512_any<OUT, true>(t, ldt, nrows, R, bt, N, bias, base, rows, row0);
  } else {
    expand_rows_avx512_any<OUT, false>(t, ldt, nrows, R, bt, N, bias, base, rows, row0);
  }
}
#endif

#ifdef FUSED_LORA_X86_LEVELS
// t[i, j] = sum_k x[i, k] * a[j, k], RM rows x RJ ranks at a time, 32 k per dot-product instruction.
template <int RM, int RJ>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
void shrink_tile_bf16(const uint16_t* x, int64_t ldx, const uint16_t* a, int64_t K, float* t, int64_t ldt) {
  __m512 acc[RM][RJ];
  for (int i = 0; i < RM; ++i)
    for (int j = 0; j < RJ; ++j) acc[i][j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512bh av[RJ];
    for (int j = 0; j < RJ; ++j) av[j] = (__m512bh)_mm512_loadu_si512(a + j * K + k);
    for (int i = 0; i < RM; ++i) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + i * ldx + k);
      for (int j = 0; j < RJ; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xv, av[j]);
    }
  }
  if (k < K) {
    const __mmask32 m = static_cast<__mmask32>((1ull << (K - k)) - 1);
    __m512bh av[RJ];
    for (int j = 0; j < RJ; ++j) av[j] = (__m512bh)_mm512_maskz_loadu_epi16(m, a + j * K + k);
    for (int i = 0; i < RM; ++i) {
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(m, x + i * ldx + k);
      for (int j = 0; j < RJ; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xv, av[j]);
    }
  }
  for (int i = 0; i < RM; ++i)
    for (int j = 0; j < RJ; ++j) t[i * ldt + j] = _mm512_reduce_add_ps(acc[i][j]);
}

template <int RM>
void shrink_rows_rm(const uint16_t* x, int64_t ldx, const uint16_t* a, int64_t R, int64_t K, float* t, int64_t ldt) {
  int64_t j = 0;
  for (; j + 4 <= R; j += 4) shrink_tile_bf16<RM, 4>(x, ldx, a + j * K, K, t + j, ldt);
  switch (R - j) {
    case 3: shrink_tile_bf16<RM, 3>(x, ldx, a + j * K, K, t + j, ldt); break;
    case 2: shrink_tile_bf16<RM, 2>(x, ldx, a + j * K, K, t + j, ldt); break;
    case 1: shrink_tile_bf16<RM, 1>(x, ldx, a + j * K, K, t + j, ldt); break;
    default: break;
  }
}
#endif

}  // namespace

void expand_rows(const float* t, int64_t ldt, int64_t nrows, int64_t R, const float* bt, int64_t N,
                 const float* bias, at::Tensor& out, const int64_t* rows, int64_t row0, bool accumulate) {
  TORCH_CHECK(out.is_contiguous(), "fused_lora_cpu: internal: expand output must be contiguous");
  const auto dtype = out.scalar_type();
  const int64_t item = out.element_size();
  auto* base = static_cast<char*>(out.data_ptr());
#ifdef FUSED_LORA_X86_LEVELS
  if (isa_at_least(Isa::kAvx512) && (dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf)) {
    isa_record(IsaKernel::kExpand, Isa::kAvx512);
    switch (dtype) {
      case at::kFloat:
        return expand_rows_avx512_mode<0>(t, ldt, nrows, R, bt, N, bias, base, rows, row0, accumulate);
      case at::kBFloat16:
        return expand_rows_avx512_mode<1>(t, ldt, nrows, R, bt, N, bias, base, rows, row0, accumulate);
      case at::kHalf:
        return expand_rows_avx512_mode<2>(t, ldt, nrows, R, bt, N, bias, base, rows, row0, accumulate);
      default: break;
    }
  }
#endif
  const LoopTable& l = loops(IsaKernel::kExpand);
  alignas(64) float acc[kExpandRows][kExpandCols];
  alignas(64) float prev[kExpandCols];
  for (int64_t i0 = 0; i0 < nrows; i0 += kExpandRows) {
    const int64_t nr = std::min(kExpandRows, nrows - i0);
    for (int64_t n0 = 0; n0 < N; n0 += kExpandCols) {
      const int64_t nc = std::min(kExpandCols, N - n0);
      l.expand_tile(t ? t + i0 * ldt : nullptr, ldt, nr, R, bt, N, bias, n0, nc, acc);
      for (int64_t i = 0; i < nr; ++i) {
        const int64_t row = rows ? rows[i0 + i] : row0 + i0 + i;
        char* dst = base + (row * N + n0) * item;
        if (accumulate) {
          row_to_fp32(dst, dtype, 1, nc, prev);
          l.add_inplace(acc[i], prev, nc);
        }
        row_from_fp32(acc[i], nc, dtype, dst);
      }
    }
  }
}

bool outer_acc_direct(const at::Tensor& src, const float* coef, int64_t ldc, int64_t R, float* acc) {
#ifdef FUSED_LORA_X86_LEVELS
  const auto dtype = src.scalar_type();
  if (!isa_at_least(Isa::kAvx512) || (dtype != at::kFloat && dtype != at::kBFloat16)) return false;
  const int64_t nrows = src.size(0), W = src.size(1), ld = src.stride(0);
  if (W > 1 && src.stride(1) != 1) return false;  // the kernel reads a row's W elements back to back
  isa_record(IsaKernel::kOuterAcc, Isa::kAvx512);
  if (dtype == at::kFloat) {
    outer_acc_any<0>(src.const_data_ptr(), ld, nrows, coef, ldc, R, W, acc);
  } else {
    outer_acc_any<1>(src.const_data_ptr(), ld, nrows, coef, ldc, R, W, acc);
  }
  return true;
#else
  return false;
#endif
}

bool bf16_shrink_available() {
#ifdef FUSED_LORA_X86_LEVELS
  return isa_at_least(Isa::kAvx512Bf16);
#else
  return false;
#endif
}

void shrink_rows_bf16(const at::BFloat16* x, int64_t ldx, int64_t nrows, const at::BFloat16* a, int64_t R,
                      int64_t K, float* t, int64_t ldt) {
#ifdef FUSED_LORA_X86_LEVELS
  isa_record(IsaKernel::kShrinkBf16, Isa::kAvx512Bf16);
  const auto* xs = reinterpret_cast<const uint16_t*>(x);
  const auto* as = reinterpret_cast<const uint16_t*>(a);
  int64_t i = 0;
  for (; i + 4 <= nrows; i += 4) shrink_rows_rm<4>(xs + i * ldx, ldx, as, R, K, t + i * ldt, ldt);
  for (; i < nrows; ++i) shrink_rows_rm<1>(xs + i * ldx, ldx, as, R, K, t + i * ldt, ldt);
#else
  TORCH_CHECK(false, "fused_lora_cpu: internal: bf16 shrink kernel not compiled in");
#endif
}

}  // namespace fused_lora_cpu
