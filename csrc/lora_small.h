// lora_fwd / lora_bwd for few rows (decode, small batches): every product through the skinny kernels (skinny.h)
// except the base, which follows the call's strategy (gemm_choice.h); adapters read in their own dtype, no fp32
// copies of A or B, no per-thread partial sums, no parallel region unless the work pays for it.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

#include "common.h"

namespace fused_lora_cpu {

// Rows up to which lora_fwd / lora_bwd take this path (above it, the row-block loops of lora_dense.cpp).
constexpr int64_t kSmallRows = 64;

inline bool takes_small_path(int64_t M, int64_t N, int64_t K) {
  return M > 0 && M <= kSmallRows && N > 0 && K > 0;
}

// Arguments as lora_fwd's (validated, not float64).
std::tuple<at::Tensor, at::Tensor> lora_fwd_small(const at::Tensor& x, const at::Tensor& weight,
                                                  const c10::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                                                  const at::Tensor& lora_b, const at::Tensor& scale,
                                                  at::IntArrayRef rank_ptr, const std::vector<DropoutPlan>& plans);

// Arguments as lora_bwd's (validated, not float64).
std::tuple<c10::optional<at::Tensor>, at::Tensor, at::Tensor> lora_bwd_small(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& scale, const at::Tensor& t, at::IntArrayRef rank_ptr,
    const std::vector<DropoutPlan>& plans, bool need_dx);

}  // namespace fused_lora_cpu
