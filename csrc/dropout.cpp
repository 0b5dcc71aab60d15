// Dropout masks regenerated from the seed (CONTRACT.md "Dropout"): Philox4x32-10 per group of 4 elements.
#include "common.h"

#include <algorithm>
#include <cmath>

namespace fused_lora_cpu {

namespace {

constexpr uint32_t kMul0 = 0xD2511F53u;
constexpr uint32_t kMul1 = 0xCD9E8D57u;
constexpr uint32_t kWeyl0 = 0x9E3779B9u;
constexpr uint32_t kWeyl1 = 0xBB67AE85u;
// Quads generated per batch: structure-of-arrays of this length vectorises across quads.
constexpr int64_t kQuadBatch = 256;

// words[(q - q0) * 4 + lane] = Philox4x32-10(counter = (q lo, q hi, salt, 0), key)[lane], q in [q0, q0 + n).
FUSED_LORA_CLONES
void philox_quads(uint64_t q0, int64_t n, uint32_t key0, uint32_t key1, uint32_t salt, uint32_t* words) {
  uint32_t c0[kQuadBatch], c1[kQuadBatch], c2[kQuadBatch], c3[kQuadBatch];
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t q = q0 + static_cast<uint64_t>(i);
    c0[i] = static_cast<uint32_t>(q);
    c1[i] = static_cast<uint32_t>(q >> 32);
    c2[i] = salt;
    c3[i] = 0;
  }
  uint32_t k0 = key0, k1 = key1;
  for (int round = 0; round < 10; ++round) {
    for (int64_t i = 0; i < n; ++i) {
      const uint64_t p0 = static_cast<uint64_t>(kMul0) * c0[i];
      const uint64_t p1 = static_cast<uint64_t>(kMul1) * c2[i];
      const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
      const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
      const uint32_t n0 = hi1 ^ c1[i] ^ k0;
      const uint32_t n2 = hi0 ^ c3[i] ^ k1;
      c0[i] = n0;
      c1[i] = lo1;
      c2[i] = n2;
      c3[i] = lo0;
    }
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  for (int64_t i = 0; i < n; ++i) {
    words[4 * i + 0] = c0[i];
    words[4 * i + 1] = c1[i];
    words[4 * i + 2] = c2[i];
    words[4 * i + 3] = c3[i];
  }
}

// Calls emit(e, word) for every flat element e in [e0, e1), in order.
template <typename Emit>
void for_each_word(const DropoutPlan& plan, int64_t e0, int64_t e1, Emit emit) {
  if (e1 <= e0) return;
  uint32_t words[4 * kQuadBatch];
  const int64_t q_first = e0 >> 2;
  const int64_t q_last = (e1 - 1) >> 2;  // inclusive
  for (int64_t qa = q_first; qa <= q_last; qa += kQuadBatch) {
    const int64_t nq = std::min<int64_t>(kQuadBatch, q_last + 1 - qa);
    philox_quads(static_cast<uint64_t>(qa), nq, plan.key0, plan.key1, plan.salt, words);
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

FUSED_LORA_CLONES
void multiply_inplace(float* dst, const float* mult, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] *= mult[i];
}

FUSED_LORA_CLONES
void multiply_into(float* dst, const float* a, const float* mult, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = a[i] * mult[i];
}

}  // namespace fused_lora_cpu
