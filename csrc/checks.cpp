#include "checks.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <functional>
#include <limits>

namespace relfast {
namespace {

std::string shape_str(const at::Tensor& t) { return c10::str(t.sizes()); }

bool is_supported_float(c10::ScalarType s) {
  return s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16;
}

void check_tensor(const at::Tensor& t, const char* op, const char* name, int64_t rank, const char* layout) {
  TORCH_CHECK_VALUE(t.defined(), "relfast.", op, ": argument '", name, "' is an undefined tensor");
  TORCH_CHECK_VALUE(is_supported_float(t.scalar_type()), "relfast.", op, ": argument '", name,
                    "' must be float16, bfloat16, float32 or float64, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == rank, "relfast.", op, ": argument '", name, "' must be a ", rank,
                    "-D tensor of shape ", layout, ", got a ", t.dim(), "-D tensor of shape ", shape_str(t));
  TORCH_CHECK_VALUE(t.layout() == at::kStrided, "relfast.", op, ": argument '", name,
                    "' must be a dense (strided) tensor, got layout ", t.layout());
}

void check_like(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name, const char* ref_name) {
  TORCH_CHECK_VALUE(t.scalar_type() == ref.scalar_type(), "relfast.", op, ": argument '", name,
                    "' must have the dtype of '", ref_name, "' (", ref.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == ref.device(), "relfast.", op, ": argument '", name,
                    "' must be on the device of '", ref_name, "' (", ref.device(), "), got ", t.device());
}

void check_dim(const at::Tensor& t, int64_t d, int64_t expected, const char* op, const char* name,
               const char* what) {
  TORCH_CHECK_VALUE(t.size(d) == expected, "relfast.", op, ": argument '", name, "' has shape ", shape_str(t),
                    " but its dimension ", d, " must equal ", what, " = ", expected);
}

}  // namespace

void raise_nonfinite(const char* op, const char* what) {
  TORCH_CHECK_VALUE(false, "relfast.", op, ": ", what,
                    " must be finite, but contain NaN or infinite values (or values whose products overflow);",
                    " the result would be meaningless");
  C10_THROW_ERROR(ValueError, "unreachable");
}

namespace {

// One allocation-free pass on CPU: x * 0 is 0 for finite x and NaN otherwise. Independent lanes
// keep the loop vectorisable without reassociating floating-point sums.
bool all_finite_cpu(const at::Tensor& t) {
  const at::Tensor c = t.contiguous();
  bool finite = true;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "all_finite_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = c.const_data_ptr<scalar_t>();
    finite = at::parallel_reduce(
        0, c.numel(), int64_t(1) << 16, true,
        [&](int64_t begin, int64_t end, bool) {
          constexpr int kLanes = 16;
          acc_t lanes[kLanes] = {};
          int64_t i = begin;
          for (; i + kLanes <= end; i += kLanes) {
            for (int l = 0; l < kLanes; ++l) lanes[l] += static_cast<acc_t>(x[i + l]) * acc_t(0);
          }
          for (; i < end; ++i) lanes[0] += static_cast<acc_t>(x[i]) * acc_t(0);
          acc_t total = 0;
          for (int l = 0; l < kLanes; ++l) total += lanes[l];
          return total == acc_t(0);
        },
        std::logical_and<bool>());
  });
  return finite;
}

}  // namespace

void check_all_finite(const at::Tensor& t, const char* op, const char* name) {
  if (t.numel() == 0) return;
  const bool finite = t.is_cpu() ? all_finite_cpu(t) : at::isfinite(t).all().item<bool>();
  if (!finite) {
    const std::string what = std::string("argument '") + name + "'";
    raise_nonfinite(op, what.c_str());
  }
}

namespace {

double largest_finite(c10::ScalarType s) {
  double largest = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s, "largest_finite",
                                  [&] { largest = static_cast<double>(std::numeric_limits<scalar_t>::max()); });
  return largest;
}

}  // namespace

void check_result_finite(const at::Tensor& result, const char* op) {
  if (result.numel() == 0) return;
  const bool finite = result.is_cpu() ? all_finite_cpu(result) : at::isfinite(result).all().item<bool>();
  TORCH_CHECK_VALUE(finite, "relfast.", op, ": the result overflowed ", result.scalar_type(),
                    " (finite inputs whose products exceed its largest value, ", largest_finite(result.scalar_type()),
                    "); pass the inputs in a wider dtype (float32, float64) or scale them down");
}

