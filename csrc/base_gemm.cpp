// The big product (x @ W^T forward, dy @ W backward) comes from the GEMM the call chose (gemm_choice.h: the vendor
// GEMM torch uses, MKL's mixed-precision GEMM, or the skinny kernels); this file runs it and decides how it meets
// the LoRA term, so that the output is rounded as few times as the chosen GEMM allows at full speed (see LoraOutput
// in common.h). Every operand reaches a vendor GEMM rows packed (gemm_operand): a caller's row-strided x or dy is
// copied first, since oneDNN's AMX kernels read past the end of each row.
#include "common.h"
#include "skinny.h"

#include <dlfcn.h>

#include <cstdlib>
#include <cstring>

namespace fused_lora_cpu {

namespace {

// MKL's mixed-precision GEMMs (16-bit inputs, fp32 C with beta), exported by libtorch_cpu when torch is
// built with MKL. Looked up at run time so that a torch without them still loads this extension.
using MixedGemmFn = void (*)(int layout, int transa, int transb, int m, int n, int k, float alpha,
                             const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta, float* c, int ldc);
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

MixedGemmFn lookup(const char* name) {
  void* sym = dlsym(RTLD_DEFAULT, name);
  if (sym == nullptr) {
    void* lib = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD);
    if (lib != nullptr) sym = dlsym(lib, name);
  }
  return reinterpret_cast<MixedGemmFn>(sym);
}

MixedGemmFn mixed_gemm_for(at::ScalarType dtype) {
  static const MixedGemmFn f16 = lookup("cblas_gemm_f16f16f32");
  static const MixedGemmFn bf16 = lookup("cblas_gemm_bf16bf16f32");
  if (dtype == at::kHalf) return f16;
  if (dtype == at::kBFloat16) return bf16;
  return nullptr;
}

bool fits_int(int64_t v) { return v >= 0 && v <= static_cast<int64_t>(INT32_MAX); }

}  // namespace

at::Tensor gemm_operand(const at::Tensor& t) {
  if (t.dim() != 2) return t.contiguous();
  if (t.numel() == 0 || (t.stride(1) == 1 && t.stride(0) == t.size(1))) return t;
  // Not contiguous(): a single padded row counts as contiguous and would come back as is.
  return t.clone(at::MemoryFormat::Contiguous);
}

void check_float_operands(const char* op, std::initializer_list<std::pair<const char*, const at::Tensor*>> operands) {
  for (const auto& [name, t] : operands) {
    if (!t->defined()) continue;
    const auto dtype = t->scalar_type();
    TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble,
                     "fused_lora_cpu.", op, ": ", name, " has dtype torch.", c10::getDtypeNames(dtype).first,
                     "; expected torch.float32, torch.float16, torch.bfloat16 or torch.float64");
  }
}

at::Tensor LoraOutput::finish() {
  if (acc.data_ptr() != out.data_ptr() || acc.scalar_type() != out.scalar_type()) {
    if (out.numel() > 0) out.copy_(acc);
    acc = at::Tensor();
  }
  return out;
}

bool mixed_gemm_available(at::ScalarType dtype) { return mixed_gemm_for(dtype) != nullptr; }

LoraOutput make_lora_output(int64_t M, int64_t N, at::ScalarType dtype, GemmForm form) {
  LoraOutput o;
  o.out = at::empty({M, N}, at::TensorOptions().dtype(dtype));
  o.gemm = choose_base_gemm(dtype, M, form);
  if (o.gemm == BaseGemm::kMixed && !(fits_int(M) && fits_int(N))) o.gemm = BaseGemm::kVendor;
  gemm_record(o.gemm);
  const bool lowp = dtype != at::kFloat;
  o.acc = lowp && o.gemm != BaseGemm::kVendor ? at::empty({M, N}, at::TensorOptions().dtype(at::kFloat)) : o.out;
  o.first = o.gemm == BaseGemm::kDirect || (o.gemm == BaseGemm::kVendor && lowp);
  return o;
}

void base_gemm_before_lora(LoraOutput& o, const at::Tensor& a, const at::Tensor& b, bool b_transposed) {
  if (!o.base_first() || o.out.numel() == 0) return;
  if (o.gemm == BaseGemm::kDirect) {
    direct_gemm(o.acc, a, b, b_transposed);
    return;
  }
  // beta = 0: no read of the output (Kc = 0 gives zeros, the empty sum).
  const at::Tensor bp = gemm_operand(b);
  at::mm_out(o.out, gemm_operand(a), b_transposed ? bp.t() : bp);
}

