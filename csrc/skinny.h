// GEMMs where one side is thin: few rows of x or dy (decode, small batches: M up to ~64), or an inner/outer
// dimension equal to the rank. Vendor GEMMs lose most of their time on these shapes (packing the whole weight per
// call, a reference kernel for 16-bit inputs where the CPU has no native support), while the work is one pass over
// the weight. Two register-tiled kernels serve every such product here, reading the weight and adapters in their
// own dtype (fp32, bf16, fp16: no converted copies per call) and accumulating in fp32:
//   skinny_nt  out[i, n] = round(base[i, n] + colscale[n] * sum_k x[i, k] w[n, k]   (x @ W^T + t @ B^T + bias:
//                                + sum_j e(i, j) E[n, j] + bias[n])                  the forward in one pass; shrink)
//   skinny_nn  out[i, k] = round(base[i, k] + colscale[k] * sum_n g(i, n) w[n, k]
//                                + sum_j e(i, j) E[j, k])                            (dy @ W + dS @ A, dS, dA, dB,
//                                                                                     the forward's t @ B^T + bias)
// g and e are read through a row and a column stride, so g^T (dB = dy^T t, dA = dS^T x) needs no copy.
// The AVX2 build runs from the avx2 level up; below it, portable loops with the same accumulation in fp32.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace fused_lora_cpu {

// The element types the kernels read and write.
enum class Elt : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

Elt elt_of(at::ScalarType dtype);

// A row-major matrix with unit column stride (ld: elements between rows); p == nullptr: absent.
struct MatRef {
  const void* p = nullptr;
  Elt elt = Elt::kF32;
  int64_t ld = 0;
};

// A strided fp32 matrix read element by element (broadcast operands): v(i, j) = p[i * rs + j * cs].
struct StridedF32 {
  const float* p = nullptr;
  int64_t rs = 0, cs = 0;
};

// An output: row-major, unit column stride, fp32/bf16/fp16 (rounded once, to nearest even).
struct OutRef {
  void* p = nullptr;
  Elt elt = Elt::kF32;
  int64_t ld = 0;
};

inline int64_t elt_size(Elt e) { return e == Elt::kF32 ? 4 : 2; }
// The same matrix from row `row` on.
inline MatRef row_offset(MatRef m, int64_t row) {
  m.p = static_cast<const char*>(m.p) + row * m.ld * elt_size(m.elt);
  return m;
}
inline OutRef row_offset(OutRef o, int64_t row) {
  o.p = static_cast<char*>(o.p) + row * o.ld * elt_size(o.elt);
  return o;
}

MatRef mat_ref(const at::Tensor& t);  // t: 2-D with unit column stride (or one column)
OutRef out_ref(at::Tensor& t);        // t: 2-D with unit column stride

// out[i, n] = round(base[i, n] + colscale[n] * sum_k x[i, k] w[n, k] + sum_j e[i, j] E[n, j] + bias[n]) for
// i < M, n < N. x: fp32 [M, K] (ldx); w: [N, K]; e: fp32 [M, R] (lde); E: [N, R]; bias: fp32 [N]. Absent parts
// (null pointers, K == 0, R == 0) add nothing; colscale (null: 1) only without e/E; base may be the output itself.
struct NtProduct {
  int64_t M = 0, N = 0, K = 0, R = 0;
  const float* x = nullptr;
  int64_t ldx = 0;
  MatRef w;
  const float* colscale = nullptr;
  const float* e = nullptr;
  int64_t lde = 0;
  MatRef E;
  const float* bias = nullptr;
  MatRef base;
  OutRef out;
};
void skinny_nt(const NtProduct& p);

// out[i, k] = round(base[i, k] + colscale[k] * sum_{n < N} g(i, n) w[n, k] + sum_{j < R} e(i, j) E[j, k]) for
// i < M, k < K. w: [N, K] (absent when N == 0); E: [R, K] (absent when R == 0); base may be absent (0) and may be the
// output itself (each element is read before it is written); colscale (null: 1) only without e/E.
struct NnProduct {
  int64_t M = 0, N = 0, K = 0, R = 0;
  StridedF32 g;
  MatRef w;
  const float* colscale = nullptr;
  StridedF32 e;
  MatRef E;
  MatRef base;
  OutRef out;
};
void skinny_nn(const NnProduct& p);

// dst[j, n] = src[n, j] as fp32 for src [N, R] (any Elt, ld_src), dst [R, N] contiguous.
void transpose_to_f32(const MatRef& src, int64_t N, int64_t R, float* dst);

}  // namespace fused_lora_cpu
