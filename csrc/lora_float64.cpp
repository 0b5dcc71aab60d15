// The float64 path of every op (see lora_float64.h). It exists for gradcheck and for float64 models, not for
// speed: plain ATen float64 GEMMs in the order fused_lora.reference uses, with the dropout masks regenerated
// by the same Philox code as the fast paths (so the bits match every other dtype and backend).
#include "common.h"
#include "lora_float64.h"

#include <algorithm>
#include <atomic>

namespace fused_lora_cpu {

namespace {

// float64 operands for the GEMMs below, rows packed like every vendor GEMM operand in this backend (gemm_operand).
at::Tensor f64(const at::Tensor& t) { return gemm_operand(t.to(at::kDouble)); }

// v * keep * inv_keep, where row r of v is logical row rows[r] of the [M, K] input (row r when rows is null):
// the multiplications of fused_lora.reference, so that both give the same float64 bits.
at::Tensor dropped(const at::Tensor& v, const DropoutPlan& plan, const int64_t* rows) {
  if (!plan.active) return v;
  const int64_t n = v.size(0), K = v.size(1);
  at::Tensor keep = at::empty({n, K}, at::TensorOptions().dtype(at::kBool));
  bool* keep_data = keep.data_ptr<bool>();
  at::parallel_for(0, n, kRowBlock, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) dropout_keep_flat(plan, (rows ? rows[r] : r) * K, K, keep_data + r * K);
  });
  return v * keep.to(at::kDouble) * static_cast<double>(plan.inv_keep);
}

std::vector<DropoutPlan> plans_for(const at::Tensor& seed, at::IntArrayRef rank_ptr, at::ArrayRef<double> dropout_p) {
  TORCH_CHECK(dropout_p.size() + 1 == rank_ptr.size(), "fused_lora_cpu: dropout_p has ", dropout_p.size(),
              " entries for ", rank_ptr.size() - 1, " adapters");
  return make_dropout_plans(seed, dropout_p);
}

// y = x W^T + bias in float64 (the base path, which never sees dropout).
at::Tensor base_linear(const at::Tensor& x64, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  at::Tensor y = at::mm(x64, f64(weight).t());
  if (bias.has_value() && bias->defined()) y.add_(f64(*bias));
  return y;
}

// Indices (int64, contiguous) of the rows that use adapter i, for every adapter.
std::vector<at::Tensor> rows_of_adapters(const at::Tensor& row_ids, int64_t n_adapters) {
  const at::Tensor ids = row_ids.to(at::kLong);
  std::vector<at::Tensor> rows;
  for (int64_t i = 0; i < n_adapters; ++i) rows.push_back(at::nonzero(ids.eq(i)).view({-1}).contiguous());
  return rows;
}

