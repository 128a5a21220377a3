// CUDA kernel of [P2] rules 8-9 (handle_residual): out = (R - I) / rowsum(R - I) + I.
// A row of R - I that sums to exactly 0 is scaled by 0 (it becomes the identity row), as on CPU.
// One block per row (b, i): a deterministic block reduction of the residual sum, then each thread
// writes the entries it summed.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../checks.h"
#include "../kernels.h"
#include "cuda_utils.cuh"

namespace relfast {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t, typename out_t>
__global__ void __launch_bounds__(kThreads)
    normalize_residual_kernel(const scalar_t* __restrict__ R, out_t* __restrict__ out, int64_t rows, int64_t N,
                              int* __restrict__ nonfinite) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t scratch[kThreads / cuda::kWarpSize];
  // Row loop bounds are uniform across the block, so every thread reaches block_sum's barriers.
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t i = row % N;
    const scalar_t* x = R + row * N;
    out_t* o = out + row * N;
    // (R_ii - 1) enters the sum in place of R_ii: R_ii is close to 1, and summing it whole before
    // subtracting 1 would lose the small off-diagonal mass to rounding.
    acc_t partial = 0;
    for (int64_t j = threadIdx.x; j < N; j += kThreads) {
      const acc_t xj = static_cast<acc_t>(x[j]);
      partial += j == i ? xj - acc_t(1) : xj;
    }
    const acc_t residual_sum = cuda::block_sum<kThreads>(partial, scratch);
    if (!cuda::is_finite(residual_sum)) {  // any NaN/inf element makes the sum non-finite
      if (threadIdx.x == 0) cuda::raise_flag(nonfinite);
      continue;  // uniform: every thread sees the same residual_sum
    }
    const acc_t scale = residual_sum == acc_t(0) ? acc_t(0) : acc_t(1) / residual_sum;
    for (int64_t j = threadIdx.x; j < N; j += kThreads) {
      const acc_t xj = static_cast<acc_t>(x[j]);
      o[j] = static_cast<out_t>(j == i ? (xj - acc_t(1)) * scale + acc_t(1) : xj * scale);
    }
  }
}

template <typename scalar_t, typename out_t>
void launch(const at::Tensor& x, at::Tensor& out, int* nonfinite) {
  const int64_t N = x.size(1), rows = x.size(0) * N;
  normalize_residual_kernel<scalar_t, out_t>
      <<<cuda::grid_stride_blocks(rows, 1), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<out_t>(), rows, N, nonfinite);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor normalize_residual_op(const at::Tensor& R) {
  check_normalize_residual_args(R);
  at::Tensor out = normalize_residual_cuda(R, R.scalar_type());
  check_result_finite(out, "normalize_residual");
  return out;
}

}  // namespace

at::Tensor normalize_residual_cuda(const at::Tensor& R, at::ScalarType out_dtype) {
  const c10::cuda::CUDAGuard guard(R.device());
  const at::Tensor x = R.contiguous();
  const int64_t B = x.size(0), N = x.size(1);
  at::Tensor out = at::empty({B, N, N}, x.options().dtype(out_dtype));
  if (out.numel() == 0) return out;
  cuda::NonfiniteFlag flag(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "normalize_residual_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (out_dtype == x.scalar_type()) {
      launch<scalar_t, scalar_t>(x, out, flag.data());
    } else {
      TORCH_CHECK(out_dtype == accumulation_dtype(x.scalar_type()), "normalize_residual_cuda: unsupported out_dtype");
      launch<scalar_t, acc_t>(x, out, flag.data());
    }
  });
  if (flag.raised()) raise_nonfinite("normalize_residual", "argument 'R'");
  return out;
}

TORCH_LIBRARY_IMPL(relfast, CUDA, m) { m.impl("normalize_residual", &normalize_residual_op); }

}  // namespace relfast
