// Registers the C++ CPU backend as torch.ops.fused_lora_cpu.<name> (schemas mirror CONTRACT.md) and gives the
// extension a Python module (`import fused_lora._C` loads it) with the compute ops' direct entries
// (direct_entry.cpp) and the ISA-level controls of isa.h, which fused_lora.ops.cpp_backend wraps.
#include <torch/extension.h>
#include <torch/library.h>

#include <cstdint>
#include <string>

#include "common.h"
#include "direct_entry.h"
#include "gemm_choice.h"
#include "isa.h"
#include "isa_loops.h"
#include "lora_ops.h"
#include "skinny.h"

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

py::dict gemm_counts() {
  const auto counts = fused_lora_cpu::gemm_trace_counts();
  py::dict out;
  for (size_t g = 0; g < counts.size(); ++g) {
    out[fused_lora_cpu::base_gemm_name(static_cast<fused_lora_cpu::BaseGemm>(g))] = counts[g];
  }
  return out;
}

// The skinny kernels on their own (tests: every tile shape, tail and dtype against float64), fresh outputs.
at::Tensor skinny_nt_py(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& colscale) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1),
              "skinny_nt: x must be fp32 [M, K] and w [N, K]");
  const at::Tensor xu = fused_lora_cpu::unit_columns(x), wu = fused_lora_cpu::unit_columns(w);
  at::Tensor cs = colscale.has_value() ? colscale->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor out = at::empty({x.size(0), w.size(0)}, at::kFloat);
  fused_lora_cpu::NtProduct p;
  p.M = x.size(0);
  p.N = w.size(0);
  p.K = x.size(1);
  p.x = xu.const_data_ptr<float>();
  p.ldx = xu.stride(0);
  p.w = fused_lora_cpu::mat_ref(wu);
  p.colscale = cs.defined() ? cs.const_data_ptr<float>() : nullptr;
  p.out = fused_lora_cpu::out_ref(out);
  fused_lora_cpu::skinny_nt(p);
  return out;
}

// The fused forward form: round(base + x @ w^T + e @ E^T + bias) in out_dtype (x, e fp32; bias fp32).
at::Tensor skinny_nt_fused_py(const at::Tensor& x, const c10::optional<at::Tensor>& w, const at::Tensor& e,
                              const at::Tensor& E, const c10::optional<at::Tensor>& bias,
                              const c10::optional<at::Tensor>& base, at::ScalarType out_dtype) {
  using namespace fused_lora_cpu;
  TORCH_CHECK(x.scalar_type() == at::kFloat && e.scalar_type() == at::kFloat, "skinny_nt_fused: x and e fp32");
  const at::Tensor xu = unit_columns(x), eu = unit_columns(e), Eu = unit_columns(E);
  at::Tensor wu, bu, bias32;
  NtProduct p;
  p.M = x.size(0);
  p.N = E.size(0);
  p.R = E.size(1);
  p.x = xu.const_data_ptr<float>();
  p.ldx = xu.stride(0);
  p.e = eu.const_data_ptr<float>();
  p.lde = eu.stride(0);
  p.E = mat_ref(Eu);
  if (w.has_value()) {
    wu = unit_columns(*w);
    p.K = x.size(1);
    p.w = mat_ref(wu);
  }
  if (bias.has_value()) {
    bias32 = bias->to(at::kFloat).contiguous();
    p.bias = bias32.const_data_ptr<float>();
  }
  if (base.has_value()) {
    bu = unit_columns(*base);
    p.base = mat_ref(bu);
  }
  at::Tensor out = at::empty({p.M, p.N}, at::TensorOptions().dtype(out_dtype));
  p.out = out_ref(out);
  skinny_nt(p);
  return out;
}

