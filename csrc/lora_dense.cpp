// lora_fwd / lora_bwd (CONTRACT.md): every row uses every adapter stacked along the rank axis. Up to kSmallRows
// rows the calls go to lora_small.cpp; this file serves larger batches.
//
// Forward, per block of 64 rows (parallel over blocks): t = x A^T (bf16 x and A without dropout: AVX512-BF16
// dot products straight from x; otherwise x staged in fp32, one GEMM for the adapters without dropout and one
// per dropout adapter on a masked copy of the block), scaled; then t B^T + bias goes into the output
// (rank_kernels.cpp). The base x W^T is one GEMM over all rows (the strategy of gemm_choice.h), so the [M, N]
// output is written by one side and read+written once by the other, as a bias would be:
//   fp32 vendor and 16-bit mixed: the rank term first, then the GEMM adds onto it (beta = 1);
//   16-bit vendor: the GEMM first (beta = 0), then the expand adds the rank term onto the rounded base;
//   direct: the skinny kernels write the base into the fp32 accumulator first, the rank term is added onto it
//   (see LoraOutput in common.h).
// Backward reads each row block of dy and x once for dB, dS, dA and dx's rank term; dx's base term dy W
// meets it the same way.
#include "common.h"
#include "lora_float64.h"
#include "lora_ops.h"
#include "lora_small.h"
#include "skinny.h"

#include <algorithm>

namespace fused_lora_cpu {

namespace {

const float kOne = 1.0f;

struct AdapterRanks {
  std::vector<int64_t> lo, hi;
  bool any_plain = false;
  bool any_dropout = false;
};

void check_dropout_count(at::IntArrayRef rank_ptr, const std::vector<DropoutPlan>& plans) {
  const size_t n = rank_ptr.size() - 1;
  TORCH_CHECK(plans.size() == n, "fused_lora_cpu: dropout_p has ", plans.size(), " entries for ", n, " adapters");
}

AdapterRanks adapter_ranks(at::IntArrayRef rank_ptr, const std::vector<DropoutPlan>& plans) {
  AdapterRanks a;
  const size_t n = rank_ptr.size() - 1;
  for (size_t i = 0; i < n; ++i) {
    a.lo.push_back(rank_ptr[i]);
    a.hi.push_back(rank_ptr[i + 1]);
    if (rank_ptr[i + 1] == rank_ptr[i]) continue;
    (plans[i].active ? a.any_dropout : a.any_plain) = true;
  }
  return a;
}

// x rows [row0, row0 + rows) as a packed fp32 matrix (a GEMM operand, see gemm_operand): a view of x when x is
// fp32 with packed rows already, else converted into `buf` (a row-strided fp32 x too: its padding must not reach
// the GEMM).
at::Tensor x_block_fp32(const at::Tensor& x, int64_t row0, int64_t rows, std::vector<float>& buf) {
  const int64_t K = x.size(1);
  if (K == 0) return at::empty({rows, 0}, at::kFloat);
  if (x.scalar_type() == at::kFloat && x.stride(1) == 1 && x.stride(0) == K) return x.narrow(0, row0, rows);
  buf.resize(rows * x.size(1));
  rows_fp32(x, row0, rows, buf.data());
  return fp32_view(buf.data(), rows, x.size(1));
}

// dst[r, :] = xb[r, :] * mult_r for the dropout multipliers of logical rows row0 + r (xb: unit column stride).
void masked_rows(const at::Tensor& xb, const DropoutPlan& plan, int64_t row0, int64_t rows, float* mult,
                 float* dst) {
  const int64_t K = xb.size(1);
  const float* src = xb.const_data_ptr<float>();
  const int64_t ld = xb.stride(0);
  for (int64_t r = 0; r < rows; ++r) {
    dropout_row_multipliers(plan, row0 + r, K, mult + r * K);
    multiply_into(dst + r * K, src + r * ld, mult + r * K, K);
  }
}


}  // namespace

std::tuple<at::Tensor, at::Tensor> lora_fwd(const at::Tensor& x, const at::Tensor& weight,
                                            const c10::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                                            const at::Tensor& lora_b, const at::Tensor& scale,
                                            at::IntArrayRef rank_ptr, at::ArrayRef<double> dropout_p,
                                            const at::Tensor& seed) {
  const at::Tensor bias_t = bias.has_value() ? *bias : at::Tensor();
  check_float_operands("lora_fwd", {{"x", &x}, {"weight", &weight}, {"bias", &bias_t}, {"lora_a", &lora_a},
                                    {"lora_b", &lora_b}, {"scale", &scale}});
  if (computes_in_float64({&x, &weight, &lora_a})) {
    return lora_fwd_float64(x, weight, bias, lora_a, lora_b, scale, rank_ptr, dropout_p, seed);
  }
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), R = lora_a.size(0);
  const auto plans = make_dropout_plans(seed, dropout_p);
  check_dropout_count(rank_ptr, plans);
  if (takes_small_path(M, N, K)) return lora_fwd_small(x, weight, bias, lora_a, lora_b, scale, rank_ptr, plans);
  const AdapterRanks ar = adapter_ranks(rank_ptr, plans);
  const at::Tensor a32 = fp32_contiguous(lora_a);
  const at::Tensor bt32 = lora_b.to(at::kFloat).t().contiguous();  // [R, N]
  const at::Tensor scale32 = fp32_contiguous(scale);
  const std::vector<float> bias32 = bias_fp32(bias, N);
  const float* bias_ptr = bias32.empty() ? nullptr : bias32.data();
  // bf16 x and bf16 A without dropout: dot products straight from x, no fp32 staging.
  const bool direct_bf16 = x.scalar_type() == at::kBFloat16 && lora_a.scalar_type() == at::kBFloat16 &&
                           !ar.any_dropout && x.stride(1) == 1 && bf16_shrink_available();
  const at::Tensor a_c = direct_bf16 ? lora_a.contiguous() : at::Tensor();

