// Shared pieces of the C++ CPU backend: dropout plans, fp32 staging of row blocks, and how the base GEMM
// (x @ W^T, or dy @ W) and the LoRA term meet in one output.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <initializer_list>
#include <utility>
#include <vector>

#include "gemm_choice.h"
#include "isa.h"

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

// dst[i] *= mult[i] (the active ISA level's build).
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
// Same rows, dst[row] = round(dst[row] + src[i]): the sum taken in fp32, rounded once.
void add_rows_from_fp32(const float* src, int64_t nrows, at::Tensor& dst, const int64_t* rows, int64_t row0);

// Rows of a 2-D matrix as fp32 with unit column stride: the matrix itself where it is fp32 with unit column stride
// (any row stride), else a converted copy in `buf` (ld = columns).
struct RowsF32 {
  const float* p;
  int64_t ld;
};
RowsF32 rows_as_fp32(const at::Tensor& t, std::vector<float>& buf);

// t itself where its columns are adjacent (stride(1) == 1, or a single column), else a contiguous copy.
at::Tensor unit_columns(const at::Tensor& t);

// t as contiguous fp32: t itself when it is so already, decided without a dispatcher call (Tensor::to goes through
// the dispatcher even when it returns t: a measurable part of a decode-sized call), else a converted copy.
inline at::Tensor fp32_contiguous(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat && t.is_contiguous() ? t : t.to(at::kFloat).contiguous();
}

// fp32 view of a contiguous buffer as a tensor (no copy).
at::Tensor fp32_view(float* data, int64_t rows, int64_t cols);

// A 2-D operand as every vendor GEMM call here receives it: rows packed (stride(0) == size(1), stride(1) == 1), so
// nothing but the operand's own elements lies between its rows. The tensor itself when it is so already (every
// contiguous input), else a packed copy. Why: oneDNN's AMX brgemm (bf16/fp16, and fp32 under torch's bf16 matmul
// precision) reads each row's K tail up to a multiple of 32 columns and relies on B's zero padding to cancel the
// extra columns (uxlfoundation/oneDNN#5717); a NaN/Inf in a row's padding survives x * 0 and reaches the output.
at::Tensor gemm_operand(const at::Tensor& t);

// TypeError naming the op, the operand and its dtype unless the dtype is one the ops compute in
// (float32, float16, bfloat16, float64). Undefined tensors (an absent bias) pass.
void check_float_operands(const char* op, std::initializer_list<std::pair<const char*, const at::Tensor*>> operands);

// An output being assembled from the base GEMM and the LoRA term (+ bias), the base computed by the strategy the
// call chose (gemm_choice.h):
//   vendor, fp32:  acc is the output itself: the LoRA term is written first, then the GEMM adds onto it (beta = 1).
//   vendor, 16-bit: acc is the output itself and the base goes FIRST: the vendor GEMM writes x W^T rounded once
//                  (beta = 0: oneDNN's bf16 GEMM with a C read costs ~5% more than without), then the rank kernels
//                  load each row back as fp32, add bias + rank term and round once more. Two roundings, as
//                  CONTRACT.md documents.
//   mixed (16-bit): acc is an fp32 buffer: the LoRA term first, then MKL's mixed GEMM accumulates into it in fp32
//                  (beta = 1); finish() rounds once.
//   direct:        the base goes first, into acc in fp32 (the output itself for fp32, an fp32 buffer for 16-bit),
//                  by the skinny kernels; the LoRA term is added onto it; finish() rounds once.
struct LoraOutput {
  at::Tensor out;   // [M, N] in the output dtype
  at::Tensor acc;   // where the LoRA term goes (fp32 buffer or `out`)
  BaseGemm gemm = BaseGemm::kVendor;
  bool first = false;
  // The base GEMM runs before the LoRA term, which is then added to it.
  bool base_first() const { return first; }
  at::Tensor finish();
};

// Chooses the base GEMM (choose_base_gemm) and the accumulation for an [M, N] output of `dtype` (see LoraOutput).
LoraOutput make_lora_output(int64_t M, int64_t N, at::ScalarType dtype, GemmForm form);

// The base GEMM, a @ b^T (b_transposed = true: b is [N, Kc]) or a @ b (b is [Kc, N]); a and b share one dtype.
// Call both around the LoRA-term loop: the one that matches the output's mode runs, the other does nothing.
//   before: base_first() outputs: vendor: out = a @ op(b), rounded once; direct: acc = a @ op(b) in fp32.
//   after:  the others: acc += a @ op(b).
void base_gemm_before_lora(LoraOutput& o, const at::Tensor& a, const at::Tensor& b, bool b_transposed);
void base_gemm_after_lora(LoraOutput& o, const at::Tensor& a, const at::Tensor& b, bool b_transposed);

// Whether MKL's mixed-precision GEMM for 16-bit `dtype` inputs with fp32 output is in this process.
bool mixed_gemm_available(at::ScalarType dtype);
// c (fp32, [M, N], unit column stride) = beta * c + a @ op(b) with MKL's mixed GEMM (a, b: 16-bit, one dtype).
void mixed_gemm(at::Tensor& c, const at::Tensor& a, const at::Tensor& b, bool b_transposed, float beta);
// c (fp32, [M, N], unit column stride) = a @ op(b) with the skinny kernels (a, b: fp32/bf16/fp16, any strides).
void direct_gemm(at::Tensor& c, const at::Tensor& a, const at::Tensor& b, bool b_transposed);

// Puts fp32 LoRA-term rows into o (given by index list or contiguous range): written into acc (rounded if acc is
// low precision), or, for base_first() outputs, added onto the base already there.
inline void write_lora_rows(LoraOutput& o, const float* vals, int64_t nrows, const int64_t* rows, int64_t row0) {
  if (o.base_first()) {
    add_rows_from_fp32(vals, nrows, o.acc, rows, row0);
  } else {
    scatter_rows_from_fp32(vals, nrows, o.acc, rows, row0);
  }
}

// out[row] = round(bias + t[i] @ bt) for the rows given by index (or row0 + i), bt = B^T as [R, N] fp32 with
// row stride N; bias and t may be null (R = 0). With `accumulate`, out[row] = round(out[row] + bias + t[i] @ bt),
// out's row read as fp32 in the same pass. Rounds once into out's dtype.
void expand_rows(const float* t, int64_t ldt, int64_t nrows, int64_t R, const float* bt, int64_t N,
                 const float* bias, at::Tensor& out, const int64_t* rows, int64_t row0, bool accumulate);

// expand_rows into o: written into acc, or added onto the base for base_first() outputs.
inline void expand_lora_rows(LoraOutput& o, const float* t, int64_t ldt, int64_t nrows, int64_t R, const float* bt,
                             const float* bias, const int64_t* rows, int64_t row0) {
  expand_rows(t, ldt, nrows, R, bt, o.acc.size(1), bias, o.acc, rows, row0, o.base_first());
}

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
