// Dropout masks regenerated from the seed (CONTRACT.md "Dropout"): Philox4x32-10 per group of 4 elements.
#include "common.h"
#include "isa_loops.h"

#include <algorithm>
#include <cmath>

namespace fused_lora_cpu {

namespace {

// Calls emit(e, word) for every flat element e in [e0, e1), in order.
template <typename Emit>
void for_each_word(const DropoutPlan& plan, int64_t e0, int64_t e1, Emit emit) {
  if (e1 <= e0) return;
  uint32_t words[4 * kQuadBatch];
  const LoopTable& gen = loops(IsaKernel::kDropout);
  const int64_t q_first = e0 >> 2;
  const int64_t q_last = (e1 - 1) >> 2;  // inclusive
  for (int64_t qa = q_first; qa <= q_last; qa += kQuadBatch) {
    const int64_t nq = std::min<int64_t>(kQuadBatch, q_last + 1 - qa);
    gen.philox_quads(static_cast<uint64_t>(qa), nq, plan.key0, plan.key1, plan.salt, words);
    const int64_t lo = std::max<int64_t>(e0, 4 * qa);
    const int64_t hi = std::min<int64_t>(e1, 4 * (qa + nq));
    for (int64_t e = lo; e < hi; ++e) emit(e, words[e - 4 * qa]);
  }
}

}  // namespace

DropoutPlan make_dropout_plan(const at::Tensor& seed, double p, int64_t salt) {
  DropoutPlan plan;
  if (!(p > 0.0)) return plan;
  TORCH_CHECK(seed.numel() >= 1 && seed.scalar_type() == at::kLong, "dropout seed must be an int64 tensor");
  const uint64_t s = static_cast<uint64_t>(seed.reshape({-1})[0].item<int64_t>());
  plan.active = true;
  plan.key0 = static_cast<uint32_t>(s & 0xffffffffu);
  plan.key1 = static_cast<uint32_t>(s >> 32);
  plan.salt = static_cast<uint32_t>(salt);
  const double thr = std::ceil(p * 16777216.0);
  plan.threshold = static_cast<uint32_t>(std::min(16777216.0, thr));
  const float pf = static_cast<float>(p);
  plan.inv_keep = 1.0f / (1.0f - pf);
  return plan;
}

std::vector<DropoutPlan> make_dropout_plans(const at::Tensor& seed, at::ArrayRef<double> dropout_p) {
  std::vector<DropoutPlan> plans;
  plans.reserve(dropout_p.size());
  for (size_t i = 0; i < dropout_p.size(); ++i) plans.push_back(make_dropout_plan(seed, dropout_p[i], i));
  return plans;
}

void dropout_row_multipliers(const DropoutPlan& plan, int64_t row, int64_t K, float* out) {
  const int64_t e0 = row * K;
  const uint32_t thr = plan.threshold;
  const float inv = plan.inv_keep;
  for_each_word(plan, e0, e0 + K, [&](int64_t e, uint32_t w) { out[e - e0] = (w >> 8) >= thr ? inv : 0.0f; });
}

void dropout_keep_flat(const DropoutPlan& plan, int64_t e0, int64_t count, bool* keep) {
  const uint32_t thr = plan.threshold;
  for_each_word(plan, e0, e0 + count, [&](int64_t e, uint32_t w) { keep[e - e0] = (w >> 8) >= thr; });
}

void multiply_inplace(float* dst, const float* mult, int64_t n) {
  loops(IsaKernel::kDropout).multiply_inplace(dst, mult, n);
}

void multiply_into(float* dst, const float* a, const float* mult, int64_t n) {
  loops(IsaKernel::kDropout).multiply_into(dst, a, mult, n);
}

}  // namespace fused_lora_cpu
