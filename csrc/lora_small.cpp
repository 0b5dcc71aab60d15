// lora_fwd / lora_bwd for few rows (lora_small.h). At these sizes the base GEMM streams the weight once and
// everything else must cost next to nothing: each small product is one skinny kernel call reading x, dy, A and B in
// their own dtype; the only copies are the fp32 rows of x and dy (a few KiB per row) and B^T in fp32 (R x N), which
// turns the rank term + bias into one pass over the output:
//   forward   t_i = (drop_i(x) A_i^T) * scale_i            skinny_nt per adapter
//             base = x W^T                                  the call's strategy: vendor into y (rounded), mixed into
//                                                           an fp32 buffer, direct into y (fp32) or an fp32 buffer
//             y = round(base + t B^T + bias)                 skinny_nn over B^T (and bias as one more "rank")
//   backward  dB = dy^T t, dS = (dy B) * scale, dA_i = dS_i^T drop_i(x)   skinny_nn with g read transposed
//             dx = dy W + dS A (+ masked dS_i A_i)           direct: one skinny_nn for both terms, rounded once;
//                                                           vendor/mixed: the GEMM first, the rank term added in
//                                                           the pass that rounds
#include "lora_small.h"

#include <algorithm>
#include <climits>

#include "skinny.h"

namespace fused_lora_cpu {

namespace {

// drop_i(x) rows in fp32: x32 rows times the adapter's dropout multipliers (x's logical rows).
RowsF32 masked_rows(const RowsF32& xs, int64_t M, int64_t K, const DropoutPlan& plan, std::vector<float>& mult,
                    std::vector<float>& dst) {
  mult.resize(static_cast<size_t>(K));
  dst.resize(static_cast<size_t>(M * K));
  for (int64_t m = 0; m < M; ++m) {
    dropout_row_multipliers(plan, m, K, mult.data());
    multiply_into(dst.data() + m * K, xs.p + m * xs.ld, mult.data(), K);
  }
  return RowsF32{dst.data(), K};
}

bool mixed_fits(int64_t N, int64_t K) { return N <= INT_MAX && K <= INT_MAX; }

BaseGemm small_gemm(at::ScalarType dtype, int64_t M, int64_t N, int64_t K, GemmForm form) {
  BaseGemm g = choose_base_gemm(dtype, M, form);
  if (g == BaseGemm::kMixed && !mixed_fits(N, K)) g = BaseGemm::kVendor;
  gemm_record(g);
  return g;
}

const float kOne = 1.0f;

// Rows up to which the forward's rank term after a vendor/mixed base is a dot product per output (reading B as it
// is) rather than a pass over B^T (a transposed fp32 copy first, then no horizontal sums).
constexpr int64_t kDotEpilogueRows = 4;

}  // namespace

std::tuple<at::Tensor, at::Tensor> lora_fwd_small(const at::Tensor& x, const at::Tensor& weight,
                                                  const c10::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                                                  const at::Tensor& lora_b, const at::Tensor& scale,
                                                  at::IntArrayRef rank_ptr, const std::vector<DropoutPlan>& plans) {
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), R = lora_a.size(0);
  const at::Tensor scale32 = fp32_contiguous(scale);
  std::vector<float> xbuf, xdrop, mult;
  const RowsF32 xs = rows_as_fp32(x, xbuf);

  at::Tensor t = at::empty({M, R}, at::kFloat);  // every column is written: each rank belongs to one adapter
  const at::Tensor a = unit_columns(lora_a);
  const MatRef am = mat_ref(a);
  for (size_t i = 0; i + 1 < rank_ptr.size(); ++i) {
    const int64_t lo = rank_ptr[i], r = rank_ptr[i + 1] - lo;
    if (r == 0) continue;
    const RowsF32 src = plans[i].active ? masked_rows(xs, M, K, plans[i], mult, xdrop) : xs;
    NtProduct s;
    s.M = M;
    s.N = r;
    s.K = K;
    s.x = src.p;
    s.ldx = src.ld;
    s.w = row_offset(am, lo);
    s.colscale = scale32.const_data_ptr<float>() + lo;
    s.out = OutRef{t.data_ptr<float>() + lo, Elt::kF32, R};
    skinny_nt(s);
  }

