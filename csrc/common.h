// Shared pieces of the C++ CPU backend: dropout plans, fp32 staging of row blocks, and the base GEMM
// that adds x @ W^T (or dy @ W) onto an output already holding the LoRA term.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <vector>

// Hot loops get one clone per x86-64 ISA level, picked at load time, so that a portable -O3 build still runs
// AVX-512/AVX2 code where the CPU has it.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FUSED_LORA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FUSED_LORA_CLONES
#endif

namespace fused_lora_cpu {

// Rows per block in row-parallel loops: 64 rows of fp32 at K=4096 is 1 MiB, about one core's L2.
constexpr int64_t kRowBlock = 64;

// One adapter's dropout, as CONTRACT.md defines it (Philox4x32-10, 24-bit threshold, float32 1/(1-p)).
struct DropoutPlan {
  bool active = false;     // p > 0: a mask is generated
  uint32_t key0 = 0, key1 = 0;
  uint32_t salt = 0;
  uint32_t threshold = 0;  // keep iff (word >> 8) >= threshold
  float inv_keep = 1.0f;
};

DropoutPlan make_dropout_plan(const at::Tensor& seed, double p, int64_t salt);
std::vector<DropoutPlan> make_dropout_plans(const at::Tensor& seed, at::ArrayRef<double> dropout_p);

// out[k] = keep(row, k) ? inv_keep : 0 for k in [0, K): the multiplier of x[row, k] (row = logical row of x).
void dropout_row_multipliers(const DropoutPlan& plan, int64_t row, int64_t K, float* out);
// keep[i] for the flat elements [e0, e0 + count) of the logical [M, K] input.
void dropout_keep_flat(const DropoutPlan& plan, int64_t e0, int64_t count, bool* keep);

// dst[i] *= mult[i] (vectorised clone per ISA).
void multiply_inplace(float* dst, const float* mult, int64_t n);
// dst[i] = a[i] * mult[i]
void multiply_into(float* dst, const float* a, const float* mult, int64_t n);

// One row of n elements (element stride `stride`) to fp32, and fp32 to a contiguous row rounded once (RNE).
void row_to_fp32(const void* src, at::ScalarType dtype, int64_t stride, int64_t n, float* dst);
void row_from_fp32(const float* src, int64_t n, at::ScalarType dtype, void* dst);

// Copies rows of `src` (any float dtype, any row stride, unit column stride or not) into a contiguous fp32
// buffer [rows.size(), cols]; rows given by their indices into src.
void gather_rows_fp32(const at::Tensor& src, const int64_t* rows, int64_t nrows, float* dst);
// Same for the contiguous row range [row0, row0 + nrows).
void rows_fp32(const at::Tensor& src, int64_t row0, int64_t nrows, float* dst);

// Writes fp32 rows [nrows, cols] into rows of `dst` (fp32/fp16/bf16, contiguous), rounding once.
// rows == nullptr means the contiguous range [row0, row0 + nrows).
void scatter_rows_from_fp32(const float* src, int64_t nrows, at::Tensor& dst, const int64_t* rows, int64_t row0);

// fp32 view of a contiguous buffer as a tensor (no copy).
at::Tensor fp32_view(float* data, int64_t rows, int64_t cols);

// An output being assembled in fp32-accumulate semantics. `acc` holds the LoRA term (+ bias) and then
// receives the base GEMM; `finish()` returns the result in `dtype`.
//   fp32:                acc is the output itself.
//   fp16/bf16 "exact":   acc is an fp32 buffer; the base GEMM accumulates into it in fp32 and finish() rounds once.
//   fp16/bf16 "fast":    acc is the low-precision output itself, holding the LoRA term rounded once; the
//                        GEMM (oneDNN/MKL, fp32 accumulation) adds onto it with one more rounding at the end.
struct LoraOutput {
  at::Tensor out;   // [M, N] in the output dtype
  at::Tensor acc;   // where the LoRA term is written (fp32 buffer or `out`)
  bool exact = true;
  at::Tensor finish();
};

// Chooses the accumulation strategy for an [M, N] output of `dtype` (see LoraOutput).
LoraOutput make_lora_output(int64_t M, int64_t N, at::ScalarType dtype);

// acc += a @ b^T (b_transposed = true: b is [N, Kc]) or a @ b (b is [Kc, N]); a and b share one dtype.
void add_base_gemm(LoraOutput& o, const at::Tensor& a, const at::Tensor& b, bool b_transposed);

// Fills rows of o.acc (given by index list or contiguous range) from fp32 values, rounding if acc is low precision.
inline void write_lora_rows(LoraOutput& o, const float* vals, int64_t nrows, const int64_t* rows, int64_t row0) {
  scatter_rows_from_fp32(vals, nrows, o.acc, rows, row0);
}

// out[row] = round(bias + t[i] @ bt) for the rows given by index (or row0 + i), bt = B^T as [R, N] fp32 with
// row stride N; bias may be null. Rounds once into out's dtype.
void expand_rows(const float* t, int64_t ldt, int64_t nrows, int64_t R, const float* bt, int64_t N,
                 const float* bias, at::Tensor& out, const int64_t* rows, int64_t row0);

// t[i, :R] = x[i] @ a^T for bf16 x (row stride ldx, unit column stride) and bf16 a [R, K], fp32 accumulation.
bool bf16_shrink_available();
void shrink_rows_bf16(const at::BFloat16* x, int64_t ldx, int64_t nrows, const at::BFloat16* a, int64_t R,
                      int64_t K, float* t, int64_t ldt);

// acc[R, W] (fp32, contiguous) += coef[rows, R]^T @ src[rows, W] where src is fp32 or bf16 with unit column
// stride, read as is. Returns false (nothing done) where the kernel does not apply; the caller falls back.
bool outer_acc_direct(const at::Tensor& src, const float* coef, int64_t ldc, int64_t R, float* acc);

// Per-thread partial sums of a parallel loop (dA, dB), reduced after it.
struct Partials {
  at::Tensor buf;  // [threads, rows, cols] fp32, zeroed
  Partials(int64_t rows, int64_t cols) : buf(at::zeros({at::get_num_threads(), rows, cols}, at::kFloat)) {}
  // modulo: called from inside an outer parallel region, the loop runs serially on that region's thread
  at::Tensor mine() { return buf[at::get_thread_num() % buf.size(0)]; }
  at::Tensor sum() { return buf.sum(0); }
};

// The [N] bias as fp32 (empty when absent).
std::vector<float> bias_fp32(const c10::optional<at::Tensor>& bias, int64_t N);

}  // namespace fused_lora_cpu
