// fp32 <-> {fp32, fp16, bf16} row conversions with one round-to-nearest-even, run by the active ISA level's build
// of the loops (isa_loops.h). Own loops (not Tensor::copy_) because they run per row inside parallel blocks, where
// a dispatcher call per row would cost more than the conversion itself.
#include "common.h"
#include "isa_loops.h"

#include <cstring>
#include <vector>

namespace fused_lora_cpu {

void row_to_fp32(const void* src, at::ScalarType dtype, int64_t stride, int64_t n, float* dst) {
  const LoopTable& l = loops(IsaKernel::kConvert);
  switch (dtype) {
    case at::kFloat: l.f32_to_f32(static_cast<const float*>(src), stride, n, dst); break;
    case at::kBFloat16: l.bf16_to_f32(static_cast<const uint16_t*>(src), stride, n, dst); break;
    case at::kHalf: l.f16_to_f32(static_cast<const uint16_t*>(src), stride, n, dst); break;
    default: TORCH_CHECK(false, "fused_lora_cpu: unsupported dtype ", dtype);
  }
}

void row_from_fp32(const float* src, int64_t n, at::ScalarType dtype, void* dst) {
  switch (dtype) {
    case at::kFloat: std::memcpy(dst, src, n * sizeof(float)); break;
    case at::kBFloat16: loops(IsaKernel::kConvert).f32_to_bf16(src, n, static_cast<uint16_t*>(dst)); break;
    case at::kHalf: loops(IsaKernel::kConvert).f32_to_f16(src, n, static_cast<uint16_t*>(dst)); break;
    default: TORCH_CHECK(false, "fused_lora_cpu: unsupported dtype ", dtype);
  }
}

void gather_rows_fp32(const at::Tensor& src, const int64_t* rows, int64_t nrows, float* dst) {
  const int64_t cols = src.size(1);
  const auto dtype = src.scalar_type();
  const int64_t s0 = src.stride(0), s1 = src.stride(1);
  const auto* base = static_cast<const char*>(src.const_data_ptr());
  const int64_t item = src.element_size();
  for (int64_t r = 0; r < nrows; ++r) {
    row_to_fp32(base + rows[r] * s0 * item, dtype, s1, cols, dst + r * cols);
  }
}

void rows_fp32(const at::Tensor& src, int64_t row0, int64_t nrows, float* dst) {
  const int64_t cols = src.size(1);
  const auto dtype = src.scalar_type();
  const int64_t s0 = src.stride(0), s1 = src.stride(1);
  const auto* base = static_cast<const char*>(src.const_data_ptr());
  const int64_t item = src.element_size();
  for (int64_t r = 0; r < nrows; ++r) {
    row_to_fp32(base + (row0 + r) * s0 * item, dtype, s1, cols, dst + r * cols);
  }
}

void scatter_rows_from_fp32(const float* src, int64_t nrows, at::Tensor& dst, const int64_t* rows, int64_t row0) {
  TORCH_CHECK(dst.is_contiguous(), "fused_lora_cpu: internal: destination must be contiguous");
  const int64_t cols = dst.size(1);
  const auto dtype = dst.scalar_type();
  auto* base = static_cast<char*>(dst.data_ptr());
  const int64_t item = dst.element_size();
  for (int64_t r = 0; r < nrows; ++r) {
    const int64_t row = rows ? rows[r] : row0 + r;
    row_from_fp32(src + r * cols, cols, dtype, base + row * cols * item);
  }
}

void add_rows_from_fp32(const float* src, int64_t nrows, at::Tensor& dst, const int64_t* rows, int64_t row0) {
  TORCH_CHECK(dst.is_contiguous(), "fused_lora_cpu: internal: destination must be contiguous");
  const int64_t cols = dst.size(1);
  const auto dtype = dst.scalar_type();
  auto* base = static_cast<char*>(dst.data_ptr());
  const int64_t item = dst.element_size();
  std::vector<float> sum(cols);
  for (int64_t r = 0; r < nrows; ++r) {
    char* row = base + (rows ? rows[r] : row0 + r) * cols * item;
    row_to_fp32(row, dtype, 1, cols, sum.data());
    loops(IsaKernel::kConvert).add_inplace(sum.data(), src + r * cols, cols);
    row_from_fp32(sum.data(), cols, dtype, row);
  }
}

RowsF32 rows_as_fp32(const at::Tensor& t, std::vector<float>& buf) {
  const int64_t rows = t.size(0), cols = t.size(1);
  if (t.scalar_type() == at::kFloat && (t.stride(1) == 1 || cols <= 1)) {
    return RowsF32{t.const_data_ptr<float>(), t.stride(0)};
  }
  buf.resize(static_cast<size_t>(rows * cols));
  rows_fp32(t, 0, rows, buf.data());
  return RowsF32{buf.data(), cols};
}

at::Tensor unit_columns(const at::Tensor& t) {
  return (t.stride(1) == 1 || t.size(1) <= 1) ? t : t.contiguous();
}

at::Tensor fp32_view(float* data, int64_t rows, int64_t cols) {
  return at::from_blob(data, {rows, cols}, at::TensorOptions().dtype(at::kFloat));
}

}  // namespace fused_lora_cpu
