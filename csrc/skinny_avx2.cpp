// AVX2 + FMA + F16C tiles of the skinny kernels (skinny.h), run from the avx2 ISA level up. Accumulators stay in
// registers for the whole reduction; 16-bit operands are widened to fp32 as they are loaded; every tail (K, N,
// columns, ranks) is read with masked or copied loads, so nothing past a row's last element is touched.
#include "skinny_impl.h"

#include "isa.h"

#ifdef FUSED_LORA_X86_LEVELS
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace fused_lora_cpu {

namespace {

#define FL_INLINE inline __attribute__((always_inline))
// Loops over a tile's registers are unrolled so that the accumulator arrays live in registers, not on the stack.
#define FL_UNROLL _Pragma("GCC unroll 16")

alignas(32) const int32_t kMaskTable[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};

// Lanes [0, n) set, n in [0, 8].
FL_INLINE __m256i lanes(int64_t n) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kMaskTable + 8 - n)); }

template <Elt T>
struct Storage {
  using type = uint16_t;
};
template <>
struct Storage<Elt::kF32> {
  using type = float;
};
template <Elt T>
using St = typename Storage<T>::type;

template <Elt T>
FL_INLINE __m256 load8(const St<T>* p) {
  if constexpr (T == Elt::kF32) {
    return _mm256_loadu_ps(p);
  } else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    if constexpr (T == Elt::kBF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    return _mm256_cvtph_ps(h);
  }
}

// The first n elements (n in [0, 8]), zeros after; nothing past p[n - 1] is read.
template <Elt T>
FL_INLINE __m256 load_part(const St<T>* p, int64_t n) {
  if constexpr (T == Elt::kF32) {
    return _mm256_maskload_ps(p, lanes(n));
  } else {
    alignas(16) uint16_t buf[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::memcpy(buf, p, static_cast<size_t>(n) * sizeof(uint16_t));
    return load8<T>(buf);
  }
}

// Round to nearest even into bf16; NaN stays NaN (quiet), as the generic loops round.
FL_INLINE __m128i to_bf16(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
  const __m256i r = _mm256_blendv_epi8(rounded, quiet, _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  // packus works per 128-bit lane: [r0..r3 r0..r3 | r4..r7 r4..r7]; quadwords 0 and 2 hold r0..r7
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08));
}

template <Elt T>
FL_INLINE void store8(St<T>* p, __m256 v) {
  if constexpr (T == Elt::kF32) {
    _mm256_storeu_ps(p, v);
  } else if constexpr (T == Elt::kBF16) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), to_bf16(v));
  } else {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
}

// The first n lanes of v into p[0, n) (n in [0, 8]); nothing past p[n - 1] is written. Through a stack copy: masked
// stores (vmaskmovps) are microcoded on AMD CPUs.
template <Elt T>
FL_INLINE void store_part(St<T>* p, __m256 v, int64_t n) {
  alignas(32) St<T> buf[8];
  store8<T>(buf, v);
  std::memcpy(p, buf, static_cast<size_t>(n) * sizeof(St<T>));
}

FL_INLINE float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <Elt T>
FL_INLINE __m256 load_any_t(const MatRef& m, int64_t row, int64_t col, int64_t n) {
  const St<T>* ptr = static_cast<const St<T>*>(m.p) + row * m.ld + col;
  return n == 8 ? load8<T>(ptr) : load_part<T>(ptr, n);
}

// m[row, col .. col + n) as fp32 (n in [0, 8]; zeros past n).
FL_INLINE __m256 load_any(const MatRef& m, int64_t row, int64_t col, int64_t n) {
  switch (m.elt) {
    case Elt::kF32: return load_any_t<Elt::kF32>(m, row, col, n);
    case Elt::kBF16: return load_any_t<Elt::kBF16>(m, row, col, n);
    default: return load_any_t<Elt::kF16>(m, row, col, n);
  }
}

