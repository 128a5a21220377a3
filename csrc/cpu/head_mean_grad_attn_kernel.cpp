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

// Returns false when a product was NaN or infinite.
template <typename scalar_t, typename out_t>
bool head_mean_grad_attn_kernel(const scalar_t* grad, const scalar_t* attn, out_t* out, int64_t B, int64_t H,
                                int64_t Nq, int64_t Nk) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t inv_heads = acc_t(1) / static_cast<acc_t>(H);
  const int64_t rows = B * Nq;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, H * Nk));
  std::atomic<bool> nonfinite{false};
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> head_sum(Nk), check(Nk, acc_t(0));
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / Nq, q = row % Nq;
      std::fill(head_sum.begin(), head_sum.end(), acc_t(0));
      for (int64_t h = 0; h < H; ++h) {
        const int64_t offset = ((b * H + h) * Nq + q) * Nk;
        cpu::accumulate_positive_products(grad + offset, attn + offset, head_sum.data(), check.data(), Nk);
      }
      out_t* out_row = out + row * Nk;
      for (int64_t k = 0; k < Nk; ++k) out_row[k] = static_cast<out_t>(head_sum[k] * inv_heads);
    }
    if (cpu::saw_nonfinite(check.data(), Nk)) nonfinite.store(true, std::memory_order_relaxed);
  });
  return !nonfinite.load();
}

at::Tensor head_mean_grad_attn_op(const at::Tensor& grad, const at::Tensor& attn) {
  check_head_mean_grad_attn_args(grad, attn);
  return head_mean_grad_attn_cpu(grad, attn, grad.scalar_type());
}

}  // namespace

at::Tensor head_mean_grad_attn_cpu(const at::Tensor& grad, const at::Tensor& attn, at::ScalarType out_dtype) {
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
  if (!finite) raise_nonfinite("head_mean_grad_attn", "arguments 'grad' and 'attn'");
  return out;
}

TORCH_LIBRARY_IMPL(relfast, CPU, m) { m.impl("head_mean_grad_attn", &head_mean_grad_attn_op); }

}  // namespace relfast