c10::optional<at::Tensor> dx_result(bool need_dx, const at::Tensor& dx64, const at::Tensor& x) {
  if (!need_dx) return c10::nullopt;
  return dx64.to(x.scalar_type());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> lora_fwd_float64(const at::Tensor& x, const at::Tensor& weight,
                                                    const c10::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                                                    const at::Tensor& lora_b, const at::Tensor& scale,
                                                    at::IntArrayRef rank_ptr, at::ArrayRef<double> dropout_p,
                                                    const at::Tensor& seed) {
  const auto plans = plans_for(seed, rank_ptr, dropout_p);
  const at::Tensor x64 = f64(x), a64 = f64(lora_a);
  at::Tensor t = at::zeros({x.size(0), lora_a.size(0)}, x64.options());
  for (size_t i = 0; i < plans.size(); ++i) {
    const int64_t lo = rank_ptr[i], r = rank_ptr[i + 1] - lo;
    if (r == 0) continue;
    t.narrow(1, lo, r).copy_(at::mm(dropped(x64, plans[i], nullptr), a64.narrow(0, lo, r).t()));
  }
  t.mul_(f64(scale));
  at::Tensor y = base_linear(x64, weight, bias).addmm_(t, f64(lora_b).t());
  return {y.to(x.scalar_type()), t};
}

std::tuple<c10::optional<at::Tensor>, at::Tensor, at::Tensor> lora_bwd_float64(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& scale, const at::Tensor& t, at::IntArrayRef rank_ptr,
    at::ArrayRef<double> dropout_p, const at::Tensor& seed, bool need_dx) {
  const auto plans = plans_for(seed, rank_ptr, dropout_p);
  const at::Tensor dy64 = f64(dy), x64 = f64(x), a64 = f64(lora_a);
  const at::Tensor db = at::mm(dy64.t(), f64(t));
  const at::Tensor ds = at::mm(dy64, f64(lora_b)).mul_(f64(scale));
  at::Tensor da = at::zeros_like(a64);
  at::Tensor dx = need_dx ? at::mm(dy64, f64(weight)) : at::Tensor();
  for (size_t i = 0; i < plans.size(); ++i) {
    const int64_t lo = rank_ptr[i], r = rank_ptr[i + 1] - lo;
    if (r == 0) continue;
    const at::Tensor ds_i = gemm_operand(ds.narrow(1, lo, r));
    da.narrow(0, lo, r).copy_(at::mm(ds_i.t(), dropped(x64, plans[i], nullptr)));
    // the mask applies to the [M, K] product dS_i A_i before it joins dx
    if (need_dx) dx.add_(dropped(at::mm(ds_i, a64.narrow(0, lo, r)), plans[i], nullptr));
  }
  return {dx_result(need_dx, dx, x), da.to(lora_a.scalar_type()), db.to(lora_b.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor> lora_rows_fwd_float64(const at::Tensor& x, const at::Tensor& weight,
                                                         const c10::optional<at::Tensor>& bias,
                                                         const at::Tensor& lora_a, const at::Tensor& lora_b,
                                                         const at::Tensor& scale, at::IntArrayRef rank_ptr,
                                                         const at::Tensor& row_ids, at::ArrayRef<double> dropout_p,
                                                         const at::Tensor& seed) {
  const auto plans = plans_for(seed, rank_ptr, dropout_p);
  const int64_t n = static_cast<int64_t>(plans.size());
  int64_t r_max = 1;
  for (int64_t i = 0; i < n; ++i) r_max = std::max(r_max, rank_ptr[i + 1] - rank_ptr[i]);
  const at::Tensor x64 = f64(x), a64 = f64(lora_a), b64 = f64(lora_b), s64 = f64(scale);
  const std::vector<at::Tensor> rows = rows_of_adapters(row_ids, n);
  at::Tensor t = at::zeros({x.size(0), r_max}, x64.options());
  at::Tensor y = base_linear(x64, weight, bias);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t lo = rank_ptr[i], r = rank_ptr[i + 1] - lo;
    const at::Tensor& idx = rows[i];
    if (r == 0 || idx.numel() == 0) continue;
    const at::Tensor xg = dropped(x64.index_select(0, idx), plans[i], idx.const_data_ptr<int64_t>());
    const at::Tensor ti = at::mm(xg, a64.narrow(0, lo, r).t()).mul_(s64.narrow(0, lo, r));
    t.narrow(1, 0, r).index_copy_(0, idx, ti);
    y.index_add_(0, idx, at::mm(ti, gemm_operand(b64.narrow(1, lo, r)).t()));
  }
  return {y.to(x.scalar_type()), t};
}

std::tuple<c10::optional<at::Tensor>, at::Tensor, at::Tensor> lora_rows_bwd_float64(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& scale, const at::Tensor& t, at::IntArrayRef rank_ptr,
    const at::Tensor& row_ids, at::ArrayRef<double> dropout_p, const at::Tensor& seed, bool need_dx) {
  const auto plans = plans_for(seed, rank_ptr, dropout_p);
  const int64_t n = static_cast<int64_t>(plans.size());
  const at::Tensor dy64 = f64(dy), x64 = f64(x), a64 = f64(lora_a), b64 = f64(lora_b), s64 = f64(scale);
  const at::Tensor t64 = f64(t);
  const std::vector<at::Tensor> rows = rows_of_adapters(row_ids, n);
  at::Tensor da = at::zeros_like(a64), db = at::zeros_like(b64);
  at::Tensor dx = need_dx ? at::mm(dy64, f64(weight)) : at::Tensor();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t lo = rank_ptr[i], r = rank_ptr[i + 1] - lo;
    const at::Tensor& idx = rows[i];
    if (r == 0 || idx.numel() == 0) continue;  // an adapter without rows gets zero gradients
    const int64_t* idx_data = idx.const_data_ptr<int64_t>();
    const at::Tensor dyg = dy64.index_select(0, idx);
    db.narrow(1, lo, r).copy_(at::mm(dyg.t(), gemm_operand(t64.index_select(0, idx).narrow(1, 0, r))));
    const at::Tensor ds = at::mm(dyg, gemm_operand(b64.narrow(1, lo, r))).mul_(s64.narrow(0, lo, r));
    da.narrow(0, lo, r).copy_(at::mm(ds.t(), dropped(x64.index_select(0, idx), plans[i], idx_data)));
    if (need_dx) dx.index_add_(0, idx, dropped(at::mm(ds, a64.narrow(0, lo, r)), plans[i], idx_data));
  }
  return {dx_result(need_dx, dx, x), da.to(lora_a.scalar_type()), db.to(lora_b.scalar_type())};
}

at::Tensor lora_merge_float64_(const at::Tensor& weight, const at::Tensor& lora_a, const at::Tensor& lora_b,
                               const at::Tensor& scale, double sign, bool fan_in_fan_out, bool safe) {
  const at::Tensor a64 = f64(lora_a).contiguous();                   // [R, K]
  const at::Tensor bs64 = f64(lora_b).mul(f64(scale)).contiguous();  // [N, R]
  // delta (in weight's layout) = left @ right; a panel of weight rows is the same panel of left's rows.
  // left packed: a panel of its rows is then a packed GEMM operand too
  const at::Tensor left = fan_in_fan_out ? a64.t().contiguous() : bs64;
  const at::Tensor right = fan_in_fan_out ? bs64.t() : a64;
  constexpr int64_t kPanelRows = 64;  // bounds the float64 temporaries to a panel per thread
  const int64_t npanels = (weight.size(0) + kPanelRows - 1) / kPanelRows;

  // The merged panel, accumulated in float64 and rounded once into weight's dtype.
  auto merged_panel = [&](int64_t row0, int64_t rows) {
    const at::Tensor delta = at::mm(left.narrow(0, row0, rows), right).mul_(sign);
    // out of place: for a float64 weight f64() is the weight itself, which the check pass must not touch
    return (f64(weight.narrow(0, row0, rows)) + delta).to(weight.scalar_type());
  };
  auto run = [&](bool write) {
    std::atomic<bool> finite{true};
    at::parallel_for(0, npanels, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        if (!write && !finite.load(std::memory_order_relaxed)) return;
        const int64_t row0 = p * kPanelRows, rows = std::min(kPanelRows, weight.size(0) - row0);
        const at::Tensor merged = merged_panel(row0, rows);
        if (write) {
          weight.narrow(0, row0, rows).copy_(merged);
        } else if (!at::isfinite(merged).all().item<bool>()) {
          finite.store(false, std::memory_order_relaxed);
          return;
        }
      }
    });
    return finite.load();
  };

  if (safe && !run(/*write=*/false)) return at::scalar_tensor(false, at::kBool);
  run(/*write=*/true);
  return at::scalar_tensor(true, at::kBool);
}

}  // namespace fused_lora_cpu