// out[row, col .. col + n) = v rounded to out's dtype (n in [0, 8]).
FL_INLINE void store_any(const OutRef& o, int64_t row, int64_t col, __m256 v, int64_t n) {
  switch (o.elt) {
    case Elt::kF32: {
      float* ptr = static_cast<float*>(o.p) + row * o.ld + col;
      if (n == 8) {
        store8<Elt::kF32>(ptr, v);
      } else {
        store_part<Elt::kF32>(ptr, v, n);
      }
      break;
    }
    case Elt::kBF16: {
      uint16_t* ptr = static_cast<uint16_t*>(o.p) + row * o.ld + col;
      if (n == 8) {
        store8<Elt::kBF16>(ptr, v);
      } else {
        store_part<Elt::kBF16>(ptr, v, n);
      }
      break;
    }
    case Elt::kF16: {
      uint16_t* ptr = static_cast<uint16_t*>(o.p) + row * o.ld + col;
      if (n == 8) {
        store8<Elt::kF16>(ptr, v);
      } else {
        store_part<Elt::kF16>(ptr, v, n);
      }
      break;
    }
  }
}

// ---- skinny_nt: dot products along K, RM rows of x against RN rows of w per tile ----

// acc[r][c] += sum_{k < len} xr[r][k] * wr[c][k]
template <Elt T, int RM, int RN>
FL_INLINE void nt_seg(__m256 (&acc)[RM][RN], const float* const* xr, const St<T>* const* wr, int64_t len) {
  int64_t k = 0;
  for (; k + 8 <= len; k += 8) {
    __m256 wv[RN];
    FL_UNROLL
    for (int c = 0; c < RN; ++c) wv[c] = load8<T>(wr[c] + k);
    FL_UNROLL
    for (int r = 0; r < RM; ++r) {
      const __m256 xv = _mm256_loadu_ps(xr[r] + k);
      FL_UNROLL
      for (int c = 0; c < RN; ++c) acc[r][c] = _mm256_fmadd_ps(xv, wv[c], acc[r][c]);
    }
  }
  if (k < len) {
    const int64_t left = len - k;
    __m256 wv[RN];
    FL_UNROLL
    for (int c = 0; c < RN; ++c) wv[c] = load_part<T>(wr[c] + k, left);
    FL_UNROLL
    for (int r = 0; r < RM; ++r) {
      const __m256 xv = _mm256_maskload_ps(xr[r] + k, lanes(left));
      FL_UNROLL
      for (int c = 0; c < RN; ++c) acc[r][c] = _mm256_fmadd_ps(xv, wv[c], acc[r][c]);
    }
  }
}

// The rows [n, n + RN) of m from `row` on, as typed pointers; rows past `rows` repeat the last one.
template <Elt T, int RN>
FL_INLINE void row_ptrs(const MatRef& m, int64_t n, int64_t rn, const St<T>* (&out)[RN]) {
  const auto* base = static_cast<const St<T>*>(m.p);
  FL_UNROLL
  for (int q = 0; q < RN; ++q) out[q] = base + (n + std::min<int64_t>(q, rn - 1)) * m.ld;
}

template <Elt T, int RM, int RN>
FL_INLINE void nt_seg_rows(__m256 (&acc)[RM][RN], const float* const* xr, const MatRef& m, int64_t n, int64_t rn,
                           int64_t len) {
  const St<T>* wr[RN];
  row_ptrs<T, RN>(m, n, rn, wr);
  nt_seg<T, RM, RN>(acc, xr, wr, len);
}

template <int RM, int RN>
FL_INLINE void nt_seg_any(__m256 (&acc)[RM][RN], const float* const* xr, const MatRef& m, int64_t n, int64_t rn,
                          int64_t len) {
  switch (m.elt) {
    case Elt::kF32: return nt_seg_rows<Elt::kF32, RM, RN>(acc, xr, m, n, rn, len);
    case Elt::kBF16: return nt_seg_rows<Elt::kBF16, RM, RN>(acc, xr, m, n, rn, len);
    case Elt::kF16: return nt_seg_rows<Elt::kF16, RM, RN>(acc, xr, m, n, rn, len);
  }
}