  const std::vector<float> bias32 = bias_fp32(bias, N);
  const at::Tensor b = unit_columns(lora_b);
  at::Tensor y = at::empty({M, N}, at::TensorOptions().dtype(x.scalar_type()));
  // The rank term and the bias as a second dot product of each output: t[i] . B[n] (+ bias[n])
  NtProduct p;
  p.M = M;
  p.N = N;
  p.R = R;
  p.e = t.const_data_ptr<float>();
  p.lde = R;
  p.E = mat_ref(b);
  p.bias = bias32.empty() ? nullptr : bias32.data();
  p.out = out_ref(y);
  const BaseGemm g = small_gemm(x.scalar_type(), M, N, K, GemmForm::kNT);
  if (g == BaseGemm::kDirect) {
    // x W^T, t B^T and bias summed in fp32 and rounded once, in one pass over W
    p.K = K;
    p.x = xs.p;
    p.ldx = xs.ld;
    p.w = mat_ref(unit_columns(weight));
    skinny_nt(p);
    return {y, t};
  }
  at::Tensor base = y;  // where x W^T is before the rank term joins it
  if (g == BaseGemm::kVendor) {
    at::mm_out(y, gemm_operand(x), gemm_operand(weight).t());
  } else {
    base = at::empty({M, N}, at::kFloat);
    mixed_gemm(base, x, weight, /*b_transposed=*/true, 0.0f);
  }
  if (R == 0 && bias32.empty() && base.is_same(y)) return {y, t};
  p.base = mat_ref(base);
  if (M <= kDotEpilogueRows) {
    skinny_nt(p);  // K = 0: each output's rank term is one dot product of R values
    return {y, t};
  }
  // More rows: B^T in fp32 makes the rank term a product over R rows of N values (the bias one more row), with no
  // horizontal sums
  NnProduct q;
  q.M = M;
  q.K = N;
  q.base = p.base;
  q.out = p.out;
  std::vector<float> bt;
  if (R > 0) {
    bt.resize(static_cast<size_t>(R * N));
    transpose_to_f32(p.E, N, R, bt.data());
    q.N = R;
    q.g = StridedF32{t.const_data_ptr<float>(), R, 1};
    q.w = MatRef{bt.data(), Elt::kF32, N};
  }
  if (!bias32.empty()) {
    q.R = 1;
    q.e = StridedF32{&kOne, 0, 0};
    q.E = MatRef{bias32.data(), Elt::kF32, 0};
  }
  skinny_nn(q);
  return {y, t};
}