  at::Tensor t = at::zeros({M, R}, at::kFloat);
  LoraOutput o = make_lora_output(M, N, x.scalar_type(), GemmForm::kNT);
  // Below the avx512 level (no hand-written AVX-512 expand), the rank term joins the output after the row-block
  // loop, in one pass of the skinny kernels (register-tiled) instead of a generic expand per block.
  const bool late_rank_term = !isa_at_least(Isa::kAvx512) && M > 0 && N > 0;
  const int64_t nblocks = (M + kRowBlock - 1) / kRowBlock;

  base_gemm_before_lora(o, x, weight, /*b_transposed=*/true);
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> xbuf, mult, xdrop;
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t row0 = blk * kRowBlock, rows = std::min(kRowBlock, M - row0);
      at::Tensor tb = t.narrow(0, row0, rows);
      if (direct_bf16) {
        shrink_rows_bf16(x.const_data_ptr<at::BFloat16>() + row0 * x.stride(0), x.stride(0), rows,
                         a_c.const_data_ptr<at::BFloat16>(), R, K, tb.data_ptr<float>(), R);
      } else {
        const at::Tensor xb = x_block_fp32(x, row0, rows, xbuf);
        if (ar.any_plain && R > 0) at::mm_out(tb, xb, a32.t());
        for (size_t i = 0; i < plans.size(); ++i) {
          if (!plans[i].active || ar.hi[i] == ar.lo[i]) continue;
          mult.resize(rows * K);
          xdrop.resize(rows * K);
          masked_rows(xb, plans[i], row0, rows, mult.data(), xdrop.data());
          at::Tensor ti = tb.narrow(1, ar.lo[i], ar.hi[i] - ar.lo[i]);
          ti.copy_(at::mm(fp32_view(xdrop.data(), rows, K), a32.narrow(0, ar.lo[i], ar.hi[i] - ar.lo[i]).t()));
        }
      }
      tb.mul_(scale32);
      if (late_rank_term) continue;
      // The rank term (+ bias), rounded once into the accumulator's dtype (with the base when it came first).
      expand_lora_rows(o, tb.const_data_ptr<float>(), R, rows, R, bt32.const_data_ptr<float>(), bias_ptr, nullptr,
                       row0);
    }
  });
  if (late_rank_term && (R > 0 || bias_ptr != nullptr || o.base_first())) {
    // acc (+)= t B^T + bias over all rows in one skinny pass (B^T in fp32: a product over R rows of N values, the
    // bias one more row), rounded once into the accumulator's dtype
    NnProduct p;
    p.M = M;
    p.N = R;
    p.K = N;
    p.g = StridedF32{t.const_data_ptr<float>(), R, 1};
    p.w = MatRef{bt32.const_data_ptr<float>(), Elt::kF32, N};
    if (bias_ptr != nullptr) {
      p.R = 1;
      p.e = StridedF32{&kOne, 0, 0};
      p.E = MatRef{bias_ptr, Elt::kF32, 0};
    }
    if (o.base_first()) p.base = mat_ref(o.acc);
    p.out = out_ref(o.acc);
    skinny_nn(p);
  }
  base_gemm_after_lora(o, x, weight, /*b_transposed=*/true);
  return {o.finish(), t};
}

