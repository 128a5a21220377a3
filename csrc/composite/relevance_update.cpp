// [P2] rules 6/7: R + abar @ R (or abar @ R without aggregation). A GEMM with its add fused in
// (baddbmm); device-generic, so the same code serves CPU and CUDA.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../checks.h"
#include "../kernels.h"

namespace relfast {
namespace {

constexpr const char* kOp = "relevance_update";

// Half types are computed in float32 and rounded once at the end.
at::Tensor updated_relevance(const at::Tensor& R, const at::Tensor& abar, bool aggregate) {
  check_relevance_update_args(R, abar);
  check_all_finite(R, kOp, "R");
  check_all_finite(abar, kOp, "abar");
  const at::ScalarType acc = accumulation_dtype(R.scalar_type());
  const at::Tensor R_acc = R.to(acc), abar_acc = abar.to(acc);
  return aggregate ? at::baddbmm(R_acc, abar_acc, R_acc) : at::bmm(abar_acc, R_acc);
}

at::Tensor relevance_update_op(const at::Tensor& R, const at::Tensor& abar, bool aggregate) {
  at::Tensor out = updated_relevance(R, abar, aggregate).to(R.scalar_type());
  check_result_finite(out, kOp);
  return out;
}

// The product reads all of R, so it cannot be written into R while it is computed: the
// in-place form saves the caller an allocation, not the temporary. R is written only once the
// result is known to be finite.
void relevance_update_inplace_op(at::Tensor& R, const at::Tensor& abar, bool aggregate) {
  R.copy_(relevance_update_op(R, abar, aggregate));
}

}  // namespace

TORCH_LIBRARY_IMPL(relfast, CPU, m) {
  m.impl("relevance_update", &relevance_update_op);
  m.impl("relevance_update_", &relevance_update_inplace_op);
}

#ifdef RELFAST_WITH_CUDA
TORCH_LIBRARY_IMPL(relfast, CUDA, m) {
  m.impl("relevance_update", &relevance_update_op);
  m.impl("relevance_update_", &relevance_update_inplace_op);
}
#endif

}  // namespace relfast