void base_gemm_after_lora(LoraOutput& o, const at::Tensor& a, const at::Tensor& b, bool b_transposed) {
  if (o.base_first()) return;
  const int64_t M = a.size(0), Kc = a.size(1);
  const int64_t N = b_transposed ? b.size(0) : b.size(1);
  if (M == 0 || N == 0 || Kc == 0) return;
  if (o.acc.scalar_type() == a.scalar_type()) {
    // fp32: the vendor GEMM reads the LoRA term as C with beta = 1.
    const at::Tensor ac = gemm_operand(a), bc = gemm_operand(b);
    o.acc.addmm_(ac, b_transposed ? bc.t() : bc);
    return;
  }
  mixed_gemm(o.acc, a, b, b_transposed, 1.0f);
}

void mixed_gemm(at::Tensor& c, const at::Tensor& a, const at::Tensor& b, bool b_transposed, float beta) {
  const int64_t M = a.size(0), Kc = a.size(1);
  const int64_t N = b_transposed ? b.size(0) : b.size(1);
  if (M == 0 || N == 0) return;
  if (Kc == 0) {
    if (beta == 0.0f) c.zero_();
    return;
  }
  // 16-bit inputs accumulated into the fp32 buffer: MKL mixed GEMM, C (fp32) = beta C + A @ op(B).
  const MixedGemmFn gemm = mixed_gemm_for(a.scalar_type());
  TORCH_CHECK(gemm != nullptr, "fused_lora_cpu: internal: no mixed-precision GEMM for ", a.scalar_type());
  TORCH_CHECK(c.scalar_type() == at::kFloat && c.stride(1) == 1, "fused_lora_cpu: internal: mixed GEMM output");
  const at::Tensor ac = gemm_operand(a), bc = gemm_operand(b);
  const int64_t lda = Kc;
  const int64_t ldb = bc.size(1);
  const int64_t ldc = c.stride(0);
  TORCH_CHECK(fits_int(M) && fits_int(N) && fits_int(Kc) && fits_int(lda) && fits_int(ldb) && fits_int(ldc),
              "fused_lora_cpu: GEMM dimension exceeds int32");
  gemm(kRowMajor, kNoTrans, b_transposed ? kTrans : kNoTrans, static_cast<int>(M), static_cast<int>(N),
       static_cast<int>(Kc), 1.0f, static_cast<const uint16_t*>(ac.const_data_ptr()), static_cast<int>(lda),
       static_cast<const uint16_t*>(bc.const_data_ptr()), static_cast<int>(ldb), beta, c.data_ptr<float>(),
       static_cast<int>(ldc));
}

void direct_gemm(at::Tensor& c, const at::Tensor& a, const at::Tensor& b, bool b_transposed) {
  const int64_t M = a.size(0), Kc = a.size(1);
  const int64_t N = b_transposed ? b.size(0) : b.size(1);
  TORCH_CHECK(c.scalar_type() == at::kFloat && c.stride(1) == 1, "fused_lora_cpu: internal: direct GEMM output");
  if (M == 0 || N == 0) return;
  if (Kc == 0) {
    c.zero_();
    return;
  }
  std::vector<float> abuf;
  const RowsF32 af = rows_as_fp32(a, abuf);
  const at::Tensor bu = unit_columns(b);
  if (b_transposed) {
    NtProduct p;
    p.M = M;
    p.N = N;
    p.K = Kc;
    p.x = af.p;
    p.ldx = af.ld;
    p.w = mat_ref(bu);
    p.out = out_ref(c);
    skinny_nt(p);
    return;
  }
  NnProduct p;
  p.M = M;
  p.N = Kc;
  p.K = N;
  p.g = StridedF32{af.p, af.ld, 1};
  p.w = mat_ref(bu);
  p.out = out_ref(c);
  skinny_nn(p);
}

std::vector<float> bias_fp32(const c10::optional<at::Tensor>& bias, int64_t N) {
  std::vector<float> out;
  if (!bias.has_value() || !bias->defined()) return out;
  const at::Tensor b = fp32_contiguous(*bias);
  out.assign(b.const_data_ptr<float>(), b.const_data_ptr<float>() + N);
  return out;
}

}  // namespace fused_lora_cpu