void check_head_mean_grad_attn_args(const at::Tensor& grad, const at::Tensor& attn) {
  const char* op = "head_mean_grad_attn";
  check_tensor(grad, op, "grad", 4, "(B, H, Nq, Nk)");
  check_tensor(attn, op, "attn", 4, "(B, H, Nq, Nk)");
  check_like(attn, grad, op, "attn", "grad");
  TORCH_CHECK_VALUE(grad.sizes() == attn.sizes(), "relfast.", op, ": arguments 'grad' ", shape_str(grad),
                    " and 'attn' ", shape_str(attn), " must have the same shape (B, H, Nq, Nk)");
  TORCH_CHECK_VALUE(grad.size(1) >= 1, "relfast.", op, ": argument 'grad' must have at least one head (H >= 1), got shape ",
                    shape_str(grad));
}

void check_relevance_update_args(const at::Tensor& R, const at::Tensor& abar) {
  const char* op = "relevance_update";
  check_tensor(R, op, "R", 3, "(B, N, M)");
  check_tensor(abar, op, "abar", 3, "(B, N, N)");
  check_like(abar, R, op, "abar", "R");
  check_dim(abar, 0, R.size(0), op, "abar", "the batch size B of 'R'");
  check_dim(abar, 1, R.size(1), op, "abar", "the row count N of 'R'");
  check_dim(abar, 2, R.size(1), op, "abar", "the row count N of 'R' (abar is square)");
}

void check_row_relevance_update_args(const at::Tensor& v, const at::Tensor& grad, const at::Tensor& attn) {
  const char* op = "row_relevance_update";
  check_tensor(v, op, "v", 3, "(B, K, N)");
  check_tensor(grad, op, "grad", 4, "(B, H, N, N)");
  check_tensor(attn, op, "attn", 4, "(B, H, N, N)");
  check_like(grad, v, op, "grad", "v");
  check_like(attn, v, op, "attn", "v");
  TORCH_CHECK_VALUE(grad.sizes() == attn.sizes(), "relfast.", op, ": arguments 'grad' ", shape_str(grad),
                    " and 'attn' ", shape_str(attn), " must have the same shape (B, H, N, N)");
  TORCH_CHECK_VALUE(grad.size(2) == grad.size(3), "relfast.", op, ": argument 'grad' must be square in its last two ",
                    "dimensions (B, H, N, N), got shape ", shape_str(grad));
  TORCH_CHECK_VALUE(grad.size(1) >= 1, "relfast.", op, ": argument 'grad' must have at least one head (H >= 1), got shape ",
                    shape_str(grad));
  check_dim(grad, 0, v.size(0), op, "grad", "the batch size B of 'v'");
  check_dim(grad, 3, v.size(2), op, "grad", "the token count N of 'v'");
}

namespace {

// No NaN and no +inf: -inf is a legitimate masked score or the log-sum-exp of a fully masked row.
void check_no_nan_or_pos_inf(const at::Tensor& t, const char* op, const char* name) {
  if (t.numel() == 0 || t.scalar_type() == at::kBool) return;
  // One pass: max propagates NaN, and is +inf exactly when some element is.
  const double largest = t.max().item<double>();
  const bool ok = !std::isnan(largest) && largest != std::numeric_limits<double>::infinity();
  TORCH_CHECK_VALUE(ok, "relfast.", op, ": argument '", name, "' must not contain NaN or +inf (-inf marks masked ",
                    "entries), but it does; the result would be meaningless");
}

}  // namespace

