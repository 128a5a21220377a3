// [P2] rule 10: R_sq + norm(R_ss)^T @ abar @ norm(R_qq), norm = normalize_residual (rules 8-9),
// or the raw maps with normalize=false (the "w/o norm." ablation). The normalisation is the
// fused one-pass kernel, written straight in the accumulation dtype; the products are GEMMs.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../checks.h"
#include "../kernels.h"

namespace relfast {
namespace {

constexpr const char* kOp = "bimodal_update";

// Finiteness is checked here, not left to the normalisation pass, so that the error names this
// op's argument; the extra read is O(N^2) next to the O(N^3) products.
at::Tensor self_map(const at::Tensor& R, bool normalize, at::ScalarType acc, const char* name) {
  check_all_finite(R, kOp, name);
  return normalize ? normalize_residual_impl(R, acc) : R.to(acc);
}

at::Tensor bimodal_update_op(const at::Tensor& R_sq, const at::Tensor& R_ss, const at::Tensor& abar,
                             const at::Tensor& R_qq, bool normalize) {
  check_bimodal_update_args(R_sq, R_ss, abar, R_qq);
  check_all_finite(R_sq, kOp, "R_sq");
  check_all_finite(abar, kOp, "abar");
  const at::ScalarType acc = accumulation_dtype(R_sq.scalar_type());
  const at::Tensor ss = self_map(R_ss, normalize, acc, "R_ss");
  const at::Tensor qq = self_map(R_qq, normalize, acc, "R_qq");
  const at::Tensor left = at::bmm(ss.transpose(1, 2), abar.to(acc));  // (B, S, Q)
  at::Tensor out = at::baddbmm(R_sq.to(acc), left, qq).to(R_sq.scalar_type());
  check_result_finite(out, kOp);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(relfast, CPU, m) { m.impl("bimodal_update", &bimodal_update_op); }

#ifdef RELFAST_WITH_CUDA
TORCH_LIBRARY_IMPL(relfast, CUDA, m) { m.impl("bimodal_update", &bimodal_update_op); }
#endif

}  // namespace relfast