std::tuple<c10::optional<at::Tensor>, at::Tensor, at::Tensor> lora_bwd(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& scale, const at::Tensor& t, at::IntArrayRef rank_ptr,
    at::ArrayRef<double> dropout_p, const at::Tensor& seed, bool need_dx) {
  check_float_operands("lora_bwd", {{"dy", &dy}, {"x", &x}, {"weight", &weight}, {"lora_a", &lora_a},
                                    {"lora_b", &lora_b}, {"scale", &scale}, {"t", &t}});
  if (computes_in_float64({&dy, &x, &weight, &lora_a})) {
    return lora_bwd_float64(dy, x, weight, lora_a, lora_b, scale, t, rank_ptr, dropout_p, seed, need_dx);
  }
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), R = lora_a.size(0);
  const auto plans = make_dropout_plans(seed, dropout_p);
  check_dropout_count(rank_ptr, plans);
  if (takes_small_path(M, N, K)) {
    return lora_bwd_small(dy, x, weight, lora_a, lora_b, scale, t, rank_ptr, plans, need_dx);
  }
  const AdapterRanks ar = adapter_ranks(rank_ptr, plans);
  const at::Tensor a32 = fp32_contiguous(lora_a);
  const at::Tensor b32 = fp32_contiguous(lora_b);
  const at::Tensor scale32 = fp32_contiguous(scale);
  const at::Tensor t32 = fp32_contiguous(t);
  TORCH_CHECK(t32.size(1) == R, "fused_lora_cpu: internal: t has ", t32.size(1), " ranks, lora_a ", R);
  // Zeroing the ranks of adapters with dropout lets one GEMM serve all adapters without it.
  std::vector<int64_t> dropout_rank_list;
  for (size_t i = 0; i < plans.size(); ++i) {
    if (plans[i].active) {
      for (int64_t j = ar.lo[i]; j < ar.hi[i]; ++j) dropout_rank_list.push_back(j);
    }
  }
  const at::Tensor dropout_cols = at::tensor(dropout_rank_list, at::kLong);

  // dB is accumulated transposed ([R, N]): every row block adds t_blk^T @ dy_blk, read straight from dy.
  Partials da_part(R, K), dbt_part(R, N);
  LoraOutput ox;
  if (need_dx) ox = make_lora_output(M, K, x.scalar_type(), GemmForm::kNN);
  // dx's rank term written straight into an fp32 accumulator that the GEMM adds onto afterwards (beta = 1)
  const bool dx_acc_fp32 = need_dx && ox.acc.scalar_type() == at::kFloat && !ox.base_first();
  // bf16 dy and bf16 B: dS from AVX512-BF16 dot products over dy's rows, no fp32 staging.
  const bool direct_ds = dy.scalar_type() == at::kBFloat16 && lora_b.scalar_type() == at::kBFloat16 &&
                         dy.stride(1) == 1 && bf16_shrink_available();
  const at::Tensor bt_c = direct_ds ? lora_b.t().contiguous() : at::Tensor();  // [R, N]
  const int64_t nblocks = (M + kRowBlock - 1) / kRowBlock;

  if (need_dx) base_gemm_before_lora(ox, dy, weight, /*b_transposed=*/false);
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> dybuf, xbuf, mult, xdrop, dxbuf;
    at::Tensor da = da_part.mine(), dbt = dbt_part.mine();
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t row0 = blk * kRowBlock, rows = std::min(kRowBlock, M - row0);
      const at::Tensor dy_rows = dy.narrow(0, row0, rows), x_rows = x.narrow(0, row0, rows);
      at::Tensor dyb, xb;  // fp32 staging, made only where a fallback needs it
      auto dy_fp32 = [&]() -> const at::Tensor& {
        if (!dyb.defined()) dyb = x_block_fp32(dy, row0, rows, dybuf);
        return dyb;
      };
      auto x_fp32 = [&]() -> const at::Tensor& {
        if (!xb.defined()) xb = x_block_fp32(x, row0, rows, xbuf);
        return xb;
      };
      const at::Tensor tb = t32.narrow(0, row0, rows);
      if (!outer_acc_direct(dy_rows, tb.const_data_ptr<float>(), R, R, dbt.data_ptr<float>())) {
        dbt.addmm_(tb.t(), dy_fp32());
      }
      at::Tensor ds = at::empty({rows, R}, at::kFloat);
      if (direct_ds) {
        shrink_rows_bf16(dy_rows.const_data_ptr<at::BFloat16>(), dy.stride(0), rows,
                         bt_c.const_data_ptr<at::BFloat16>(), R, N, ds.data_ptr<float>(), R);
      } else {
        at::mm_out(ds, dy_fp32(), b32);
      }
      ds.mul_(scale32);  // [rows, R]
      const at::Tensor ds_plain = ar.any_dropout ? ds.index_fill(1, dropout_cols, 0.0) : ds;
      if (ar.any_plain && !outer_acc_direct(x_rows, ds_plain.const_data_ptr<float>(), R, R, da.data_ptr<float>())) {
        da.addmm_(ds_plain.t(), x_fp32());
      }
      if (need_dx && !ar.any_dropout) {
        // dx's rank term rounded once straight into the accumulator (with the base when it came first)
        expand_lora_rows(ox, ds.const_data_ptr<float>(), R, rows, R, a32.const_data_ptr<float>(), nullptr, nullptr,
                         row0);
      }
      if (!ar.any_dropout) continue;
      at::Tensor dxb;
      if (need_dx) {
        if (dx_acc_fp32) {
          dxb = ox.acc.narrow(0, row0, rows);
        } else {
          dxbuf.resize(rows * K);
          dxb = fp32_view(dxbuf.data(), rows, K);
        }
        if (ar.any_plain) {
          at::mm_out(dxb, ds_plain, a32);
        } else {
          dxb.zero_();
        }
      }
      for (size_t i = 0; i < plans.size(); ++i) {
        if (!plans[i].active || ar.hi[i] == ar.lo[i]) continue;
        const int64_t lo = ar.lo[i], r = ar.hi[i] - ar.lo[i];
        mult.resize(rows * K);
        xdrop.resize(rows * K);
        masked_rows(x_fp32(), plans[i], row0, rows, mult.data(), xdrop.data());
        const at::Tensor xd = fp32_view(xdrop.data(), rows, K);
        const at::Tensor dsi = gemm_operand(ds.narrow(1, lo, r));  // without the other adapters' columns
        if (!outer_acc_direct(xd, ds.const_data_ptr<float>() + lo, R, r, da.data_ptr<float>() + lo * K)) {
          da.narrow(0, lo, r).addmm_(dsi.t(), xd);
        }
        if (need_dx) {
          // The dropout mask applies to the product dS_i A_i before it joins dx.
          at::Tensor prod = at::mm(dsi, a32.narrow(0, lo, r));
          multiply_inplace(prod.data_ptr<float>(), mult.data(), rows * K);
          dxb.add_(prod);
        }
      }
      if (need_dx && !dx_acc_fp32) write_lora_rows(ox, dxbuf.data(), rows, nullptr, row0);
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
