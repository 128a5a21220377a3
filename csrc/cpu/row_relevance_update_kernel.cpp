// CPU kernel of the streaming rule 6 on K rows of R:
//   out[b,k,j] = v[b,k,j] + sum_i v[b,k,i] * (1/H) sum_h max(grad[b,h,i,j] * attn[b,h,i,j], 0)
// in one pass over grad and attn, without materialising abar.
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

// Columns j are split into chunks; one task owns (sample b, column chunk) and walks every
// (i, h) row segment of that chunk, so tasks never share outputs and B = 1 still parallelises.
int64_t column_chunk(int64_t B, int64_t N) {
  const int64_t tasks_per_sample = std::max<int64_t>(1, (4 * at::get_num_threads() + B - 1) / std::max<int64_t>(B, 1));
  int64_t chunk = (N + tasks_per_sample - 1) / tasks_per_sample;
  chunk = (chunk + 15) / 16 * 16;                  // whole cache lines of float32
  chunk = std::clamp<int64_t>(chunk, 64, 1024);    // long enough segments for the prefetcher
  return std::min(chunk, N);
}

template <typename scalar_t>
bool row_relevance_update_kernel(const scalar_t* v, const scalar_t* grad, const scalar_t* attn, scalar_t* out,
                                 int64_t B, int64_t H, int64_t N, int64_t K, bool aggregate) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t inv_heads = acc_t(1) / static_cast<acc_t>(H);
  const int64_t chunk = column_chunk(B, N);
  const int64_t chunks = (N + chunk - 1) / chunk;
  std::atomic<bool> nonfinite{false};
  at::parallel_for(0, B * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> row_acc(K * chunk), head_sum(chunk), check(chunk, acc_t(0));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks, j0 = (task % chunks) * chunk, len = std::min(chunk, N - j0);
      std::fill(row_acc.begin(), row_acc.end(), acc_t(0));
      for (int64_t i = 0; i < N; ++i) {
        std::fill(head_sum.begin(), head_sum.begin() + len, acc_t(0));
        for (int64_t h = 0; h < H; ++h) {
          const int64_t offset = ((b * H + h) * N + i) * N + j0;
          cpu::accumulate_positive_products(grad + offset, attn + offset, head_sum.data(), check.data(), len);
        }
        for (int64_t k = 0; k < K; ++k) {
          const acc_t weight = static_cast<acc_t>(v[(b * K + k) * N + i]) * inv_heads;
          cpu::axpy(weight, head_sum.data(), row_acc.data() + k * chunk, len);
        }
      }
      for (int64_t k = 0; k < K; ++k) {
        const scalar_t* v_row = v + (b * K + k) * N + j0;
        scalar_t* out_row = out + (b * K + k) * N + j0;
        const acc_t* acc_row = row_acc.data() + k * chunk;
        for (int64_t j = 0; j < len; ++j) {
          out_row[j] = static_cast<scalar_t>((aggregate ? static_cast<acc_t>(v_row[j]) : acc_t(0)) + acc_row[j]);
        }
      }
    }
    if (cpu::saw_nonfinite(check.data(), chunk)) nonfinite.store(true, std::memory_order_relaxed);
  });
  return !nonfinite.load();
}

at::Tensor row_relevance_update_op(const at::Tensor& v, const at::Tensor& grad, const at::Tensor& attn, bool aggregate) {
  check_row_relevance_update_args(v, grad, attn);
  return row_relevance_update_cpu(v, grad, attn, aggregate);
}

}  // namespace

at::Tensor row_relevance_update_cpu(const at::Tensor& v, const at::Tensor& grad, const at::Tensor& attn, bool aggregate) {
  const char* op = "row_relevance_update";
  check_all_finite(v, op, "v");  // K x N values: cheap next to the B x H x N x N pass
  const int64_t B = v.size(0), K = v.size(1), N = v.size(2), H = grad.size(1);
  if (K > kFusedRowUpdateMaxRows) {
    // Many rows: materialise abar once (fused pass) and let the GEMM do the K x N x N work.
    const at::ScalarType acc = accumulation_dtype(v.scalar_type());
    const at::Tensor abar = head_mean_grad_attn_cpu(grad, attn, acc);
    const at::Tensor v_acc = v.to(acc);
    return (aggregate ? at::baddbmm(v_acc, v_acc, abar) : at::bmm(v_acc, abar)).to(v.scalar_type());
  }
  const at::Tensor vc = v.contiguous(), g = grad.contiguous(), a = attn.contiguous();
  at::Tensor out = at::empty_like(vc);
  if (out.numel() == 0) return out;
  bool finite = true;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, vc.scalar_type(), "row_relevance_update_cpu", [&] {
    finite = row_relevance_update_kernel<scalar_t>(vc.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(),
                                                   a.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), B, H,
                                                   N, K, aggregate);
  });
  if (!finite) raise_nonfinite(op, "arguments 'grad' and 'attn'");
  return out;
}

TORCH_LIBRARY_IMPL(relfast, CPU, m) { m.impl("row_relevance_update", &row_relevance_update_op); }

}  // namespace relfast