double check_sdpa_row_relevance_update_args(const at::Tensor& v, const at::Tensor& query, const at::Tensor& key,
                                            const at::Tensor& value, const at::Tensor& grad_out,
                                            const at::Tensor& logsumexp, const c10::optional<at::Tensor>& attn_mask,
                                            c10::optional<double> scale, bool aggregate) {
  const char* op = "sdpa_row_relevance_update";
  check_tensor(v, op, "v", 3, "(B, K, Nq)");
  check_tensor(query, op, "query", 4, "(B, H, Nq, D)");
  check_tensor(key, op, "key", 4, "(B, H_kv, Nk, D)");
  check_tensor(value, op, "value", 4, "(B, H_kv, Nk, Dv)");
  check_tensor(grad_out, op, "grad_out", 4, "(B, H, Nq, Dv)");
  check_tensor(logsumexp, op, "logsumexp", 3, "(B, H, Nq)");
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{query, "query"}, {key, "key"},
                                {value, "value"}, {grad_out, "grad_out"}}) {
    check_like(t, v, op, name, "v");
  }
  TORCH_CHECK_VALUE(logsumexp.device() == v.device(), "relfast.", op, ": argument 'logsumexp' must be on the device ",
                    "of 'v' (", v.device(), "), got ", logsumexp.device());
  const int64_t B = v.size(0), Nq = v.size(2), H = query.size(1), D = query.size(3), Hkv = key.size(1),
                Nk = key.size(2), Dv = value.size(3);
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{query, "query"}, {key, "key"},
                                {value, "value"}, {grad_out, "grad_out"}, {logsumexp, "logsumexp"}}) {
    check_dim(t, 0, B, op, name, "the batch size B of 'v'");
  }
  check_dim(query, 2, Nq, op, "query", "the token count Nq of 'v'");
  TORCH_CHECK_VALUE(H >= 1, "relfast.", op, ": argument 'query' must have at least one head (H >= 1), got shape ",
                    shape_str(query));
  TORCH_CHECK_VALUE(D >= 1 || scale.has_value(), "relfast.", op, ": argument 'query' has head dimension 0 (shape ",
                    shape_str(query), "); the default scale 1/sqrt(D) needs D >= 1");
  check_dim(key, 3, D, op, "key", "the head dimension D of 'query'");
  TORCH_CHECK_VALUE(Hkv >= 1 && H % Hkv == 0, "relfast.", op, ": argument 'key' has ", Hkv, " heads (shape ",
                    shape_str(key), "); the ", H, " query heads must be a multiple of them (grouped-query attention)");
  check_dim(value, 1, Hkv, op, "value", "the head count of 'key'");
  check_dim(value, 2, Nk, op, "value", "the key count Nk of 'key'");
  check_dim(grad_out, 1, H, op, "grad_out", "the head count H of 'query'");
  check_dim(grad_out, 2, Nq, op, "grad_out", "the token count Nq of 'v'");
  check_dim(grad_out, 3, Dv, op, "grad_out", "the value dimension Dv of 'value'");
  check_dim(logsumexp, 1, H, op, "logsumexp", "the head count H of 'query'");
  check_dim(logsumexp, 2, Nq, op, "logsumexp", "the token count Nq of 'v'");
  TORCH_CHECK_VALUE(!aggregate || Nk == Nq, "relfast.", op, ": with aggregate=True the attention must be ",
                    "self-attention (Nk == Nq), got Nq = ", Nq, " queries and Nk = ", Nk, " keys");
  if (attn_mask.has_value() && attn_mask->defined()) {
    const at::Tensor& mask = *attn_mask;
    TORCH_CHECK_VALUE(mask.scalar_type() == at::kBool || is_supported_float(mask.scalar_type()), "relfast.", op,
                      ": argument 'attn_mask' must be bool (True = attend) or a float additive mask, got ",
                      mask.scalar_type());
    TORCH_CHECK_VALUE(mask.device() == v.device(), "relfast.", op, ": argument 'attn_mask' must be on the device ",
                      "of 'v' (", v.device(), "), got ", mask.device());
    TORCH_CHECK_VALUE(mask.layout() == at::kStrided, "relfast.", op,
                      ": argument 'attn_mask' must be a dense (strided) tensor, got layout ", mask.layout());
    const int64_t full[4] = {B, H, Nq, Nk};
    bool broadcasts = mask.dim() <= 4;
    for (int64_t d = 0; broadcasts && d < mask.dim(); ++d) {
      const int64_t size = mask.size(mask.dim() - 1 - d), target = full[3 - d];
      broadcasts = size == 1 || size == target;
    }
    TORCH_CHECK_VALUE(broadcasts, "relfast.", op, ": argument 'attn_mask' of shape ", shape_str(mask),
                      " must broadcast to (B, H, Nq, Nk) = (", B, ", ", H, ", ", Nq, ", ", Nk, ")");
    check_no_nan_or_pos_inf(mask, op, "attn_mask");
  }
  TORCH_CHECK_VALUE(!scale.has_value() || std::isfinite(*scale), "relfast.", op,
                    ": argument 'scale' must be finite, got ", scale.value_or(0.0));
  check_all_finite(v, op, "v");
  check_all_finite(query, op, "query");
  check_all_finite(key, op, "key");
  check_all_finite(value, op, "value");
  check_all_finite(grad_out, op, "grad_out");
  check_no_nan_or_pos_inf(logsumexp, op, "logsumexp");
  return scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(D));
}

