// Argument validation shared by every backend. Each op validates before any kernel runs, and
// every message names the op, the argument and what was expected. Errors are c10::ValueError,
// which Python sees as ValueError.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

namespace relfast {

void check_head_mean_grad_attn_args(const at::Tensor& grad, const at::Tensor& attn);
void check_relevance_update_args(const at::Tensor& R, const at::Tensor& abar);
void check_row_relevance_update_args(const at::Tensor& v, const at::Tensor& grad, const at::Tensor& attn);
// Shapes, dtypes and devices of sdpa_row_relevance_update, and the finiteness of its inputs
// (q, k, v, grad_out and v finite; logsumexp and a float mask may hold -inf, never NaN or +inf).
// Returns the scale to use (1/sqrt(D) when none is given).
double check_sdpa_row_relevance_update_args(const at::Tensor& v, const at::Tensor& query, const at::Tensor& key,
                                            const at::Tensor& value, const at::Tensor& grad_out,
                                            const at::Tensor& logsumexp, const c10::optional<at::Tensor>& attn_mask,
                                            c10::optional<double> scale, bool aggregate);
void check_normalize_residual_args(const at::Tensor& R);
void check_bimodal_update_args(const at::Tensor& R_sq, const at::Tensor& R_ss, const at::Tensor& abar,
                               const at::Tensor& R_qq);
// Returns the start layer as a non-negative index (Python-style negative indices are accepted).
int64_t check_rollout_args(at::TensorList attentions, int64_t start_layer);

// Raises if any element of `t` is NaN or +-inf. Costs one read of `t`; fused kernels check
// inside their own pass instead and call raise_nonfinite.
void check_all_finite(const at::Tensor& t, const char* op, const char* name);
[[noreturn]] void raise_nonfinite(const char* op, const char* what);
// Raises if an op's result is not finite although its inputs were: the products overflowed the
// result's dtype (float16's largest value is 65504). Checked on the result, where it is cheapest.
void check_result_finite(const at::Tensor& result, const char* op);

}  // namespace relfast