std::tuple<c10::optional<at::Tensor>, at::Tensor, at::Tensor> lora_bwd_small(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& scale, const at::Tensor& t, at::IntArrayRef rank_ptr,
    const std::vector<DropoutPlan>& plans, bool need_dx) {
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), R = lora_a.size(0);
  const at::Tensor scale32 = fp32_contiguous(scale);
  std::vector<float> dybuf, xbuf, xdrop, mult;
  const RowsF32 dys = rows_as_fp32(dy, dybuf);
  const at::Tensor t32 = unit_columns(t.to(at::kFloat));
  TORCH_CHECK(t32.size(1) == R, "fused_lora_cpu: internal: t has ", t32.size(1), " ranks, lora_a ", R);

  // dB [N, R] = dy^T t: row n of dB sums over the M tokens (dy read transposed)
  at::Tensor dB = at::empty({N, R}, at::TensorOptions().dtype(lora_b.scalar_type()));
  {
    NnProduct p;
    p.M = N;
    p.N = M;
    p.K = R;
    p.g = StridedF32{dys.p, 1, dys.ld};
    p.w = MatRef{t32.const_data_ptr(), Elt::kF32, t32.stride(0)};
    p.out = out_ref(dB);
    skinny_nn(p);
  }
  // dS [M, R] = (dy B) * scale
  at::Tensor dS = at::empty({M, R}, at::kFloat);
  {
    NnProduct p;
    p.M = M;
    p.N = N;
    p.K = R;
    p.g = StridedF32{dys.p, dys.ld, 1};
    p.w = mat_ref(unit_columns(lora_b));
    p.colscale = scale32.const_data_ptr<float>();
    p.out = out_ref(dS);
    skinny_nn(p);
  }
  // dA_i [r_i, K] = dS_i^T drop_i(x)
  at::Tensor dA = at::empty({R, K}, at::TensorOptions().dtype(lora_a.scalar_type()));
  const RowsF32 xs = rows_as_fp32(x, xbuf);
  bool any_dropout = false;
  for (size_t i = 0; i + 1 < rank_ptr.size(); ++i) {
    const int64_t lo = rank_ptr[i], r = rank_ptr[i + 1] - lo;
    if (r == 0) continue;
    any_dropout |= plans[i].active;
    const RowsF32 src = plans[i].active ? masked_rows(xs, M, K, plans[i], mult, xdrop) : xs;
    NnProduct p;
    p.M = r;
    p.N = M;
    p.K = K;
    p.g = StridedF32{dS.const_data_ptr<float>() + lo, 1, R};
    p.w = MatRef{src.p, Elt::kF32, src.ld};
    p.out = row_offset(out_ref(dA), lo);
    skinny_nn(p);
  }
  if (!need_dx) return {c10::nullopt, dA, dB};

  // dx = dy W + dS A, with adapter i's part masked by its dropout mask where it has one
  const at::Tensor a = unit_columns(lora_a);
  const MatRef am = mat_ref(a);
  at::Tensor dx = at::empty({M, K}, at::TensorOptions().dtype(x.scalar_type()));
  NnProduct p;  // the pass that writes dx
  p.M = M;
  p.K = K;
  p.out = out_ref(dx);
  at::Tensor rank;  // fp32 [M, K] rank term, made first where dropout masks part of it
  if (!any_dropout) {
    p.R = R;
    p.e = StridedF32{dS.const_data_ptr<float>(), R, 1};
    p.E = am;
  } else {
    rank = at::empty({M, K}, at::kFloat);
    at::Tensor ds_plain = dS.clone();
    for (size_t i = 0; i + 1 < rank_ptr.size(); ++i) {
      if (plans[i].active) ds_plain.narrow(1, rank_ptr[i], rank_ptr[i + 1] - rank_ptr[i]).zero_();
    }
    NnProduct q;
    q.M = M;
    q.K = K;
    q.R = R;
    q.e = StridedF32{ds_plain.const_data_ptr<float>(), R, 1};
    q.E = am;
    q.out = out_ref(rank);
    skinny_nn(q);
    at::Tensor part = at::empty({M, K}, at::kFloat);
    for (size_t i = 0; i + 1 < rank_ptr.size(); ++i) {
      const int64_t lo = rank_ptr[i], r = rank_ptr[i + 1] - lo;
      if (r == 0 || !plans[i].active) continue;
      q.R = r;
      q.e = StridedF32{dS.const_data_ptr<float>() + lo, R, 1};
      q.E = row_offset(am, lo);
      q.out = out_ref(part);
      skinny_nn(q);
      mult.resize(static_cast<size_t>(K));
      for (int64_t m = 0; m < M; ++m) {
        dropout_row_multipliers(plans[i], m, K, mult.data());
        float* dst = rank.data_ptr<float>() + m * K;
        const float* src = part.const_data_ptr<float>() + m * K;
        for (int64_t k = 0; k < K; ++k) dst[k] += src[k] * mult[k];
      }
    }
    p.base = mat_ref(rank);
  }

  const BaseGemm g = small_gemm(x.scalar_type(), M, K, N, GemmForm::kNN);
  if (g == BaseGemm::kDirect) {
    p.N = N;
    p.g = StridedF32{dys.p, dys.ld, 1};
    p.w = mat_ref(unit_columns(weight));
    skinny_nn(p);
  } else if (g == BaseGemm::kVendor) {
    at::mm_out(dx, gemm_operand(dy), gemm_operand(weight));
    if (!any_dropout) {
      p.base = mat_ref(dx);  // the rank term added in the pass that reads the rounded base back
      skinny_nn(p);
    } else if (dx.scalar_type() == at::kFloat) {
      dx.add_(rank);
    } else {
      add_rows_from_fp32(rank.const_data_ptr<float>(), M, dx, nullptr, 0);
    }
  } else if (!any_dropout) {
    at::Tensor base = at::empty({M, K}, at::kFloat);
    mixed_gemm(base, dy, weight, /*b_transposed=*/false, 0.0f);
    p.base = mat_ref(base);
    skinny_nn(p);
  } else {
    mixed_gemm(rank, dy, weight, /*b_transposed=*/false, 1.0f);
    dx.copy_(rank);
  }
  return {dx, dA, dB};
}

}  // namespace fused_lora_cpu
