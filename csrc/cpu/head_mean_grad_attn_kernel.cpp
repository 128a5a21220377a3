// CPU kernel of [P2] rule 5: out[b,q,k] = (1/H) sum_h max(grad[b,h,q,k] * attn[b,h,q,k], 0).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "../checks.h"
#include "../kernels.h"
#include "row_loops.h"

namespace relfast {
namespace {

// Returns false when a product was NaN or infinite. One task = a block of rows of one sample;
// head by head, the block is one contiguous run of grad and attn.
template <typename scalar_t, typename out_t>
bool head_mean_grad_attn_kernel(const scalar_t* grad, const scalar_t* attn, out_t* out, int64_t B, int64_t H,
                                int64_t Nq, int64_t Nk) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t inv_heads = acc_t(1) / static_cast<acc_t>(H);
  const int64_t block_rows = cpu::rows_per_block(Nk);
  const int64_t blocks = (Nq + block_rows - 1) / block_rows;
  std::atomic<bool> nonfinite{false};
  at::parallel_for(0, B * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> head_sum(block_rows * Nk);
    cpu::FiniteCheck<acc_t> check;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks, q0 = (task % blocks) * block_rows;
      const int64_t len = std::min(block_rows, Nq - q0) * Nk;
      std::fill(head_sum.begin(), head_sum.begin() + len, acc_t(0));
      cpu::accumulate_positive_products_over_heads(
          grad, attn, H, [&](int64_t h) { return ((b * H + h) * Nq + q0) * Nk; }, head_sum.data(), len, check);
      out_t* out_block = out + (b * Nq + q0) * Nk;
      for (int64_t e = 0; e < len; ++e) out_block[e] = static_cast<out_t>(head_sum[e] * inv_heads);
    }
    if (check.saw_nonfinite()) nonfinite.store(true, std::memory_order_relaxed);
  });
  return !nonfinite.load();
}

at::Tensor head_mean_grad_attn_op(const at::Tensor& grad, const at::Tensor& attn) {
  check_head_mean_grad_attn_args(grad, attn);
  at::Tensor out = head_mean_grad_attn_cpu(grad, attn, grad.scalar_type(), "head_mean_grad_attn");
  check_result_finite(out, "head_mean_grad_attn");
  return out;
}

}  // namespace

at::Tensor head_mean_grad_attn_cpu(const at::Tensor& grad, const at::Tensor& attn, at::ScalarType out_dtype,
                                                 const char* op) {
  const at::Tensor g = grad.contiguous(), a = attn.contiguous();
  const int64_t B = g.size(0), H = g.size(1), Nq = g.size(2), Nk = g.size(3);
  at::Tensor out = at::empty({B, Nq, Nk}, g.options().dtype(out_dtype));
  if (out.numel() == 0) return out;
  bool finite = true;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "head_mean_grad_attn_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (out_dtype == g.scalar_type()) {
      finite = head_mean_grad_attn_kernel<scalar_t, scalar_t>(g.const_data_ptr<scalar_t>(), a.const_data_ptr<scalar_t>(),
                                                              out.mutable_data_ptr<scalar_t>(), B, H, Nq, Nk);
    } else {
      TORCH_CHECK(out_dtype == accumulation_dtype(g.scalar_type()), "head_mean_grad_attn_cpu: unsupported out_dtype");
      finite = head_mean_grad_attn_kernel<scalar_t, acc_t>(g.const_data_ptr<scalar_t>(), a.const_data_ptr<scalar_t>(),
                                                           out.mutable_data_ptr<acc_t>(), B, H, Nq, Nk);
    }
  });
  if (!finite) raise_nonfinite(op, "arguments 'grad' and 'attn'");
  return out;
}

TORCH_LIBRARY_IMPL(relfast, CPU, m) { m.impl("head_mean_grad_attn", &head_mean_grad_attn_op); }

}  // namespace relfast
