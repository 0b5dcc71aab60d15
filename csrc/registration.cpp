// Registers the C++ CPU backend as torch.ops.fused_lora_cpu.<name> (schemas mirror CONTRACT.md) and gives the
// extension a Python module init so that `import fused_lora._C` loads it.
#include <torch/extension.h>
#include <torch/library.h>

#include "lora_ops.h"

TORCH_LIBRARY(fused_lora_cpu, m) {
  m.def("lora_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, Tensor scale, "
        "int[] rank_ptr, float[] dropout_p, Tensor seed) -> (Tensor, Tensor)");
  m.def("lora_bwd(Tensor dy, Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b, Tensor scale, Tensor t, "
        "int[] rank_ptr, float[] dropout_p, Tensor seed, bool need_dx) -> (Tensor?, Tensor, Tensor)");
  m.def("lora_rows_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, Tensor scale, "
        "int[] rank_ptr, Tensor row_ids, float[] dropout_p, Tensor seed) -> (Tensor, Tensor)");
  m.def("lora_rows_bwd(Tensor dy, Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b, Tensor scale, "
        "Tensor t, int[] rank_ptr, Tensor row_ids, float[] dropout_p, Tensor seed, bool need_dx) "
        "-> (Tensor?, Tensor, Tensor)");
  m.def("lora_merge_(Tensor(a!) weight, Tensor lora_a, Tensor lora_b, Tensor scale, float sign, "
        "bool fan_in_fan_out, bool safe) -> Tensor");
  m.def("dropout_keep(Tensor seed, int M, int K, float p, int salt) -> Tensor");
}

TORCH_LIBRARY_IMPL(fused_lora_cpu, CPU, m) {
  m.impl("lora_fwd", &fused_lora_cpu::lora_fwd);
  m.impl("lora_bwd", &fused_lora_cpu::lora_bwd);
  m.impl("lora_rows_fwd", &fused_lora_cpu::lora_rows_fwd);
  m.impl("lora_rows_bwd", &fused_lora_cpu::lora_rows_bwd);
  m.impl("lora_merge_", &fused_lora_cpu::lora_merge_);
  m.impl("dropout_keep", &fused_lora_cpu::dropout_keep);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fused_lora C++ CPU backend; ops live in torch.ops.fused_lora_cpu";
}
