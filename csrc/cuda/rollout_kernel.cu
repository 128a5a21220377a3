// CUDA kernel of one rollout factor ([P1] Eq. 16): row-normalised (E_h A + I), in the
// accumulation dtype. The 1/H of the head mean cancels in the row normalisation, so the row is
// (sum_h A[h, i, :] + H e_i) / its sum. A row summing to 0 becomes 0. The op "rollout" itself is
// registered for CUDA by csrc/composite/rollout.cpp.
//
// One block per row (b, i): each thread sums the heads of its entries and writes them, the block
// reduces the row total (deterministically), then each thread rescales the entries it wrote.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../checks.h"
#include "../kernels.h"
#include "cuda_utils.cuh"

namespace relfast {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    rollout_layer_kernel(const scalar_t* __restrict__ attn, at::opmath_type<scalar_t>* __restrict__ out, int64_t rows,
                         int64_t H, int64_t N, int* __restrict__ nonfinite) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t scratch[kThreads / cuda::kWarpSize];
  const int64_t plane = N * N;
  // Row loop bounds are uniform across the block, so every thread reaches block_sum's barriers.
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t b = row / N, i = row - b * N;
    const scalar_t* a = attn + b * H * plane + i * N;
    acc_t* o = out + row * N;
    acc_t partial = 0;
    for (int64_t j = threadIdx.x; j < N; j += kThreads) {
      acc_t s = 0;
      for (int64_t h = 0; h < H; ++h) s += static_cast<acc_t>(a[h * plane + j]);
      if (j == i) s += static_cast<acc_t>(H);
      o[j] = s;
      partial += s;
    }
    const acc_t total = cuda::block_sum<kThreads>(partial, scratch);
    if (!cuda::is_finite(total)) {  // NaN/inf anywhere in the row reaches the sum
      if (threadIdx.x == 0) cuda::raise_flag(nonfinite);
      continue;  // uniform: every thread sees the same total
    }
    const acc_t scale = total == acc_t(0) ? acc_t(0) : acc_t(1) / total;
    for (int64_t j = threadIdx.x; j < N; j += kThreads) o[j] *= scale;  // entries this thread wrote
  }
}

}  // namespace

at::Tensor rollout_layer_matrix_cuda(const at::Tensor& attn) {
  const c10::cuda::CUDAGuard guard(attn.device());
  const at::Tensor a = attn.contiguous();
  const int64_t B = a.size(0), H = a.size(1), N = a.size(2);
  at::Tensor out = at::empty({B, N, N}, a.options().dtype(accumulation_dtype(a.scalar_type())));
  if (out.numel() == 0) return out;
  cuda::NonfiniteFlag flag(a);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "rollout_layer_matrix_cuda", [&] {
    const int64_t rows = B * N;
    rollout_layer_kernel<scalar_t>
        <<<cuda::grid_stride_blocks(rows, 1), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
            a.const_data_ptr<scalar_t>(), out.mutable_data_ptr<at::opmath_type<scalar_t>>(), rows, H, N, flag.data());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (flag.raised()) raise_nonfinite("rollout", "argument 'attentions'");
  return out;
}

}  // namespace relfast