constexpr int64_t kNtChunk = 24;  // w rows per chunk: a multiple of every RN below

// Rows [i, i + RM) against w rows [n0, n1) (n1 - n0 <= kNtChunk), RN at a time; the chunk's dot products land in
// res[r][n - n0] (rows past n1 repeat the last one; their sums are dropped).
template <int RM, int RN>
void nt_group(const NtProduct& p, int64_t i, int64_t n0, int64_t n1, float (&res)[4][kNtChunk]) {
  const float* xr[RM];
  const float* er[RM];
  FL_UNROLL
  for (int r = 0; r < RM; ++r) {
    xr[r] = p.x + (i + r) * p.ldx;
    er[r] = p.R > 0 ? p.e + (i + r) * p.lde : nullptr;
  }
  for (int64_t n = n0; n < n1; n += RN) {
    const int64_t rn = std::min<int64_t>(RN, n1 - n);
    __m256 acc[RM][RN];
    FL_UNROLL
    for (int r = 0; r < RM; ++r) {
      FL_UNROLL
      for (int c = 0; c < RN; ++c) acc[r][c] = _mm256_setzero_ps();
    }
    if (p.K > 0) nt_seg_any<RM, RN>(acc, xr, p.w, n, rn, p.K);
    if (p.R > 0) nt_seg_any<RM, RN>(acc, er, p.E, n, rn, p.R);
    FL_UNROLL
    for (int r = 0; r < RM; ++r) {
      FL_UNROLL
      for (int c = 0; c < RN; ++c) res[r][n - n0 + c] = hsum(acc[r][c]);
    }
  }
}

// res (the chunk's sums for rows [i, i + rows)) -> out columns [n0, n1): colscale, bias and base, rounded once.
FL_INLINE void nt_store(const NtProduct& p, int64_t i, int rows, int64_t n0, int64_t n1, float (&res)[4][kNtChunk]) {
  for (int64_t c = 0; c < n1 - n0; c += 8) {
    const int64_t n = std::min<int64_t>(8, n1 - n0 - c);
    const __m256 cs = p.colscale ? load_any_t<Elt::kF32>(MatRef{p.colscale, Elt::kF32, 0}, 0, n0 + c, n)
                                 : _mm256_set1_ps(1.0f);
    const __m256 bias = p.bias ? load_any_t<Elt::kF32>(MatRef{p.bias, Elt::kF32, 0}, 0, n0 + c, n)
                               : _mm256_setzero_ps();
    for (int r = 0; r < rows; ++r) {
      __m256 v = _mm256_fmadd_ps(_mm256_loadu_ps(res[r] + c), cs, bias);
      if (p.base.p != nullptr) v = _mm256_add_ps(load_any(p.base, i + r, n0 + c, n), v);
      store_any(p.out, i + r, n0 + c, v, n);
    }
  }
}

// w rows are taken kNtChunk at a time (a few tens of KiB), which every group of x rows then reads from L1/L2.
void nt_block(const NtProduct& p, int64_t i0, int64_t i1, int64_t n0, int64_t n1) {
  alignas(32) float res[4][kNtChunk];
  for (int64_t nc = n0; nc < n1; nc += kNtChunk) {
    const int64_t ne = std::min(nc + kNtChunk, n1);
    int64_t i = i0;
    for (; i + 3 <= i1; i += 3) {
      nt_group<3, 3>(p, i, nc, ne, res);
      nt_store(p, i, 3, nc, ne, res);
    }
    if (i1 - i == 2) {
      nt_group<2, 4>(p, i, nc, ne, res);
      nt_store(p, i, 2, nc, ne, res);
    } else if (i1 - i == 1) {
      nt_group<1, 8>(p, i, nc, ne, res);
      nt_store(p, i, 1, nc, ne, res);
    }
  }
}

