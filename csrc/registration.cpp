// Registers the C++ CPU backend as torch.ops.fused_lora_cpu.<name> (schemas mirror CONTRACT.md) and gives the
// extension a Python module (`import fused_lora._C` loads it) with the ISA-level controls of isa.h, which
// fused_lora.ops.cpp_backend wraps.
#include <torch/extension.h>
#include <torch/library.h>

#include <cstdint>
#include <string>

#include "isa.h"
#include "isa_loops.h"
#include "lora_ops.h"

namespace {

namespace py = pybind11;
using fused_lora_cpu::Isa;

std::string levels_here() {
  std::string out;
  for (Isa level : fused_lora_cpu::isa_paths()) {
    if (!out.empty()) out += ", ";
    out += fused_lora_cpu::isa_name(level);
  }
  return out;
}

void set_isa(const std::string& name) {
  Isa level;
  if (!fused_lora_cpu::parse_isa(name, &level)) {
    throw py::value_error("ISA level '" + name + "' is not one of auto, baseline, avx2, avx512, avx512_bf16");
  }
  if (!fused_lora_cpu::set_active_isa(level)) {
    throw py::value_error("ISA level '" + name + "' cannot run here: this CPU (and this build) supports " +
                          levels_here());
  }
}

py::dict trace_counts() {
  const auto counts = fused_lora_cpu::isa_trace_counts();
  py::dict out;
  for (size_t k = 0; k < counts.size(); ++k) {
    py::dict per_level;
    for (size_t l = 0; l < counts[k].size(); ++l) {
      per_level[fused_lora_cpu::isa_name(static_cast<Isa>(l))] = counts[k][l];
    }
    out[fused_lora_cpu::isa_kernel_name(static_cast<fused_lora_cpu::IsaKernel>(k))] = per_level;
  }
  return out;
}

// Addresses of some functions of each level's build of the generic loops: distinct builds, distinct code.
py::dict loop_addresses() {
  py::dict out;
  for (Isa level : fused_lora_cpu::isa_paths()) {
    const fused_lora_cpu::LoopTable* t = fused_lora_cpu::loop_table_for(level);
    if (t == nullptr) continue;
    out[fused_lora_cpu::isa_name(level)] =
        py::make_tuple(reinterpret_cast<uintptr_t>(t->expand_tile), reinterpret_cast<uintptr_t>(t->philox_quads),
                       reinterpret_cast<uintptr_t>(t->f32_to_bf16), reinterpret_cast<uintptr_t>(t->add_check_finite));
  }
  return out;
}

}  // namespace

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
  m.def("isa_paths", [] {
    py::list out;
    for (Isa level : fused_lora_cpu::isa_paths()) out.append(fused_lora_cpu::isa_name(level));
    return out;
  }, "ISA levels this machine can run, lowest first");
  m.def("active_isa", [] { return std::string(fused_lora_cpu::isa_name(fused_lora_cpu::active_isa())); },
        "the ISA level the kernels run now");
  m.def("set_active_isa", &set_isa, "sets the ISA level (a name from isa_paths(), or 'auto'); ValueError otherwise");
  m.def("isa_env_message", [] { return fused_lora_cpu::isa_env_message(); },
        "why FUSED_LORA_CPU_ISA could not be honoured as given at load ('' when it was)");
  m.def("isa_trace", &fused_lora_cpu::isa_trace, "turns the dispatch trace on (clearing its counts) or off");
  m.def("isa_trace_counts", &trace_counts, "{kernel family: {level: dispatches}} since the trace was turned on");
  m.def("isa_loop_addresses", &loop_addresses, "{level: addresses of some of that level's generic loops}");
}
