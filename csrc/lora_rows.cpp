// lora_rows_fwd / lora_rows_bwd (CONTRACT.md): row m uses adapter row_ids[m], or none when -1.
//
// Rows are grouped by adapter with a counting sort; each group is cut into blocks of up to 64 rows, and the
// blocks of all adapters form one parallel loop (the loop over adapters lives here, not in Python). A block
// gathers its rows in fp32, runs its adapter's small GEMMs and scatters the rank term into the output rows.
// One vendor GEMM makes x W^T for all rows at once, after the rank term (fp32, 16-bit "exact": beta = 1) or
// before it (16-bit "fast": beta = 0, the rank term then added onto the rounded base; see LoraOutput).
#include "common.h"
#include "lora_float64.h"
#include "lora_ops.h"

#include <algorithm>

namespace fused_lora_cpu {

namespace {

struct RowBlock {
  int64_t adapter;  // -1: rows without an adapter
  int64_t begin;    // offset into RowGroups::order
  int64_t count;
};

struct RowGroups {
  std::vector<int64_t> order;  // row indices, grouped by adapter (rows without an adapter first)
  std::vector<RowBlock> blocks;
};

void check_row_ids(const char* op, const at::Tensor& row_ids) {
  const auto dtype = row_ids.scalar_type();
  TORCH_CHECK_TYPE(at::isIntegralType(dtype, /*includeBool=*/false), "fused_lora_cpu.", op,
                   ": row_ids has dtype torch.", c10::getDtypeNames(dtype).first,
                   "; expected an integer dtype (torch.int64)");
}

// Ids outside [-1, n) act as -1 (CONTRACT.md): callers check ids where they can; where they cannot (CUDA graph
// capture, torch.compile) every backend gives such a row no adapter.
RowGroups group_rows(const at::Tensor& row_ids, int64_t n_adapters) {
  const at::Tensor ids = row_ids.to(at::kLong).contiguous();
  const int64_t M = ids.numel();
  const int64_t* raw = ids.const_data_ptr<int64_t>();
  std::vector<int64_t> id(raw, raw + M);
  for (int64_t& a : id) {
    if (a < -1 || a >= n_adapters) a = -1;
  }
  std::vector<int64_t> start(n_adapters + 2, 0);  // bucket b = adapter + 1
  for (int64_t m = 0; m < M; ++m) ++start[id[m] + 2];
  for (int64_t b = 1; b < n_adapters + 2; ++b) start[b] += start[b - 1];
  RowGroups g;
  g.order.resize(M);
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t m = 0; m < M; ++m) g.order[fill[id[m] + 1]++] = m;
  for (int64_t b = 0; b <= n_adapters; ++b) {
    for (int64_t s = start[b]; s < start[b + 1]; s += kRowBlock) {
      g.blocks.push_back({b - 1, s, std::min(kRowBlock, start[b + 1] - s)});
    }
  }
  return g;
}

// Gathered rows of x in fp32, each multiplied by its dropout mask (kept in `mult` for reuse) when active.
void gather_dropped(const at::Tensor& x, const int64_t* rows, int64_t count, const DropoutPlan& plan,
                    std::vector<float>& xg, std::vector<float>& mult) {
  const int64_t K = x.size(1);
  xg.resize(count * K);
  gather_rows_fp32(x, rows, count, xg.data());
  if (!plan.active) return;
  mult.resize(count * K);
  for (int64_t r = 0; r < count; ++r) {
    dropout_row_multipliers(plan, rows[r], K, mult.data() + r * K);
  }
  multiply_inplace(xg.data(), mult.data(), count * K);
}


}  // namespace