// ---- skinny_nn: RM output rows x CV vectors of 8 columns per tile, accumulated over the rows of w (and E) ----
//
// The rows of w (then of E) are taken kNnRows at a time over the task's whole column range; each tile walks one
// panel (its 8 CV columns) down the block's rows, so the block's panel is read from memory by the first group of
// output rows and from L1/L2 by the others (64 rows: few enough pages for the TLB, prefetched two panels ahead).
// Over all of w, one thousand row blocks would mean a page walk per line; a column range that is not a whole
// number of panels is first converted into a zero-padded fp32 copy of the block (rows padded by a line so they
// spread over the L1 sets). The sums of the task's [rows x cols] corner carry over between row blocks in an fp32
// scratch. A lone output row streams whole rows of w instead (nn_one_row).
constexpr int64_t kNnRows = 64;

// Rows [n0, n1) of one term of skinny_nn: coefficients g(i, n) and rows w[n, :].
struct NnSeg {
  StridedF32 g;
  MatRef w;
  int64_t n0, n1;
};

// dst[q, c] = w[n0 + q, k0 + c] as fp32 for q < rows, c < width; zeros up to `padded` columns.
template <Elt T>
void pack_rows(const MatRef& w, int64_t n0, int64_t rows, int64_t k0, int64_t width, int64_t padded, float* dst,
               int64_t ld) {
  for (int64_t q = 0; q < rows; ++q) {
    const St<T>* src = static_cast<const St<T>*>(w.p) + (n0 + q) * w.ld + k0;
    float* row = dst + q * ld;
    int64_t c = 0;
    for (; c + 8 <= width; c += 8) _mm256_storeu_ps(row + c, load8<T>(src + c));
    for (; c < padded; c += 8) _mm256_storeu_ps(row + c, load_part<T>(src + c, std::clamp<int64_t>(width - c, 0, 8)));
  }
}

void pack_any(const MatRef& w, int64_t n0, int64_t rows, int64_t k0, int64_t width, int64_t padded, float* dst,
              int64_t ld) {
  switch (w.elt) {
    case Elt::kF32: return pack_rows<Elt::kF32>(w, n0, rows, k0, width, padded, dst, ld);
    case Elt::kBF16: return pack_rows<Elt::kBF16>(w, n0, rows, k0, width, padded, dst, ld);
    case Elt::kF16: return pack_rows<Elt::kF16>(w, n0, rows, k0, width, padded, dst, ld);
  }
}

// The running sums of a task between row blocks: fp32 [rows, ld] (ld: the task's width rounded up to the panel),
// indexed from the task's corner.
struct Scratch {
  float* p;
  int64_t ld, i0, k0;
  float* at(int64_t i, int64_t k) const { return p + (i - i0) * ld + (k - k0); }
};

