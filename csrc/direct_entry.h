// Direct Python entries of the compute ops (lora_fwd, lora_bwd, lora_rows_fwd, lora_rows_bwd) on the extension
// module, beside their torch.ops.fused_lora_cpu registrations. See direct_entry.cpp.
#pragma once

#include <torch/extension.h>

namespace fused_lora_cpu {

void bind_direct_entries(pybind11::module_& m);

}  // namespace fused_lora_cpu