std::tuple<at::Tensor, at::Tensor> lora_rows_fwd(const at::Tensor& x, const at::Tensor& weight,
                                                 const c10::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                                                 const at::Tensor& lora_b, const at::Tensor& scale,
                                                 at::IntArrayRef rank_ptr, const at::Tensor& row_ids,
                                                 at::ArrayRef<double> dropout_p, const at::Tensor& seed) {
  const at::Tensor bias_t = bias.has_value() ? *bias : at::Tensor();
  check_float_operands("lora_rows_fwd", {{"x", &x}, {"weight", &weight}, {"bias", &bias_t}, {"lora_a", &lora_a},
                                         {"lora_b", &lora_b}, {"scale", &scale}});
  check_row_ids("lora_rows_fwd", row_ids);
  if (computes_in_float64({&x, &weight, &lora_a})) {
    return lora_rows_fwd_float64(x, weight, bias, lora_a, lora_b, scale, rank_ptr, row_ids, dropout_p, seed);
  }
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  const int64_t n = static_cast<int64_t>(rank_ptr.size()) - 1;
  int64_t r_max = 1;
  for (int64_t i = 0; i < n; ++i) r_max = std::max(r_max, rank_ptr[i + 1] - rank_ptr[i]);
  const auto plans = make_dropout_plans(seed, dropout_p);
  const at::Tensor a32 = fp32_contiguous(lora_a);
  const at::Tensor bt32 = lora_b.to(at::kFloat).t().contiguous();  // [R, N]
  const at::Tensor scale32 = fp32_contiguous(scale);
  const std::vector<float> bias32 = bias_fp32(bias, N);
  const float* bias_ptr = bias32.empty() ? nullptr : bias32.data();
  const RowGroups g = group_rows(row_ids, n);

  at::Tensor t = at::zeros({M, r_max}, at::kFloat);
  LoraOutput o = make_lora_output(M, N, x.scalar_type(), GemmForm::kNT);
  const int64_t nblocks = static_cast<int64_t>(g.blocks.size());

  base_gemm_before_lora(o, x, weight, /*b_transposed=*/true);
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> xg, mult;
    for (int64_t bi = b0; bi < b1; ++bi) {
      const RowBlock& blk = g.blocks[bi];
      const int64_t* rows = g.order.data() + blk.begin;
      if (blk.adapter < 0) {
        // Only the bias; a base already in place needs nothing more when there is none.
        if (bias_ptr != nullptr || !o.base_first()) {
          expand_lora_rows(o, nullptr, 0, blk.count, 0, nullptr, bias_ptr, rows, 0);
        }
        continue;
      }
      const int64_t lo = rank_ptr[blk.adapter], r = rank_ptr[blk.adapter + 1] - lo;
      gather_dropped(x, rows, blk.count, plans[blk.adapter], xg, mult);
      const at::Tensor tg = at::mm(fp32_view(xg.data(), blk.count, K), a32.narrow(0, lo, r).t())
                                .mul_(scale32.narrow(0, lo, r));
      for (int64_t i = 0; i < blk.count; ++i) {
        std::copy_n(tg.const_data_ptr<float>() + i * r, r, t.data_ptr<float>() + rows[i] * r_max);
      }
      expand_lora_rows(o, tg.const_data_ptr<float>(), r, blk.count, r, bt32.const_data_ptr<float>() + lo * N,
                       bias_ptr, rows, 0);
    }
  });
  base_gemm_after_lora(o, x, weight, /*b_transposed=*/true);
  return {o.finish(), t};
}