// One tile over one packed row block (panel: its rows' 8 CV columns, row stride ldw): sums start at 0 (first) or from
// the scratch, and go back to the scratch, or (last) through colscale and base into the output, rounded once.
// cols[v]: valid columns of vector v (0..8).
template <Elt T, int RM, int CV>
void nn_tile(const NnProduct& p, const NnSeg* s, const St<T>* panel, int64_t ldw, int64_t i, int64_t k0,
             const int64_t* cols, const Scratch& scr, bool first, bool last) {
  __m256 acc[RM][CV];
  FL_UNROLL
  for (int r = 0; r < RM; ++r) {
    FL_UNROLL
    for (int v = 0; v < CV; ++v) {
      // the scratch rows are a whole number of panels wide: whole vectors stay inside them (masked moves are
      // microcoded, tens of cycles, on some CPUs)
      acc[r][v] = first || cols[v] == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(scr.at(i + r, k0 + 8 * v));
    }
  }
  if (s != nullptr) {
    const float* gr[RM];
    FL_UNROLL
    for (int r = 0; r < RM; ++r) gr[r] = s->g.p + (i + r) * s->g.rs + s->n0 * s->g.cs;
    const int64_t rows = s->n1 - s->n0;
    const St<T>* wn = panel;
    for (int64_t n = 0; n < rows; ++n, wn += ldw) {
      // the same row two panels further right: the first group of output rows reads w from memory, one short
      // stretch per row, too short for the hardware prefetcher
      _mm_prefetch(reinterpret_cast<const char*>(wn + 2 * 8 * CV), _MM_HINT_T0);
      __m256 gb[RM];
      FL_UNROLL
      for (int r = 0; r < RM; ++r) gb[r] = _mm256_broadcast_ss(gr[r] + n * s->g.cs);
      FL_UNROLL
      for (int v = 0; v < CV; ++v) {
        const __m256 wv = load8<T>(wn + 8 * v);
        FL_UNROLL
        for (int r = 0; r < RM; ++r) acc[r][v] = _mm256_fmadd_ps(gb[r], wv, acc[r][v]);
      }
    }
  }
  FL_UNROLL
  for (int v = 0; v < CV; ++v) {
    const int64_t n = cols[v];
    if (n == 0) continue;
    const int64_t col = k0 + 8 * v;
    if (!last) {
      FL_UNROLL
      for (int r = 0; r < RM; ++r) _mm256_storeu_ps(scr.at(i + r, col), acc[r][v]);
      continue;
    }
    const __m256 cs = p.colscale == nullptr ? _mm256_set1_ps(1.0f)
                      : n == 8          ? _mm256_loadu_ps(p.colscale + col)
                                        : _mm256_maskload_ps(p.colscale + col, lanes(n));
    FL_UNROLL
    for (int r = 0; r < RM; ++r) {
      __m256 val = _mm256_mul_ps(acc[r][v], cs);
      if (p.base.p != nullptr) val = _mm256_add_ps(load_any(p.base, i + r, col, n), val);
      store_any(p.out, i + r, col, val, n);
    }
  }
}

// Every group of RM output rows (remainders with fewer) over one packed panel.
template <Elt T, int RM, int CV>
void nn_panel_rows(const NnProduct& p, const NnSeg* s, const St<T>* panel, int64_t ldw, int64_t i0, int64_t i1,
                   int64_t k0, const int64_t* cols, const Scratch& scr, bool first, bool last) {
  int64_t i = i0;
  for (; i + RM <= i1; i += RM) nn_tile<T, RM, CV>(p, s, panel, ldw, i, k0, cols, scr, first, last);
  if constexpr (RM > 1) {
    const int64_t left = i1 - i;
    if (left == 3 && RM > 3) nn_tile<T, 3, CV>(p, s, panel, ldw, i, k0, cols, scr, first, last);
    if (left == 2) nn_tile<T, 2, CV>(p, s, panel, ldw, i, k0, cols, scr, first, last);
    if (left == 1) nn_tile<T, 1, CV>(p, s, panel, ldw, i, k0, cols, scr, first, last);
  }
}

template <Elt T, int RM, int CV>
void nn_direct_block(const NnProduct& p, const NnSeg& s, int64_t i0, int64_t i1, int64_t k0, int64_t width,
                     const Scratch& scr, bool first, bool last) {
  constexpr int64_t P = 8 * CV;
  const St<T>* base = static_cast<const St<T>*>(s.w.p) + s.n0 * s.w.ld + k0;
  int64_t cols[CV];
  FL_UNROLL
  for (int v = 0; v < CV; ++v) cols[v] = 8;
  for (int64_t c = 0; c < width; c += P) {
    nn_panel_rows<T, RM, CV>(p, &s, base + c, s.w.ld, i0, i1, k0 + c, cols, scr, first, last);
  }
}

