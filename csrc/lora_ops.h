// The op contract (fused_lora/ops/CONTRACT.md) as C++ functions; registered in registration.cpp.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace fused_lora_cpu {

std::tuple<at::Tensor, at::Tensor> lora_fwd(const at::Tensor& x, const at::Tensor& weight,
                                            const c10::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                                            const at::Tensor& lora_b, const at::Tensor& scale,
                                            at::IntArrayRef rank_ptr, at::ArrayRef<double> dropout_p,
                                            const at::Tensor& seed);

std::tuple<c10::optional<at::Tensor>, at::Tensor, at::Tensor> lora_bwd(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& scale, const at::Tensor& t, at::IntArrayRef rank_ptr,
    at::ArrayRef<double> dropout_p, const at::Tensor& seed, bool need_dx);

std::tuple<at::Tensor, at::Tensor> lora_rows_fwd(const at::Tensor& x, const at::Tensor& weight,
                                                 const c10::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                                                 const at::Tensor& lora_b, const at::Tensor& scale,
                                                 at::IntArrayRef rank_ptr, const at::Tensor& row_ids,
                                                 at::ArrayRef<double> dropout_p, const at::Tensor& seed);

std::tuple<c10::optional<at::Tensor>, at::Tensor, at::Tensor> lora_rows_bwd(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& scale, const at::Tensor& t, at::IntArrayRef rank_ptr,
    const at::Tensor& row_ids, at::ArrayRef<double> dropout_p, const at::Tensor& seed, bool need_dx);

at::Tensor lora_merge_(const at::Tensor& weight, const at::Tensor& lora_a, const at::Tensor& lora_b,
                       const at::Tensor& scale, double sign, bool fan_in_fan_out, bool safe);

at::Tensor dropout_keep(const at::Tensor& seed, int64_t M, int64_t K, double p, int64_t salt);

}  // namespace fused_lora_cpu
