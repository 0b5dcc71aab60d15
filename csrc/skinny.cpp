// The skinny kernels (skinny.h): operand views, the split of a call into parallel tasks, the choice between the
// AVX2 tiles (skinny_avx2.cpp, from the avx2 level up) and the portable loops below (the baseline level).
#include "skinny.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <vector>

#include "common.h"
#include "skinny_impl.h"

namespace fused_lora_cpu {

namespace {

// Multiply-adds below which a call runs on the calling thread: a fork/join of the thread pool costs more than this
// much arithmetic (and on a busy machine a descheduled worker stalls the whole region).
constexpr int64_t kParallelWork = int64_t{1} << 20;

bool use_avx2() {
#ifdef FUSED_LORA_X86_LEVELS
  return isa_at_least(Isa::kAvx2);
#else
  return false;
#endif
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

float load_elt(const void* base, Elt elt, int64_t idx) {
  switch (elt) {
    case Elt::kF32: return static_cast<const float*>(base)[idx];
    case Elt::kBF16:
      return static_cast<float>(c10::BFloat16(static_cast<const uint16_t*>(base)[idx], c10::BFloat16::from_bits()));
    case Elt::kF16:
      return static_cast<float>(c10::Half(static_cast<const uint16_t*>(base)[idx], c10::Half::from_bits()));
  }
  return 0.0f;
}

void store_elt(void* base, Elt elt, int64_t idx, float v) {
  switch (elt) {
    case Elt::kF32: static_cast<float*>(base)[idx] = v; break;
    case Elt::kBF16: static_cast<uint16_t*>(base)[idx] = c10::BFloat16(v).x; break;
    case Elt::kF16: static_cast<uint16_t*>(base)[idx] = c10::Half(v).x; break;
  }
}

// row[c] = m[r, c0 + c] as fp32, c < n
void row_f32(const MatRef& m, int64_t r, int64_t c0, int64_t n, float* row) {
  for (int64_t c = 0; c < n; ++c) row[c] = load_elt(m.p, m.elt, r * m.ld + c0 + c);
}

}  // namespace

Elt elt_of(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return Elt::kF32;
    case at::kBFloat16: return Elt::kBF16;
    case at::kHalf: return Elt::kF16;
    default: TORCH_CHECK(false, "fused_lora_cpu: internal: no skinny kernel for ", dtype);
  }
  return Elt::kF32;
}

MatRef mat_ref(const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 2 && (t.stride(1) == 1 || t.size(1) <= 1),
              "fused_lora_cpu: internal: skinny operand needs unit column stride");
  return MatRef{t.const_data_ptr(), elt_of(t.scalar_type()), t.stride(0)};
}

OutRef out_ref(at::Tensor& t) {
  TORCH_CHECK(t.dim() == 2 && (t.stride(1) == 1 || t.size(1) <= 1),
              "fused_lora_cpu: internal: skinny output needs unit column stride");
  return OutRef{t.data_ptr(), elt_of(t.scalar_type()), t.stride(0)};
}

void nt_block_generic(const NtProduct& p, int64_t i0, int64_t i1, int64_t n0, int64_t n1) {
  isa_record(IsaKernel::kSkinny, Isa::kBaseline);
  std::vector<float> wrow(p.K), erow(p.R);
  for (int64_t n = n0; n < n1; ++n) {
    row_f32(p.w, n, 0, p.K, wrow.data());
    row_f32(p.E, n, 0, p.R, erow.data());
    for (int64_t i = i0; i < i1; ++i) {
      float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // eight running sums, as the vector kernel keeps
      const float* x = p.x + i * p.ldx;
      for (int64_t k = 0; k < p.K; ++k) part[k & 7] += x[k] * wrow[k];
      const float* e = p.e + i * p.lde;
      for (int64_t j = 0; j < p.R; ++j) part[j & 7] += e[j] * erow[j];
      float s = 0.0f;
      for (float v : part) s += v;
      float v = (p.colscale ? s * p.colscale[n] : s) + (p.bias ? p.bias[n] : 0.0f);
      if (p.base.p != nullptr) v = load_elt(p.base.p, p.base.elt, i * p.base.ld + n) + v;
      store_elt(p.out.p, p.out.elt, i * p.out.ld + n, v);
    }
  }
}