// acc[0, width) += sum_{n in [n0, n1)} g(i, n) * w[n, k0 ...]: rows of w streamed whole, four at a time (one output
// row: nothing to reuse a block of w for, so the block loop would only break up the streams).
template <Elt T>
void nn_row_seg(float* acc, const NnSeg& s, int64_t i, int64_t k0, int64_t width) {
  const float* g = s.g.p + i * s.g.rs;
  const St<T>* w = static_cast<const St<T>*>(s.w.p) + k0;
  const int64_t ld = s.w.ld;
  int64_t n = s.n0;
  for (; n + 4 <= s.n1; n += 4) {
    const __m256 g0 = _mm256_broadcast_ss(g + n * s.g.cs), g1 = _mm256_broadcast_ss(g + (n + 1) * s.g.cs);
    const __m256 g2 = _mm256_broadcast_ss(g + (n + 2) * s.g.cs), g3 = _mm256_broadcast_ss(g + (n + 3) * s.g.cs);
    const St<T>* w0 = w + n * ld;
    int64_t k = 0;
    for (; k + 8 <= width; k += 8) {
      __m256 a = _mm256_loadu_ps(acc + k);
      a = _mm256_fmadd_ps(g0, load8<T>(w0 + k), a);
      a = _mm256_fmadd_ps(g1, load8<T>(w0 + ld + k), a);
      a = _mm256_fmadd_ps(g2, load8<T>(w0 + 2 * ld + k), a);
      a = _mm256_fmadd_ps(g3, load8<T>(w0 + 3 * ld + k), a);
      _mm256_storeu_ps(acc + k, a);
    }
    if (k < width) {
      const int64_t left = width - k;
      __m256 a = _mm256_loadu_ps(acc + k);
      a = _mm256_fmadd_ps(g0, load_part<T>(w0 + k, left), a);
      a = _mm256_fmadd_ps(g1, load_part<T>(w0 + ld + k, left), a);
      a = _mm256_fmadd_ps(g2, load_part<T>(w0 + 2 * ld + k, left), a);
      a = _mm256_fmadd_ps(g3, load_part<T>(w0 + 3 * ld + k, left), a);
      _mm256_storeu_ps(acc + k, a);
    }
  }
  for (; n < s.n1; ++n) {
    const __m256 g0 = _mm256_broadcast_ss(g + n * s.g.cs);
    const St<T>* w0 = w + n * ld;
    for (int64_t k = 0; k < width; k += 8) {
      const __m256 wv = k + 8 <= width ? load8<T>(w0 + k) : load_part<T>(w0 + k, width - k);
      _mm256_storeu_ps(acc + k, _mm256_fmadd_ps(g0, wv, _mm256_loadu_ps(acc + k)));
    }
  }
}

// Output row i over columns [k0, k1): the running sums in an L1-resident row, then colscale, base and rounding.
void nn_one_row(const NnProduct& p, int64_t i, int64_t k0, int64_t k1) {
  const int64_t width = k1 - k0, padded = (width + 7) / 8 * 8;
  thread_local std::vector<float> row;
  row.assign(static_cast<size_t>(padded), 0.0f);
  nn_row_accumulate_avx2(p.g, p.w, i, 0, p.N, k0, width, row.data());
  nn_row_accumulate_avx2(p.e, p.E, i, 0, p.R, k0, width, row.data());
  nn_row_finish_avx2(p, i, k0, width, row.data());
}

