// The float64 path of every op (lora_float64.cpp): taken when any input is float64, as fused_lora.reference
// does, so that torch.autograd.gradcheck can run against this backend. Results: y/dx in x's dtype, dA/dB in
// the adapters' dtype, t in float64.
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>
#include <tuple>

namespace fused_lora_cpu {

// True when the op must compute in float64 (any of the given tensors is float64).
inline bool computes_in_float64(std::initializer_list<const at::Tensor*> tensors) {
  for (const at::Tensor* t : tensors) {
    if (t->scalar_type() == at::kDouble) return true;
  }
  return false;
}

std::tuple<at::Tensor, at::Tensor> lora_fwd_float64(const at::Tensor& x, const at::Tensor& weight,
                                                    const c10::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                                                    const at::Tensor& lora_b, const at::Tensor& scale,
                                                    at::IntArrayRef rank_ptr, at::ArrayRef<double> dropout_p,
                                                    const at::Tensor& seed);

std::tuple<c10::optional<at::Tensor>, at::Tensor, at::Tensor> lora_bwd_float64(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& scale, const at::Tensor& t, at::IntArrayRef rank_ptr,
    at::ArrayRef<double> dropout_p, const at::Tensor& seed, bool need_dx);

std::tuple<at::Tensor, at::Tensor> lora_rows_fwd_float64(const at::Tensor& x, const at::Tensor& weight,
                                                         const c10::optional<at::Tensor>& bias,
                                                         const at::Tensor& lora_a, const at::Tensor& lora_b,
                                                         const at::Tensor& scale, at::IntArrayRef rank_ptr,
                                                         const at::Tensor& row_ids, at::ArrayRef<double> dropout_p,
                                                         const at::Tensor& seed);

std::tuple<c10::optional<at::Tensor>, at::Tensor, at::Tensor> lora_rows_bwd_float64(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& scale, const at::Tensor& t, at::IntArrayRef rank_ptr,
    const at::Tensor& row_ids, at::ArrayRef<double> dropout_p, const at::Tensor& seed, bool need_dx);

at::Tensor lora_merge_float64_(const at::Tensor& weight, const at::Tensor& lora_a, const at::Tensor& lora_b,
                               const at::Tensor& scale, double sign, bool fan_in_fan_out, bool safe);

}  // namespace fused_lora_cpu
