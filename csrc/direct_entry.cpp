// Direct Python entries of the compute ops: fused_lora._C.lora_fwd(...) runs the same C++ function as
// torch.ops.fused_lora_cpu.lora_fwd(...), without the dispatcher's Python layer. At decode sizes that layer (the
// op packet's Python __call__, matching nine arguments against the schema, boxing them and two int/float lists
// into IValues, unboxing them again) cost as much as the op's own work; pybind's conversion of the same arguments
// costs a fraction of it.
//
// fused_lora.ops.cpp_backend calls these. Its callers are the op boundary's eager entry (plain tensors, no mode,
// no transform: fused_lora.ops.eager_call_ok) and the registered fused_lora::* ops' CPU implementation, which the
// dispatcher reaches after every mode and transform had its turn. Each entry does what the dispatcher would do
// before calling a CPU kernel, so the results are the same either way:
//   - runs below autograd (AutoDispatchBelowADInplaceOrView): the op's inner ATen calls record no graph;
//   - detaches inputs that require grad: at::parallel_for's worker threads do not inherit the guard above;
//   - a profiler's record under the op's name (RECORD_FUNCTION; nothing when no profiler runs);
//   - releases the GIL while the op runs.
#include "direct_entry.h"

#include <ATen/record_function.h>

#include <tuple>
#include <vector>

#include "lora_ops.h"

namespace fused_lora_cpu {

namespace {

namespace py = pybind11;

at::Tensor plain(const at::Tensor& t) { return t.defined() && t.requires_grad() ? t.detach() : t; }

c10::optional<at::Tensor> plain(const c10::optional<at::Tensor>& t) {
  if (!t.has_value()) return t;
  return plain(*t);
}

using Fwd = std::tuple<at::Tensor, at::Tensor>;
using Bwd = std::tuple<c10::optional<at::Tensor>, at::Tensor, at::Tensor>;

Fwd fwd(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
        const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& scale,
        const std::vector<int64_t>& rank_ptr, const std::vector<double>& dropout_p, const at::Tensor& seed) {
  RECORD_FUNCTION("fused_lora_cpu::lora_fwd", std::vector<c10::IValue>());
  const at::Tensor xp = plain(x), wp = plain(weight), ap = plain(lora_a), bp = plain(lora_b), sp = plain(scale);
  const c10::optional<at::Tensor> biasp = plain(bias);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return lora_fwd(xp, wp, biasp, ap, bp, sp, rank_ptr, dropout_p, seed);
}

Bwd bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a,
        const at::Tensor& lora_b, const at::Tensor& scale, const at::Tensor& t, const std::vector<int64_t>& rank_ptr,
        const std::vector<double>& dropout_p, const at::Tensor& seed, bool need_dx) {
  RECORD_FUNCTION("fused_lora_cpu::lora_bwd", std::vector<c10::IValue>());
  const at::Tensor dyp = plain(dy), xp = plain(x), wp = plain(weight), ap = plain(lora_a), bp = plain(lora_b),
                   sp = plain(scale), tp = plain(t);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return lora_bwd(dyp, xp, wp, ap, bp, sp, tp, rank_ptr, dropout_p, seed, need_dx);
}

Fwd rows_fwd(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
             const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& scale,
             const std::vector<int64_t>& rank_ptr, const at::Tensor& row_ids, const std::vector<double>& dropout_p,
             const at::Tensor& seed) {
  RECORD_FUNCTION("fused_lora_cpu::lora_rows_fwd", std::vector<c10::IValue>());
  const at::Tensor xp = plain(x), wp = plain(weight), ap = plain(lora_a), bp = plain(lora_b), sp = plain(scale);
  const c10::optional<at::Tensor> biasp = plain(bias);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return lora_rows_fwd(xp, wp, biasp, ap, bp, sp, rank_ptr, row_ids, dropout_p, seed);
}

Bwd rows_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a,
             const at::Tensor& lora_b, const at::Tensor& scale, const at::Tensor& t,
             const std::vector<int64_t>& rank_ptr, const at::Tensor& row_ids, const std::vector<double>& dropout_p,
             const at::Tensor& seed, bool need_dx) {
  RECORD_FUNCTION("fused_lora_cpu::lora_rows_bwd", std::vector<c10::IValue>());
  const at::Tensor dyp = plain(dy), xp = plain(x), wp = plain(weight), ap = plain(lora_a), bp = plain(lora_b),
                   sp = plain(scale), tp = plain(t);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return lora_rows_bwd(dyp, xp, wp, ap, bp, sp, tp, rank_ptr, row_ids, dropout_p, seed, need_dx);
}

}  // namespace

void bind_direct_entries(py::module_& m) {
  const auto no_gil = py::call_guard<py::gil_scoped_release>();
  m.def("lora_fwd", &fwd, no_gil, "torch.ops.fused_lora_cpu.lora_fwd without the dispatcher (CONTRACT.md)",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("lora_a"), py::arg("lora_b"), py::arg("scale"),
        py::arg("rank_ptr"), py::arg("dropout_p"), py::arg("seed"));
  m.def("lora_bwd", &bwd, no_gil, "torch.ops.fused_lora_cpu.lora_bwd without the dispatcher (CONTRACT.md)",
        py::arg("dy"), py::arg("x"), py::arg("weight"), py::arg("lora_a"), py::arg("lora_b"), py::arg("scale"),
        py::arg("t"), py::arg("rank_ptr"), py::arg("dropout_p"), py::arg("seed"), py::arg("need_dx"));
  m.def("lora_rows_fwd", &rows_fwd, no_gil,
        "torch.ops.fused_lora_cpu.lora_rows_fwd without the dispatcher (CONTRACT.md)", py::arg("x"),
        py::arg("weight"), py::arg("bias"), py::arg("lora_a"), py::arg("lora_b"), py::arg("scale"),
        py::arg("rank_ptr"), py::arg("row_ids"), py::arg("dropout_p"), py::arg("seed"));
  m.def("lora_rows_bwd", &rows_bwd, no_gil,
        "torch.ops.fused_lora_cpu.lora_rows_bwd without the dispatcher (CONTRACT.md)", py::arg("dy"), py::arg("x"),
        py::arg("weight"), py::arg("lora_a"), py::arg("lora_b"), py::arg("scale"), py::arg("t"),
        py::arg("rank_ptr"), py::arg("row_ids"), py::arg("dropout_p"), py::arg("seed"), py::arg("need_dx"));
}

}  // namespace fused_lora_cpu