void nn_block_generic(const NnProduct& p, int64_t i0, int64_t i1, int64_t k0, int64_t k1) {
  isa_record(IsaKernel::kSkinny, Isa::kBaseline);
  const int64_t W = k1 - k0;
  std::vector<float> acc(W), row(W);
  for (int64_t i = i0; i < i1; ++i) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t n = 0; n < p.N; ++n) {
      const float gv = p.g.p[i * p.g.rs + n * p.g.cs];
      row_f32(p.w, n, k0, W, row.data());
      for (int64_t k = 0; k < W; ++k) acc[k] += gv * row[k];
    }
    if (p.colscale != nullptr) {
      for (int64_t k = 0; k < W; ++k) acc[k] *= p.colscale[k0 + k];
    }
    for (int64_t j = 0; j < p.R; ++j) {
      const float ev = p.e.p[i * p.e.rs + j * p.e.cs];
      row_f32(p.E, j, k0, W, row.data());
      for (int64_t k = 0; k < W; ++k) acc[k] += ev * row[k];
    }
    if (p.base.p != nullptr) {
      row_f32(p.base, i, k0, W, row.data());
      for (int64_t k = 0; k < W; ++k) acc[k] = row[k] + acc[k];
    }
    for (int64_t k = 0; k < W; ++k) store_elt(p.out.p, p.out.elt, i * p.out.ld + k0 + k, acc[k]);
  }
}

void transpose_generic(const MatRef& src, int64_t N, int64_t R, float* dst) {
  isa_record(IsaKernel::kSkinny, Isa::kBaseline);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t j = 0; j < R; ++j) dst[j * N + n] = load_elt(src.p, src.elt, n * src.ld + j);
  }
}

void skinny_nt(const NtProduct& p) {
  if (p.M <= 0 || p.N <= 0) return;
  TORCH_CHECK(p.colscale == nullptr || p.R == 0, "fused_lora_cpu: internal: skinny_nt colscale with a second term");
  const bool fast = use_avx2();
  constexpr int64_t kRows = 48, kCols = 96;  // kCols: a multiple of the AVX2 kernel's 24-row chunks of w
  const int64_t row_tasks = ceil_div(p.M, kRows), col_tasks = ceil_div(p.N, kCols);
  const int64_t work = std::min(p.M, kRows) * std::min(p.N, kCols) * std::max<int64_t>(1, p.K + p.R);
  at::parallel_for(0, row_tasks * col_tasks, std::max<int64_t>(1, kParallelWork / work), [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t i0 = (t / col_tasks) * kRows, n0 = (t % col_tasks) * kCols;
      const int64_t i1 = std::min(p.M, i0 + kRows), n1 = std::min(p.N, n0 + kCols);
      if (fast) {
        nt_block_avx2(p, i0, i1, n0, n1);
      } else {
        nt_block_generic(p, i0, i1, n0, n1);
      }
    }
  });
}

void skinny_nn(const NnProduct& p) {
  if (p.M <= 0 || p.K <= 0) return;
  TORCH_CHECK(p.colscale == nullptr || p.R == 0, "fused_lora_cpu: internal: skinny_nn colscale with a second term");
  const bool fast = use_avx2();
  constexpr int64_t kRows = 48;  // a multiple of the AVX2 tiles' row groups (3 and 4)
  const int64_t row_tasks = ceil_div(p.M, kRows);
  const int64_t depth = std::max<int64_t>(1, p.N + p.R);
  const int64_t total = p.M * p.K * depth;
  // Few, wide column ranges (one per thread when the rows alone do not fill the threads): each task then reads
  // long stretches of every row of w.
  const int64_t threads = total < kParallelWork ? 1 : at::get_num_threads();
  const int64_t col_tasks_wanted = std::max<int64_t>(1, ceil_div(threads, row_tasks));
  const int64_t cols = std::min(p.K, ceil_div(ceil_div(p.K, col_tasks_wanted), kNnColumnQuantum) * kNnColumnQuantum);
  const int64_t col_tasks = ceil_div(p.K, cols);
  const int64_t work = std::min(p.M, kRows) * cols * depth;
  at::parallel_for(0, row_tasks * col_tasks, std::max<int64_t>(1, kParallelWork / work), [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t i0 = (t / col_tasks) * kRows, k0 = (t % col_tasks) * cols;
      const int64_t i1 = std::min(p.M, i0 + kRows), k1 = std::min(p.K, k0 + cols);
      if (fast) {
        nn_block_avx2(p, i0, i1, k0, k1);
      } else {
        nn_block_generic(p, i0, i1, k0, k1);
      }
    }
  });
}

void transpose_to_f32(const MatRef& src, int64_t N, int64_t R, float* dst) {
  if (N <= 0 || R <= 0) return;
  if (use_avx2()) {
    transpose_avx2(src, N, R, dst);
  } else {
    transpose_generic(src, N, R, dst);
  }
}

}  // namespace fused_lora_cpu
