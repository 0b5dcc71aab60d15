// lora_merge_ (CONTRACT.md): weight <- round(weight + sign * B diag(scale) A), in place, tile by tile.
//
// Panels of 64 weight rows (in the weight's stored layout) run in parallel: each computes its panel of the
// delta in fp32 with one small GEMM, adds the panel of weight upcast to fp32 and rounds once on the write.
// Extra memory is a panel per thread. safe=True runs the same computation once without writing, to learn
// whether every merged value is finite, and writes only then.
#include "common.h"
#include "isa_loops.h"
#include "lora_float64.h"
#include "lora_ops.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>

namespace fused_lora_cpu {

namespace {

constexpr int64_t kPanelRows = 64;

// The smallest fp32 magnitude that rounds (to nearest even) to infinity in `dtype`: the merged value must be
// finite after its one rounding, so an fp32 sum past the fp16/bf16 range counts as non-finite.
float overflow_threshold(at::ScalarType dtype) {
  uint32_t bits;
  switch (dtype) {
    case at::kHalf: return 65520.0f;        // 65504 (max half) + half an ulp; 65504 is odd, so ties go up
    case at::kBFloat16: bits = 0x7f7f8000u;  // max bf16 + half an ulp, likewise rounding up
      break;
    default: return std::numeric_limits<float>::infinity();
  }
  float t;
  std::memcpy(&t, &bits, sizeof t);
  return t;
}

}  // namespace

at::Tensor lora_merge_(const at::Tensor& weight, const at::Tensor& lora_a, const at::Tensor& lora_b,
                       const at::Tensor& scale, double sign, bool fan_in_fan_out, bool safe) {
  check_float_operands("lora_merge_", {{"weight", &weight}, {"lora_a", &lora_a}, {"lora_b", &lora_b},
                                       {"scale", &scale}});
  // Written in place, so never copied: any row stride works, the elements of a row must be adjacent.
  TORCH_CHECK(weight.dim() == 2 && (weight.stride(1) == 1 || weight.size(1) <= 1),
              "fused_lora_cpu.lora_merge_: weight must be 2-D with adjacent elements in each row (stride(1) == 1); "
              "got shape ", weight.sizes(), " and strides ", weight.strides());
  if (computes_in_float64({&weight, &lora_a})) {
    return lora_merge_float64_(weight, lora_a, lora_b, scale, sign, fan_in_fan_out, safe);
  }
  const at::Tensor a32 = lora_a.to(at::kFloat).contiguous();                                     // [R, K]
  const at::Tensor bs = (lora_b.to(at::kFloat) * scale.to(at::kFloat)).mul_(static_cast<float>(sign));  // [N, R]
  // delta (in weight's layout) = left @ right, panel rows of weight = rows of left.
  const at::Tensor left = fan_in_fan_out ? a32.t().contiguous() : bs.contiguous();
  const at::Tensor right = fan_in_fan_out ? bs.t().contiguous() : a32;
  const int64_t rows = weight.size(0), cols = weight.size(1);
  const auto dtype = weight.scalar_type();
  const int64_t item = weight.element_size();
  const int64_t ld = weight.stride(0);
  auto* base = static_cast<char*>(weight.data_ptr());
  const int64_t npanels = (rows + kPanelRows - 1) / kPanelRows;

  const float threshold = overflow_threshold(dtype);
  auto run = [&](bool write) {
    std::atomic<bool> finite{true};
    at::parallel_for(0, npanels, 1, [&](int64_t p0, int64_t p1) {
      std::vector<float> delta_buf, row_buf(cols);
      for (int64_t p = p0; p < p1; ++p) {
        if (!write && !finite.load(std::memory_order_relaxed)) return;
        const int64_t r0 = p * kPanelRows, nr = std::min(kPanelRows, rows - r0);
        delta_buf.resize(nr * cols);
        at::Tensor delta = fp32_view(delta_buf.data(), nr, cols);
        at::mm_out(delta, left.narrow(0, r0, nr), right);
        for (int64_t r = 0; r < nr; ++r) {
          char* wrow = base + (r0 + r) * ld * item;
          row_to_fp32(wrow, dtype, 1, cols, row_buf.data());
          const bool ok = loops(IsaKernel::kMerge).add_check_finite(row_buf.data(), delta_buf.data() + r * cols, cols,
                                                                    threshold);
          if (write) {
            row_from_fp32(row_buf.data(), cols, dtype, wrow);
          } else if (!ok) {
            finite.store(false, std::memory_order_relaxed);
            return;
          }
        }
      }
    });
    return finite.load();
  };

  if (safe && !run(/*write=*/false)) return at::scalar_tensor(false, at::kBool);
  run(/*write=*/true);
  return at::scalar_tensor(true, at::kBool);
}

at::Tensor dropout_keep(const at::Tensor& seed, int64_t M, int64_t K, double p, int64_t salt) {
  at::Tensor keep = at::empty({M, K}, at::TensorOptions().dtype(at::kBool));
  const DropoutPlan plan = make_dropout_plan(seed, p, salt);
  if (!plan.active) return keep.fill_(true);
  bool* out = keep.data_ptr<bool>();
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    dropout_keep_flat(plan, m0 * K, (m1 - m0) * K, out + m0 * K);
  });
  return keep;
}

}  // namespace fused_lora_cpu