std::tuple<c10::optional<at::Tensor>, at::Tensor, at::Tensor> lora_rows_bwd(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& scale, const at::Tensor& t, at::IntArrayRef rank_ptr,
    const at::Tensor& row_ids, at::ArrayRef<double> dropout_p, const at::Tensor& seed, bool need_dx) {
  check_float_operands("lora_rows_bwd", {{"dy", &dy}, {"x", &x}, {"weight", &weight}, {"lora_a", &lora_a},
                                         {"lora_b", &lora_b}, {"scale", &scale}, {"t", &t}});
  check_row_ids("lora_rows_bwd", row_ids);
  if (computes_in_float64({&dy, &x, &weight, &lora_a})) {
    return lora_rows_bwd_float64(dy, x, weight, lora_a, lora_b, scale, t, rank_ptr, row_ids, dropout_p, seed,
                                 need_dx);
  }
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), R = lora_a.size(0);
  const int64_t n = static_cast<int64_t>(rank_ptr.size()) - 1;
  const auto plans = make_dropout_plans(seed, dropout_p);
  const at::Tensor a32 = fp32_contiguous(lora_a);
  // [R, N]: an adapter's ranks are whole rows, so its B^T reaches the GEMM packed (a column slice of B would not be)
  const at::Tensor bt32 = lora_b.to(at::kFloat).t().contiguous();
  const at::Tensor scale32 = fp32_contiguous(scale);
  const at::Tensor t32 = fp32_contiguous(t);
  const RowGroups g = group_rows(row_ids, n);

  Partials da_part(R, K), dbt_part(R, N);  // dB accumulated transposed, as in lora_bwd
  LoraOutput ox;
  if (need_dx) ox = make_lora_output(M, K, x.scalar_type(), GemmForm::kNN);
  const int64_t nblocks = static_cast<int64_t>(g.blocks.size());

  if (need_dx) base_gemm_before_lora(ox, dy, weight, /*b_transposed=*/false);
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> dyg, xg, mult, tg, dxbuf;
    at::Tensor da = da_part.mine(), dbt = dbt_part.mine();
    for (int64_t bi = b0; bi < b1; ++bi) {
      const RowBlock& blk = g.blocks[bi];
      const int64_t* rows = g.order.data() + blk.begin;
      const int64_t cnt = blk.count;
      if (blk.adapter < 0) {
        // Rows without an adapter: no LoRA gradient, and dx gets only the base term (already there when it came
        // first).
        if (need_dx && !ox.base_first()) {
          dxbuf.assign(cnt * K, 0.0f);
          write_lora_rows(ox, dxbuf.data(), cnt, rows, 0);
        }
        continue;
      }
      const int64_t lo = rank_ptr[blk.adapter], r = rank_ptr[blk.adapter + 1] - lo;
      dyg.resize(cnt * N);
      gather_rows_fp32(dy, rows, cnt, dyg.data());
      const at::Tensor dyb = fp32_view(dyg.data(), cnt, N);
      tg.resize(cnt * r);
      for (int64_t i = 0; i < cnt; ++i) {
        std::copy_n(t32.const_data_ptr<float>() + rows[i] * t32.size(1), r, tg.data() + i * r);
      }
      if (!outer_acc_direct(dyb, tg.data(), r, r, dbt.data_ptr<float>() + lo * N)) {
        dbt.narrow(0, lo, r).addmm_(fp32_view(tg.data(), cnt, r).t(), dyb);
      }
      const at::Tensor ds = at::mm(dyb, bt32.narrow(0, lo, r).t()).mul_(scale32.narrow(0, lo, r));
      gather_dropped(x, rows, cnt, plans[blk.adapter], xg, mult);
      const at::Tensor xgv = fp32_view(xg.data(), cnt, K);
      if (!outer_acc_direct(xgv, ds.const_data_ptr<float>(), r, r, da.data_ptr<float>() + lo * K)) {
        da.narrow(0, lo, r).addmm_(ds.t(), xgv);
      }
      if (need_dx && !plans[blk.adapter].active) {
        expand_lora_rows(ox, ds.const_data_ptr<float>(), r, cnt, r, a32.const_data_ptr<float>() + lo * K, nullptr,
                         rows, 0);
      } else if (need_dx) {
        at::Tensor dxb = at::mm(ds, a32.narrow(0, lo, r));
        multiply_inplace(dxb.data_ptr<float>(), mult.data(), cnt * K);
        write_lora_rows(ox, dxb.const_data_ptr<float>(), cnt, rows, 0);
      }
    }
  });

  c10::optional<at::Tensor> dx;
  if (need_dx) {
    base_gemm_after_lora(ox, dy, weight, /*b_transposed=*/false);
    dx = ox.finish();
  }
  return {dx, da_part.sum().to(lora_a.scalar_type()), dbt_part.sum().t().contiguous().to(lora_b.scalar_type())};
}

}  // namespace fused_lora_cpu
