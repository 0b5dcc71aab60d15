// The skinny kernels (skinny.h): operand views, the split of a call into parallel tasks, the choice between the
// AVX2 tiles (skinny_avx2.cpp, from the avx2 level up) and the portable loops below (the baseline level).
#include "skinny.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
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

// Runs f(0) .. f(tasks - 1), on the pool's threads when `parallel`: each thread takes the next task from a shared
// counter, so a thread the OS deschedules (a machine shared with other jobs) holds up one task, not its static
// share. Results never depend on which thread ran a task.
template <typename F>
void run_tasks(int64_t tasks, bool parallel, const F& f) {
  const int64_t threads = at::get_num_threads();
  if (!parallel || tasks <= 1 || threads <= 1 || at::in_parallel_region()) {
    for (int64_t t = 0; t < tasks; ++t) f(t);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min(threads, tasks), 1, [&](int64_t, int64_t) {
    for (int64_t t = next.fetch_add(1); t < tasks; t = next.fetch_add(1)) f(t);
  });
}

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
  const bool parallel = p.M * p.N * std::max<int64_t>(1, p.K + p.R) >= kParallelWork;
  run_tasks(row_tasks * col_tasks, parallel, [&](int64_t t) {
    const int64_t i0 = (t / col_tasks) * kRows, n0 = (t % col_tasks) * kCols;
    const int64_t i1 = std::min(p.M, i0 + kRows), n1 = std::min(p.N, n0 + kCols);
    if (fast) {
      nt_block_avx2(p, i0, i1, n0, n1);
    } else {
      nt_block_generic(p, i0, i1, n0, n1);
    }
  });
}

namespace {

// One output row with a long reduction: the rows of w (and E) split into contiguous chunks, each summed into its
// own partial row by whichever thread takes it (w streamed in big contiguous pieces), the partials then added in
// chunk order (the same result whatever the scheduling).
void nn_single_row_split(const NnProduct& p) {
  constexpr int64_t kChunk = 256;  // rows of w per task
  const int64_t chunks = ceil_div(p.N, kChunk) + (p.R > 0 ? 1 : 0);
  const int64_t padded = ceil_div(p.K, 8) * 8;
  std::vector<float> partial(static_cast<size_t>(chunks * padded), 0.0f);
  run_tasks(chunks, true, [&](int64_t c) {
    float* acc = partial.data() + c * padded;
    if (c * kChunk < p.N) {
      nn_row_accumulate_avx2(p.g, p.w, 0, c * kChunk, std::min(p.N, (c + 1) * kChunk), 0, p.K, acc);
    } else {
      nn_row_accumulate_avx2(p.e, p.E, 0, 0, p.R, 0, p.K, acc);
    }
  });
  float* sum = partial.data();
  for (int64_t c = 1; c < chunks; ++c) {
    const float* part = partial.data() + c * padded;
    for (int64_t k = 0; k < p.K; ++k) sum[k] += part[k];
  }
  nn_row_finish_avx2(p, 0, 0, p.K, sum);
}

}  // namespace

void skinny_nn(const NnProduct& p) {
  if (p.M <= 0 || p.K <= 0) return;
  TORCH_CHECK(p.colscale == nullptr || p.R == 0, "fused_lora_cpu: internal: skinny_nn colscale with a second term");
  const bool fast = use_avx2();
  const int64_t depth = std::max<int64_t>(1, p.N + p.R);
  const bool parallel = p.M * p.K * depth >= kParallelWork;
  if (fast && parallel && p.M == 1 && at::get_num_threads() > 1) return nn_single_row_split(p);
  constexpr int64_t kRows = 48;  // a multiple of the AVX2 tiles' row groups (3 and 4)
  const int64_t row_tasks = ceil_div(p.M, kRows);
  // Wide column ranges (each task then reads long stretches of every row of w), a few per thread so that a
  // descheduled thread's share is taken over by the others. Where the tasks run one after another (one thread, or
  // inside a parallel region) the columns stay whole: cut into ranges, w would be read as short pieces of every
  // row, one range after the other, which streams w at about half the speed of whole rows (fp32, one row of dy).
  const bool spread = parallel && at::get_num_threads() > 1 && !at::in_parallel_region();
  const int64_t col_tasks_wanted = spread ? std::max<int64_t>(1, ceil_div(4 * at::get_num_threads(), row_tasks)) : 1;
  const int64_t cols = std::min(p.K, ceil_div(ceil_div(p.K, col_tasks_wanted), kNnColumnQuantum) * kNnColumnQuantum);
  const int64_t col_tasks = ceil_div(p.K, cols);
  run_tasks(row_tasks * col_tasks, parallel, [&](int64_t t) {
    const int64_t i0 = (t / col_tasks) * kRows, k0 = (t % col_tasks) * cols;
    const int64_t i1 = std::min(p.M, i0 + kRows), k1 = std::min(p.K, k0 + cols);
    if (fast) {
      nn_block_avx2(p, i0, i1, k0, k1);
    } else {
      nn_block_generic(p, i0, i1, k0, k1);
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