template <int RM, int CV>
void nn_block_shape(const NnProduct& p, int64_t i0, int64_t i1, int64_t k0, int64_t k1) {
  constexpr int64_t P = 8 * CV;
  constexpr int64_t nrows = kNnRows;
  std::vector<NnSeg> segs;
  for (int64_t n = 0; n < p.N; n += nrows) segs.push_back({p.g, p.w, n, std::min(p.N, n + nrows)});
  for (int64_t n = 0; n < p.R; n += nrows) segs.push_back({p.e, p.E, n, std::min(p.R, n + nrows)});
  const size_t nseg = std::max<size_t>(1, segs.size());
  const int64_t width = k1 - k0, padded = (width + P - 1) / P * P;
  const int64_t ldw = padded + 16;  // a line of padding per row: the rows spread over the L1 sets
  thread_local std::vector<float> packed, scratch;
  packed.resize(static_cast<size_t>(nrows * ldw));
  if (nseg > 1) scratch.resize(static_cast<size_t>((i1 - i0) * padded));
  const Scratch scr{scratch.data(), padded, i0, k0};
  const bool direct = width % P == 0;  // whole panels: read w where it is; else packed with zero columns
  for (size_t b = 0; b < nseg; ++b) {
    const NnSeg* s = segs.empty() ? nullptr : &segs[b];
    const bool first = b == 0, last = b + 1 == nseg;
    if (direct && s != nullptr) {
      switch (s->w.elt) {
        case Elt::kF32: nn_direct_block<Elt::kF32, RM, CV>(p, *s, i0, i1, k0, width, scr, first, last); break;
        case Elt::kBF16: nn_direct_block<Elt::kBF16, RM, CV>(p, *s, i0, i1, k0, width, scr, first, last); break;
        case Elt::kF16: nn_direct_block<Elt::kF16, RM, CV>(p, *s, i0, i1, k0, width, scr, first, last); break;
      }
      continue;
    }
    if (s != nullptr) pack_any(s->w, s->n0, s->n1 - s->n0, k0, width, padded, packed.data(), ldw);
    for (int64_t c = 0; c < width; c += P) {
      int64_t cols[CV];
      FL_UNROLL
      for (int v = 0; v < CV; ++v) cols[v] = std::clamp<int64_t>(width - c - 8 * v, 0, 8);
      nn_panel_rows<Elt::kF32, RM, CV>(p, s, packed.data() + c, ldw, i0, i1, k0 + c, cols, scr, first, last);
    }
  }
}

}  // namespace

void nt_block_avx2(const NtProduct& p, int64_t i0, int64_t i1, int64_t n0, int64_t n1) {
  isa_record(IsaKernel::kSkinny, Isa::kAvx2);
  nt_block(p, i0, i1, n0, n1);
}

// Tile shapes (rows x 8-column vectors): accumulators + one broadcast per row + one w vector within the 16 ymm
// registers. A lone row takes 8 vectors (8 independent sums cover the FMA latency).
void nn_block_avx2(const NnProduct& p, int64_t i0, int64_t i1, int64_t k0, int64_t k1) {
  isa_record(IsaKernel::kSkinny, Isa::kAvx2);
  if (i1 - i0 == 1) return nn_one_row(p, i0, k0, k1);
  return nn_block_shape<3, 4>(p, i0, i1, k0, k1);
}

void nn_row_accumulate_avx2(const StridedF32& g, const MatRef& w, int64_t i, int64_t n0, int64_t n1, int64_t k0,
                            int64_t width, float* acc) {
  if (n1 <= n0) return;
  isa_record(IsaKernel::kSkinny, Isa::kAvx2);
  const NnSeg s{g, w, n0, n1};
  switch (w.elt) {
    case Elt::kF32: return nn_row_seg<Elt::kF32>(acc, s, i, k0, width);
    case Elt::kBF16: return nn_row_seg<Elt::kBF16>(acc, s, i, k0, width);
    case Elt::kF16: return nn_row_seg<Elt::kF16>(acc, s, i, k0, width);
  }
}

