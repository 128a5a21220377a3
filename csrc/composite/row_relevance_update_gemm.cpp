// The many-rows route of row_relevance_update, shared by the CPU and CUDA kernels.
#include <ATen/ATen.h>

#include "../kernels.h"

namespace relfast {

at::Tensor row_relevance_update_via_gemm(const at::Tensor& v, const at::Tensor& grad, const at::Tensor& attn,
                                         bool aggregate) {
  const at::ScalarType acc = accumulation_dtype(v.scalar_type());
  const at::Tensor abar = head_mean_grad_attn_impl(grad, attn, acc, "row_relevance_update");
  const at::Tensor v_acc = v.to(acc);
  return (aggregate ? at::baddbmm(v_acc, v_acc, abar) : at::bmm(v_acc, abar)).to(v.scalar_type());
}

}  // namespace relfast
