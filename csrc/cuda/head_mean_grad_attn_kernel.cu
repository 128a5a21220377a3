// CUDA kernel of [P2] rule 5: out[b,q,k] = (1/H) sum_h max(grad[b,h,q,k] * attn[b,h,q,k], 0).
// One thread per output element with the head loop inside: for each head, consecutive threads
// read consecutive k, so every load is coalesced.
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

// `plane` = Nq * Nk elements per (b, h); `total` = B * plane outputs.
template <typename scalar_t, typename out_t>
__global__ void __launch_bounds__(kThreads)
    head_mean_grad_attn_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ attn,
                               out_t* __restrict__ out, int64_t H, int64_t plane, int64_t total,
                               at::opmath_type<scalar_t> inv_heads, int* __restrict__ nonfinite) {
  using acc_t = at::opmath_type<scalar_t>;
  // Stays 0 for finite products; p * 0 is NaN when p is NaN or infinite.
  acc_t check = 0;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += stride) {
    const int64_t b = idx / plane, r = idx - b * plane;
    const scalar_t* g = grad + b * H * plane + r;
    const scalar_t* a = attn + b * H * plane + r;
    acc_t head_sum = 0;
    for (int64_t h = 0; h < H; ++h) {
      const acc_t p = static_cast<acc_t>(g[h * plane]) * static_cast<acc_t>(a[h * plane]);
      head_sum += p > acc_t(0) ? p : acc_t(0);
      check += p * acc_t(0);
    }
    out[idx] = static_cast<out_t>(head_sum * inv_heads);
  }
  if (check != acc_t(0)) cuda::raise_flag(nonfinite);  // NaN != 0
}

template <typename scalar_t, typename out_t>
void launch(const at::Tensor& g, const at::Tensor& a, at::Tensor& out, int* nonfinite) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = g.size(0), H = g.size(1), plane = g.size(2) * g.size(3);
  const int64_t total = B * plane;
  const acc_t inv_heads = acc_t(1) / static_cast<acc_t>(H);
  head_mean_grad_attn_kernel<scalar_t, out_t>
      <<<cuda::grid_stride_blocks(total, kThreads), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          g.const_data_ptr<scalar_t>(), a.const_data_ptr<scalar_t>(), out.mutable_data_ptr<out_t>(), H, plane, total,
          inv_heads, nonfinite);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor head_mean_grad_attn_op(const at::Tensor& grad, const at::Tensor& attn) {
  check_head_mean_grad_attn_args(grad, attn);
  at::Tensor out = head_mean_grad_attn_cuda(grad, attn, grad.scalar_type(), "head_mean_grad_attn");
  check_result_finite(out, "head_mean_grad_attn");
  return out;
}

}  // namespace

at::Tensor head_mean_grad_attn_cuda(const at::Tensor& grad, const at::Tensor& attn, at::ScalarType out_dtype,
                                                  const char* op) {
  const c10::cuda::CUDAGuard guard(grad.device());
  const at::Tensor g = grad.contiguous(), a = attn.contiguous();
  const int64_t B = g.size(0), Nq = g.size(2), Nk = g.size(3);
  at::Tensor out = at::empty({B, Nq, Nk}, g.options().dtype(out_dtype));
  if (out.numel() == 0) return out;
  cuda::NonfiniteFlag flag(g);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "head_mean_grad_attn_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (out_dtype == g.scalar_type()) {
      launch<scalar_t, scalar_t>(g, a, out, flag.data());
    } else {
      TORCH_CHECK(out_dtype == accumulation_dtype(g.scalar_type()), "head_mean_grad_attn_cuda: unsupported out_dtype");
      launch<scalar_t, acc_t>(g, a, out, flag.data());
    }
  });
  if (flag.raised()) raise_nonfinite(op, "arguments 'grad' and 'attn'");
  return out;
}

TORCH_LIBRARY_IMPL(relfast, CUDA, m) { m.impl("head_mean_grad_attn", &head_mean_grad_attn_op); }

}  // namespace relfast
