// [P1] Eq. 16: rollout = A_L ... A_s with A_l = row-normalised (E_h A_l + I). Each factor comes
// from the fused one-pass kernel (accumulation dtype); the chain is a sequence of GEMMs.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../checks.h"
#include "../kernels.h"

namespace relfast {
namespace {

at::Tensor rollout_op(at::TensorList attentions, int64_t start_layer) {
  const int64_t first = check_rollout_args(attentions, start_layer);
  at::Tensor joint = rollout_layer_matrix_impl(attentions[first]);
  for (size_t l = first + 1; l < attentions.size(); ++l) {
    joint = at::bmm(rollout_layer_matrix_impl(attentions[l]), joint);
  }
  at::Tensor out = joint.to(attentions[0].scalar_type());
  check_result_finite(out, "rollout");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(relfast, CPU, m) { m.impl("rollout", &rollout_op); }

#ifdef RELFAST_WITH_CUDA
TORCH_LIBRARY_IMPL(relfast, CUDA, m) { m.impl("rollout", &rollout_op); }
#endif

}  // namespace relfast
