// Device-specific entry points of the fused passes. Public ops validate their arguments first
// (checks.h), then call these; composite ops (csrc/composite) reach the right backend through
// the *_impl helpers below.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace relfast {

// Rows of v handled in one fused pass; larger K materialises abar and uses a GEMM instead,
// because the fused pass does K multiply-adds per element of grad/attn it reads.
constexpr int64_t kFusedRowUpdateMaxRows = 8;

// Each function takes validated, possibly non-contiguous inputs. `out_dtype` lets composite ops
// ask for the accumulation dtype (float32 for half types) instead of the input dtype; `op` is the
// public op named in errors (a composite op reaching this pass names itself).
at::Tensor head_mean_grad_attn_cpu(const at::Tensor& grad, const at::Tensor& attn, at::ScalarType out_dtype,
                                   const char* op);
at::Tensor row_relevance_update_cpu(const at::Tensor& v, const at::Tensor& grad, const at::Tensor& attn, bool aggregate);
at::Tensor normalize_residual_cpu(const at::Tensor& R, at::ScalarType out_dtype);
// sdpa_row_relevance_update on validated inputs; `mask` is undefined or already expanded (a view)
// to (B, H, Nq, Nk), bool or in any float dtype; `scale` resolved.
at::Tensor sdpa_row_relevance_update_cpu(const at::Tensor& v, const at::Tensor& query, const at::Tensor& key,
                                         const at::Tensor& value, const at::Tensor& grad_out,
                                         const at::Tensor& logsumexp, const at::Tensor& mask, bool is_causal,
                                         double scale, bool aggregate);
// Row-normalised (E_h A + I) of one layer, in the accumulation dtype.
at::Tensor rollout_layer_matrix_cpu(const at::Tensor& attn);

#ifdef RELFAST_WITH_CUDA
at::Tensor head_mean_grad_attn_cuda(const at::Tensor& grad, const at::Tensor& attn, at::ScalarType out_dtype,
                                    const char* op);
at::Tensor row_relevance_update_cuda(const at::Tensor& v, const at::Tensor& grad, const at::Tensor& attn, bool aggregate);
at::Tensor normalize_residual_cuda(const at::Tensor& R, at::ScalarType out_dtype);
at::Tensor sdpa_row_relevance_update_cuda(const at::Tensor& v, const at::Tensor& query, const at::Tensor& key,
                                          const at::Tensor& value, const at::Tensor& grad_out,
                                          const at::Tensor& logsumexp, const at::Tensor& mask, bool is_causal,
                                          double scale, bool aggregate);
at::Tensor rollout_layer_matrix_cuda(const at::Tensor& attn);
#endif

// Only reachable for a CUDA tensor in a build without CUDA kernels (no CUDA key is registered
// then, so the dispatcher normally rejects such tensors first).
[[noreturn]] inline void fail_without_cuda_kernels() {
  TORCH_CHECK(false, "relfast was built without CUDA kernels; rebuild with RELFAST_CUDA=1 (see README)");
  throw;  // unreachable
}

inline at::Tensor head_mean_grad_attn_impl(const at::Tensor& grad, const at::Tensor& attn, at::ScalarType out_dtype,
                                           const char* op) {
  if (!grad.is_cuda()) return head_mean_grad_attn_cpu(grad, attn, out_dtype, op);
#ifdef RELFAST_WITH_CUDA
  return head_mean_grad_attn_cuda(grad, attn, out_dtype, op);
#else
  fail_without_cuda_kernels();
#endif
}

inline at::Tensor normalize_residual_impl(const at::Tensor& R, at::ScalarType out_dtype) {
  if (!R.is_cuda()) return normalize_residual_cpu(R, out_dtype);
#ifdef RELFAST_WITH_CUDA
  return normalize_residual_cuda(R, out_dtype);
#else
  fail_without_cuda_kernels();
#endif
}

inline at::Tensor rollout_layer_matrix_impl(const at::Tensor& attn) {
  if (!attn.is_cuda()) return rollout_layer_matrix_cpu(attn);
#ifdef RELFAST_WITH_CUDA
  return rollout_layer_matrix_cuda(attn);
#else
  fail_without_cuda_kernels();
#endif
}

// v + v @ abar (or v @ abar) with abar materialised once by the fused head-mean pass and the
// K x N x N work done by a GEMM: the route for more than kFusedRowUpdateMaxRows rows, any device.
at::Tensor row_relevance_update_via_gemm(const at::Tensor& v, const at::Tensor& grad, const at::Tensor& attn,
                                         bool aggregate);

// float32 for half types, the input dtype otherwise.
inline at::ScalarType accumulation_dtype(at::ScalarType s) {
  return (s == at::kHalf || s == at::kBFloat16) ? at::kFloat : s;
}

}  // namespace relfast
