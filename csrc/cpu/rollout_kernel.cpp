// CPU kernel of one rollout factor ([P1] Eq. 16): row-normalised (E_h A + I), in the
// accumulation dtype. The 1/H of the head mean cancels in the row normalisation, so the row is
// (sum_h A[h, i, :] + H e_i) / its sum. A row summing to 0 becomes 0.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>

#include "../checks.h"
#include "../kernels.h"
#include "row_loops.h"

namespace relfast {
namespace {

// One task = a block of rows of one sample (head by head, one contiguous run of attn).
template <typename scalar_t>
bool rollout_layer_kernel(const scalar_t* attn, at::opmath_type<scalar_t>* out, int64_t B, int64_t H, int64_t N) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t block_rows = cpu::rows_per_block(N);
  const int64_t blocks = (N + block_rows - 1) / block_rows;
  std::atomic<bool> nonfinite{false};
  at::parallel_for(0, B * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks, i0 = (task % blocks) * block_rows, rows = std::min(block_rows, N - i0);
      acc_t* block = out + (b * N + i0) * N;  // accumulate straight into the output rows
      std::fill(block, block + rows * N, acc_t(0));
      for (int64_t h = 0; h < H; ++h) cpu::accumulate(attn + ((b * H + h) * N + i0) * N, block, rows * N);
      for (int64_t r = 0; r < rows; ++r) {
        acc_t* o = block + r * N;
        o[i0 + r] += static_cast<acc_t>(H);
        const acc_t total = cpu::sum(o, N);
        if (!std::isfinite(total)) {  // NaN/inf anywhere in the row reaches the sum
          nonfinite.store(true, std::memory_order_relaxed);
          continue;
        }
        const acc_t scale = total == acc_t(0) ? acc_t(0) : acc_t(1) / total;
#pragma omp simd
        for (int64_t j = 0; j < N; ++j) o[j] *= scale;
      }
    }
  });
  return !nonfinite.load();
}

}  // namespace

at::Tensor rollout_layer_matrix_cpu(const at::Tensor& attn) {
  const at::Tensor a = attn.contiguous();
  const int64_t B = a.size(0), H = a.size(1), N = a.size(2);
  at::Tensor out = at::empty({B, N, N}, a.options().dtype(accumulation_dtype(a.scalar_type())));
  if (out.numel() == 0) return out;
  bool finite = true;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "rollout_layer_matrix_cpu", [&] {
    finite = rollout_layer_kernel<scalar_t>(a.const_data_ptr<scalar_t>(), out.mutable_data_ptr<at::opmath_type<scalar_t>>(),
                                            B, H, N);
  });
  if (!finite) raise_nonfinite("rollout", "argument 'attentions'");
  return out;
}

}  // namespace relfast