// out = round(base + colscale * (g @ w) + e @ E) in out_dtype; g and e fp32 with any strides.
at::Tensor skinny_nn_py(const at::Tensor& g, const c10::optional<at::Tensor>& w,
                        const c10::optional<at::Tensor>& colscale, const c10::optional<at::Tensor>& e,
                        const c10::optional<at::Tensor>& E, const c10::optional<at::Tensor>& base,
                        at::ScalarType out_dtype) {
  using namespace fused_lora_cpu;
  TORCH_CHECK(g.scalar_type() == at::kFloat && g.dim() == 2, "skinny_nn: g must be fp32 2-D");
  NnProduct p;
  p.M = g.size(0);
  at::Tensor wu, eu, Eu, bu, cs;
  if (w.has_value()) {
    wu = unit_columns(*w);
    p.N = g.size(1);
    p.K = wu.size(1);
    p.g = StridedF32{g.const_data_ptr<float>(), g.stride(0), g.stride(1)};
    p.w = mat_ref(wu);
  }
  if (E.has_value()) {
    TORCH_CHECK(e.has_value() && e->scalar_type() == at::kFloat, "skinny_nn: E needs fp32 e");
    Eu = unit_columns(*E);
    p.R = e->size(1);
    p.K = Eu.size(1);
    p.e = StridedF32{e->const_data_ptr<float>(), e->stride(0), e->stride(1)};
    p.E = mat_ref(Eu);
  }
  if (colscale.has_value()) {
    cs = colscale->to(at::kFloat).contiguous();
    p.colscale = cs.const_data_ptr<float>();
  }
  if (base.has_value()) {
    bu = unit_columns(*base);
    p.K = bu.size(1);
    p.base = mat_ref(bu);
  }
  at::Tensor out = at::empty({p.M, p.K}, at::TensorOptions().dtype(out_dtype));
  p.out = out_ref(out);
  skinny_nn(p);
  return out;
}

at::Tensor transpose_to_f32_py(const at::Tensor& src) {
  const at::Tensor su = fused_lora_cpu::unit_columns(src);
  at::Tensor out = at::empty({src.size(1), src.size(0)}, at::kFloat);
  fused_lora_cpu::transpose_to_f32(fused_lora_cpu::mat_ref(su), src.size(0), src.size(1), out.data_ptr<float>());
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
  m.doc() = "fused_lora C++ CPU backend; ops live in torch.ops.fused_lora_cpu (the compute ops also here, direct)";
  fused_lora_cpu::bind_direct_entries(m);
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
  m.def("gemm_rule", &fused_lora_cpu::gemm_rule_text, "what the base-GEMM rule decided on this machine, and why");
  m.def("base_gemm_for", [](at::ScalarType dtype, int64_t rows, bool backward) {
    const auto form = backward ? fused_lora_cpu::GemmForm::kNN : fused_lora_cpu::GemmForm::kNT;
    return std::string(fused_lora_cpu::base_gemm_name(fused_lora_cpu::choose_base_gemm(dtype, rows, form)));
  }, "the base GEMM (vendor, mixed, direct) the forward (backward: dx) of a call with inputs of `dtype` and `rows` "
     "rows takes now", py::arg("dtype"), py::arg("rows"), py::arg("backward") = false);
  m.def("gemm_trace", &fused_lora_cpu::gemm_trace, "turns the base-GEMM trace on (clearing its counts) or off");
  m.def("gemm_trace_counts", &gemm_counts, "{strategy: calls} since the trace was turned on");
  m.def("skinny_nt", &skinny_nt_py, "x (fp32 [M, K]) @ w^T * colscale, the skinny NT kernel (tests)",
        py::arg("x"), py::arg("w"), py::arg("colscale") = py::none());
  m.def("skinny_nt_fused", &skinny_nt_fused_py, "round(base + x @ w^T + e @ E^T + bias), the fused NT form (tests)",
        py::arg("x"), py::arg("w"), py::arg("e"), py::arg("E"), py::arg("bias") = py::none(),
        py::arg("base") = py::none(), py::arg("out_dtype") = at::kFloat);
  m.def("skinny_nn", &skinny_nn_py, "round(base + colscale * (g @ w) + e @ E), the skinny NN kernel (tests)",
        py::arg("g"), py::arg("w") = py::none(), py::arg("colscale") = py::none(), py::arg("e") = py::none(),
        py::arg("E") = py::none(), py::arg("base") = py::none(), py::arg("out_dtype") = at::kFloat);
  m.def("transpose_to_f32", &transpose_to_f32_py, "src [N, R] -> src^T as fp32 (tests)");
}