void nn_row_finish_avx2(const NnProduct& p, int64_t i, int64_t k0, int64_t width, const float* acc) {
  for (int64_t c = 0; c < width; c += 8) {
    const int64_t n = std::min<int64_t>(8, width - c);
    const int64_t col = k0 + c;
    __m256 val = _mm256_loadu_ps(acc + c);
    if (p.colscale != nullptr) {
      val = _mm256_mul_ps(val, load_any_t<Elt::kF32>(MatRef{p.colscale, Elt::kF32, 0}, 0, col, n));
    }
    if (p.base.p != nullptr) val = _mm256_add_ps(load_any(p.base, i, col, n), val);
    store_any(p.out, i, col, val, n);
  }
}

void transpose_avx2(const MatRef& src, int64_t N, int64_t R, float* dst) {
  isa_record(IsaKernel::kSkinny, Isa::kAvx2);
  for (int64_t n0 = 0; n0 < N; n0 += 8) {
    const int64_t nn = std::min<int64_t>(8, N - n0);
    for (int64_t j0 = 0; j0 < R; j0 += 8) {
      const int64_t nj = std::min<int64_t>(8, R - j0);
      __m256 row[8];
      FL_UNROLL
      for (int q = 0; q < 8; ++q) {
        row[q] = q < nn ? load_any(src, n0 + q, j0, nj) : _mm256_setzero_ps();
      }
      // 8 x 8 transpose: row[q] lane j -> col[j] lane q
      const __m256 t0 = _mm256_unpacklo_ps(row[0], row[1]), t1 = _mm256_unpackhi_ps(row[0], row[1]);
      const __m256 t2 = _mm256_unpacklo_ps(row[2], row[3]), t3 = _mm256_unpackhi_ps(row[2], row[3]);
      const __m256 t4 = _mm256_unpacklo_ps(row[4], row[5]), t5 = _mm256_unpackhi_ps(row[4], row[5]);
      const __m256 t6 = _mm256_unpacklo_ps(row[6], row[7]), t7 = _mm256_unpackhi_ps(row[6], row[7]);
      const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
      const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
      const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
      const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
      const __m256 col[8] = {_mm256_permute2f128_ps(u0, u4, 0x20), _mm256_permute2f128_ps(u1, u5, 0x20),
                             _mm256_permute2f128_ps(u2, u6, 0x20), _mm256_permute2f128_ps(u3, u7, 0x20),
                             _mm256_permute2f128_ps(u0, u4, 0x31), _mm256_permute2f128_ps(u1, u5, 0x31),
                             _mm256_permute2f128_ps(u2, u6, 0x31), _mm256_permute2f128_ps(u3, u7, 0x31)};
      for (int64_t q = 0; q < nj; ++q) {
        float* d = dst + (j0 + q) * N + n0;
        if (nn == 8) {
          _mm256_storeu_ps(d, col[q]);
        } else {
          store_part<Elt::kF32>(d, col[q], nn);
        }
      }
    }
  }
}

}  // namespace fused_lora_cpu

#pragma GCC pop_options

#else  // no x86 levels in this build: the dispatch never reaches these

namespace fused_lora_cpu {
void nt_block_avx2(const NtProduct& p, int64_t i0, int64_t i1, int64_t n0, int64_t n1) {
  nt_block_generic(p, i0, i1, n0, n1);
}
void nn_block_avx2(const NnProduct& p, int64_t i0, int64_t i1, int64_t k0, int64_t k1) {
  nn_block_generic(p, i0, i1, k0, k1);
}
void transpose_avx2(const MatRef& src, int64_t N, int64_t R, float* dst) { transpose_generic(src, N, R, dst); }
void nn_row_accumulate_avx2(const StridedF32&, const MatRef&, int64_t, int64_t, int64_t, int64_t, int64_t, float*) {
  TORCH_CHECK(false, "fused_lora_cpu: internal: AVX2 kernels not compiled in");
}
void nn_row_finish_avx2(const NnProduct&, int64_t, int64_t, int64_t, const float*) {
  TORCH_CHECK(false, "fused_lora_cpu: internal: AVX2 kernels not compiled in");
}
}  // namespace fused_lora_cpu

#endif
