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

// The rows i of the sum are split into a fixed number of groups; a task (sample b, group) streams
// its rows block by block (head by head, one contiguous run each) and accumulates a K x N partial
// result. The partials are then summed in group order. The split depends on N only, so results
// are deterministic and do not change with the batch size or the thread count.
constexpr int64_t kRowGroups = 16;

template <typename scalar_t>
bool row_relevance_update_kernel(const scalar_t* v, const scalar_t* grad, const scalar_t* attn, scalar_t* out,
                                 int64_t B, int64_t H, int64_t N, int64_t K, bool aggregate) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t inv_heads = acc_t(1) / static_cast<acc_t>(H);
  const int64_t group_rows = (N + std::min(N, kRowGroups) - 1) / std::min(N, kRowGroups);
  const int64_t groups = (N + group_rows - 1) / group_rows;
  const int64_t block_rows = std::min(cpu::rows_per_block(N), group_rows);
  std::vector<acc_t> partial(B * groups * K * N);
  std::atomic<bool> nonfinite{false};
  at::parallel_for(0, B * groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> head_sum(block_rows * N);
    cpu::FiniteCheck<acc_t> check;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / groups, i_begin = (task % groups) * group_rows;
      const int64_t i_end = std::min(N, i_begin + group_rows);
      acc_t* rows_out = partial.data() + task * K * N;
      std::fill(rows_out, rows_out + K * N, acc_t(0));
      for (int64_t i0 = i_begin; i0 < i_end; i0 += block_rows) {
        const int64_t rows = std::min(block_rows, i_end - i0);
        std::fill(head_sum.begin(), head_sum.begin() + rows * N, acc_t(0));
        cpu::accumulate_positive_products_over_heads(
            grad, attn, H, [&](int64_t h) { return ((b * H + h) * N + i0) * N; }, head_sum.data(), rows * N, check);
        for (int64_t r = 0; r < rows; ++r) {
          for (int64_t k = 0; k < K; ++k) {
            const acc_t weight = static_cast<acc_t>(v[(b * K + k) * N + i0 + r]) * inv_heads;
            cpu::axpy(weight, head_sum.data() + r * N, rows_out + k * N, N);
          }
        }
      }
    }
    if (check.saw_nonfinite()) nonfinite.store(true, std::memory_order_relaxed);
  });
  // out = v (when aggregating) + the partials, summed in group order.
  at::parallel_for(0, B * K, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> total(N);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / K, k = row % K;
      const scalar_t* v_row = v + row * N;
      for (int64_t j = 0; j < N; ++j) total[j] = aggregate ? static_cast<acc_t>(v_row[j]) : acc_t(0);
      for (int64_t g = 0; g < groups; ++g) {
        cpu::axpy(acc_t(1), partial.data() + ((b * groups + g) * K + k) * N, total.data(), N);
      }
      scalar_t* out_row = out + row * N;
      for (int64_t j = 0; j < N; ++j) out_row[j] = static_cast<scalar_t>(total[j]);
    }
  });
  return !nonfinite.load();
}

at::Tensor row_relevance_update_op(const at::Tensor& v, const at::Tensor& grad, const at::Tensor& attn, bool aggregate) {
  check_row_relevance_update_args(v, grad, attn);
  at::Tensor out = row_relevance_update_cpu(v, grad, attn, aggregate);
  check_result_finite(out, "row_relevance_update");
  return out;
}

}  // namespace

at::Tensor row_relevance_update_cpu(const at::Tensor& v, const at::Tensor& grad, const at::Tensor& attn, bool aggregate) {
  const char* op = "row_relevance_update";
  check_all_finite(v, op, "v");  // K x N values: cheap next to the B x H x N x N pass
  const int64_t B = v.size(0), K = v.size(1), N = v.size(2), H = grad.size(1);
  if (K > kFusedRowUpdateMaxRows) return row_relevance_update_via_gemm(v, grad, attn, aggregate);
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
