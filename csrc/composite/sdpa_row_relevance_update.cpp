// Streaming rule 6 on K rows from a fused attention's saved tensors (SPEC.md, "Another fact"):
//   out[b,k,j] = (aggregate ? v[b,k,j] : 0) + sum_i v[b,k,i] * (1/H) sum_h max(dA[b,h,i,j] * A[b,h,i,j], 0)
// with A = exp(scale * q k^T + mask - logsumexp) and dA = grad_out v^T recomputed tile by tile by
// the backend kernel. This file is the op's entry for every device: validate, broadcast the mask
// as a view, pick the backend, check the result.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../checks.h"
#include "../kernels.h"

namespace relfast {
namespace {

constexpr const char* kOp = "sdpa_row_relevance_update";

at::Tensor sdpa_row_relevance_update_op(const at::Tensor& v, const at::Tensor& query, const at::Tensor& key,
                                        const at::Tensor& value, const at::Tensor& grad_out,
                                        const at::Tensor& logsumexp, const c10::optional<at::Tensor>& attn_mask,
                                        bool is_causal, c10::optional<double> scale, bool aggregate) {
  const double resolved_scale =
      check_sdpa_row_relevance_update_args(v, query, key, value, grad_out, logsumexp, attn_mask, scale, aggregate);
  at::Tensor mask;
  if (attn_mask.has_value() && attn_mask->defined()) {
    mask = attn_mask->expand({query.size(0), query.size(1), query.size(2), key.size(2)});
  }
  at::Tensor out;
  if (v.is_cuda()) {
#ifdef RELFAST_WITH_CUDA
    out = sdpa_row_relevance_update_cuda(v, query, key, value, grad_out, logsumexp, mask, is_causal, resolved_scale,
                                         aggregate);
#else
    fail_without_cuda_kernels();
#endif
  } else {
    out = sdpa_row_relevance_update_cpu(v, query, key, value, grad_out, logsumexp, mask, is_causal, resolved_scale,
                                        aggregate);
  }
  check_result_finite(out, kOp);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(relfast, CPU, m) { m.impl("sdpa_row_relevance_update", &sdpa_row_relevance_update_op); }

#ifdef RELFAST_WITH_CUDA
TORCH_LIBRARY_IMPL(relfast, CUDA, m) { m.impl("sdpa_row_relevance_update", &sdpa_row_relevance_update_op); }
#endif

}  // namespace relfast