void check_normalize_residual_args(const at::Tensor& R) {
  const char* op = "normalize_residual";
  check_tensor(R, op, "R", 3, "(B, N, N)");
  check_dim(R, 2, R.size(1), op, "R", "its row count (R is square)");
}

void check_bimodal_update_args(const at::Tensor& R_sq, const at::Tensor& R_ss, const at::Tensor& abar,
                               const at::Tensor& R_qq) {
  const char* op = "bimodal_update";
  check_tensor(R_sq, op, "R_sq", 3, "(B, S, Q)");
  check_tensor(R_ss, op, "R_ss", 3, "(B, S, S)");
  check_tensor(abar, op, "abar", 3, "(B, S, Q)");
  check_tensor(R_qq, op, "R_qq", 3, "(B, Q, Q)");
  check_like(R_ss, R_sq, op, "R_ss", "R_sq");
  check_like(abar, R_sq, op, "abar", "R_sq");
  check_like(R_qq, R_sq, op, "R_qq", "R_sq");
  const int64_t B = R_sq.size(0), S = R_sq.size(1), Q = R_sq.size(2);
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{R_ss, "R_ss"}, {abar, "abar"}, {R_qq, "R_qq"}}) {
    check_dim(t, 0, B, op, name, "the batch size B of 'R_sq'");
  }
  check_dim(R_ss, 1, S, op, "R_ss", "S = R_sq.size(1)");
  check_dim(R_ss, 2, S, op, "R_ss", "S = R_sq.size(1)");
  check_dim(abar, 1, S, op, "abar", "S = R_sq.size(1)");
  check_dim(abar, 2, Q, op, "abar", "Q = R_sq.size(2)");
  check_dim(R_qq, 1, Q, op, "R_qq", "Q = R_sq.size(2)");
  check_dim(R_qq, 2, Q, op, "R_qq", "Q = R_sq.size(2)");
}

int64_t check_rollout_args(at::TensorList attentions, int64_t start_layer) {
  const char* op = "rollout";
  TORCH_CHECK_VALUE(!attentions.empty(), "relfast.", op, ": argument 'attentions' must hold at least one layer's ",
                    "attention tensor (B, H, N, N), got an empty list");
  const int64_t L = static_cast<int64_t>(attentions.size());
  for (int64_t l = 0; l < L; ++l) {
    const std::string name = "attentions[" + std::to_string(l) + "]";
    const at::Tensor& a = attentions[l];
    check_tensor(a, op, name.c_str(), 4, "(B, H, N, N)");
    TORCH_CHECK_VALUE(a.size(2) == a.size(3), "relfast.", op, ": argument '", name,
                      "' must be square in its last two dimensions (B, H, N, N), got shape ", shape_str(a));
    TORCH_CHECK_VALUE(a.size(1) >= 1, "relfast.", op, ": argument '", name,
                      "' must have at least one head (H >= 1), got shape ", shape_str(a));
    if (l > 0) {
      check_like(a, attentions[0], op, name.c_str(), "attentions[0]");
      TORCH_CHECK_VALUE(a.sizes() == attentions[0].sizes(), "relfast.", op, ": argument '", name, "' has shape ",
                        shape_str(a), " but every layer must have the shape of attentions[0], ",
                        shape_str(attentions[0]));
    }
  }
  TORCH_CHECK_VALUE(start_layer >= -L && start_layer < L, "relfast.", op, ": argument 'start_layer' must lie in [",
                    -L, ", ", L, ") for ", L, " layers, got ", start_layer);
  return start_layer < 0 ? start_layer + L : start_layer;
}

}  // namespace relfast
