// fp32 <-> {fp32, fp16, bf16} row conversions with one round-to-nearest-even, vectorised per ISA clone.
// Own loops (not Tensor::copy_) because they run per row inside parallel blocks, where a dispatcher call per
// row would cost more than the conversion itself.
#include "common.h"

#include <cstring>
#include <vector>

namespace fused_lora_cpu {

namespace {

inline float bf16_bits_to_float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint16_t float_to_bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

FUSED_LORA_CLONES
void bf16_to_f32(const uint16_t* src, int64_t stride, int64_t n, float* dst) {
  if (stride == 1) {
    for (int64_t i = 0; i < n; ++i) dst[i] = bf16_bits_to_float(src[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = bf16_bits_to_float(src[i * stride]);
  }
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define FUSED_LORA_HAVE_FLOAT16 1
#endif

#ifdef FUSED_LORA_HAVE_FLOAT16
// _Float16 compiles to F16C/AVX-512 conversions in the clones that have them.
FUSED_LORA_CLONES
void f16_to_f32(const uint16_t* src, int64_t stride, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; ++i) {
    _Float16 h;
    std::memcpy(&h, src + i * stride, sizeof h);
    dst[i] = static_cast<float>(h);
  }
}
#else
void f16_to_f32(const uint16_t* src, int64_t stride, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(c10::Half(src[i * stride], c10::Half::from_bits()));
}
#endif

FUSED_LORA_CLONES
void f32_to_f32(const float* src, int64_t stride, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i * stride];
}

FUSED_LORA_CLONES
void f32_to_bf16(const float* src, int64_t n, uint16_t* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = float_to_bf16_bits(src[i]);
}

#ifdef FUSED_LORA_HAVE_FLOAT16
FUSED_LORA_CLONES
void f32_to_f16(const float* src, int64_t n, uint16_t* dst) {
  for (int64_t i = 0; i < n; ++i) {
    const _Float16 h = static_cast<_Float16>(src[i]);
    std::memcpy(dst + i, &h, sizeof h);
  }
}
#else
void f32_to_f16(const float* src, int64_t n, uint16_t* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = c10::Half(src[i]).x;
}
#endif

FUSED_LORA_CLONES
void add_inplace(float* dst, const float* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] += src[i];
}

}  // namespace

void row_to_fp32(const void* src, at::ScalarType dtype, int64_t stride, int64_t n, float* dst) {
  switch (dtype) {
    case at::kFloat: f32_to_f32(static_cast<const float*>(src), stride, n, dst); break;
    case at::kBFloat16: bf16_to_f32(static_cast<const uint16_t*>(src), stride, n, dst); break;
    case at::kHalf: f16_to_f32(static_cast<const uint16_t*>(src), stride, n, dst); break;
    default: TORCH_CHECK(false, "fused_lora_cpu: unsupported dtype ", dtype);
  }
}

void row_from_fp32(const float* src, int64_t n, at::ScalarType dtype, void* dst) {
  switch (dtype) {
    case at::kFloat: std::memcpy(dst, src, n * sizeof(float)); break;
    case at::kBFloat16: f32_to_bf16(src, n, static_cast<uint16_t*>(dst)); break;
    case at::kHalf: f32_to_f16(src, n, static_cast<uint16_t*>(dst)); break;
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
    add_inplace(sum.data(), src + r * cols, cols);
    row_from_fp32(sum.data(), cols, dtype, row);
  }
}

at::Tensor fp32_view(float* data, int64_t rows, int64_t cols) {
  return at::from_blob(data, {rows, cols}, at::TensorOptions().dtype(at::kFloat));
}

}  // namespace fused_lora_cpu
