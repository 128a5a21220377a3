// CUDA kernel of the streaming rule 6 on K rows of R:
//   out[b,k,j] = (aggregate ? v[b,k,j] : 0) + sum_i v[b,k,i] * (1/H) sum_h max(grad[b,h,i,j] * attn[b,h,i,j], 0)
// in one pass over grad and attn, without materialising abar.
//
// Pass 1: block (column block, row chunk c, sample b), one column j per thread. The block stages
// v[b, :, chunk] * (1/H) in shared memory, then each thread walks the rows i of its chunk, forms
// pbar = sum_h max(g * a, 0) and accumulates the K partial sums in registers. Partials go to an
// opmath workspace (B, C, K, N). Pass 2 sums the C chunks in a fixed order (deterministic, no
// atomics), adds v when aggregating and casts to the input dtype.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../checks.h"
#include "../kernels.h"
#include "cuda_utils.cuh"

namespace relfast {
namespace {

constexpr int kColumnThreads = 128;   // columns j per block of pass 1
constexpr int64_t kMaxChunkRows = 64;  // rows i per chunk (shared-memory tile of v)

static_assert(kFusedRowUpdateMaxRows <= 8, "partial_rows_kernel is instantiated for at most 8 rows");

template <typename scalar_t, int KMAX>
__global__ void __launch_bounds__(kColumnThreads)
    partial_rows_kernel(const scalar_t* __restrict__ v, const scalar_t* __restrict__ grad,
                        const scalar_t* __restrict__ attn, at::opmath_type<scalar_t>* __restrict__ partial, int64_t B,
                        int64_t H, int64_t N, int64_t K, int64_t chunks, int64_t chunk_rows,
                        at::opmath_type<scalar_t> inv_heads, int* __restrict__ nonfinite) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t v_tile[KMAX][kMaxChunkRows];
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kColumnThreads + threadIdx.x;
  const int64_t plane = N * N;
  acc_t check = 0;  // p * 0: NaN for a NaN or infinite product
  // gridDim.y/z are capped at 65535: stride over chunks and samples. Loop bounds are uniform
  // across the block, so every thread reaches every __syncthreads().
  for (int64_t b = blockIdx.z; b < B; b += gridDim.z) {
    for (int64_t c = blockIdx.y; c < chunks; c += gridDim.y) {
      const int64_t i0 = c * chunk_rows;
      const int64_t rows = N - i0 < chunk_rows ? N - i0 : chunk_rows;
      __syncthreads();  // the previous iteration is done with v_tile
      for (int64_t t = threadIdx.x; t < K * rows; t += kColumnThreads) {
        const int64_t k = t / rows, ii = t - k * rows;
        v_tile[k][ii] = static_cast<acc_t>(v[(b * K + k) * N + i0 + ii]) * inv_heads;
      }
      __syncthreads();
      if (j < N) {
        acc_t acc[KMAX];
#pragma unroll
        for (int k = 0; k < KMAX; ++k) acc[k] = acc_t(0);
        const scalar_t* g = grad + b * H * plane + i0 * N + j;
        const scalar_t* a = attn + b * H * plane + i0 * N + j;
        for (int64_t ii = 0; ii < rows; ++ii) {
          acc_t pbar = 0;
          for (int64_t h = 0; h < H; ++h) {
            const acc_t p = static_cast<acc_t>(g[h * plane + ii * N]) * static_cast<acc_t>(a[h * plane + ii * N]);
            pbar += p > acc_t(0) ? p : acc_t(0);
            check += p * acc_t(0);
          }
#pragma unroll
          for (int k = 0; k < KMAX; ++k) {
            if (k < K) acc[k] += v_tile[k][ii] * pbar;
          }
        }
        acc_t* out = partial + (b * chunks + c) * K * N + j;
#pragma unroll
        for (int k = 0; k < KMAX; ++k) {
          if (k < K) out[k * N] = acc[k];
        }
      }
    }
  }
  if (check != acc_t(0)) cuda::raise_flag(nonfinite);  // NaN != 0
}

template <typename scalar_t, int KMAX>
void launch_partial_rows(const at::Tensor& v, const at::Tensor& g, const at::Tensor& a, at::Tensor& partial,
                         int64_t chunks, int64_t chunk_rows, int* nonfinite) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = v.size(0), K = v.size(1), N = v.size(2), H = g.size(1);
  TORCH_INTERNAL_ASSERT(K <= KMAX && chunk_rows <= kMaxChunkRows);
  const dim3 grid(static_cast<unsigned int>(cuda::ceil_div(N, kColumnThreads)),
                  static_cast<unsigned int>(std::min(chunks, cuda::kMaxGridYZ)),
                  static_cast<unsigned int>(std::min(B, cuda::kMaxGridYZ)));
  const acc_t inv_heads = acc_t(1) / static_cast<acc_t>(H);
  partial_rows_kernel<scalar_t, KMAX><<<grid, kColumnThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      v.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(), a.const_data_ptr<scalar_t>(),
      partial.mutable_data_ptr<acc_t>(), B, H, N, K, chunks, chunk_rows, inv_heads, nonfinite);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor row_relevance_update_op(const at::Tensor& v, const at::Tensor& grad, const at::Tensor& attn, bool aggregate) {
  check_row_relevance_update_args(v, grad, attn);
  at::Tensor out = row_relevance_update_cuda(v, grad, attn, aggregate);
  check_result_finite(out, "row_relevance_update");
  return out;
}

}  // namespace

at::Tensor row_relevance_update_cuda(const at::Tensor& v, const at::Tensor& grad, const at::Tensor& attn, bool aggregate) {
  const char* op = "row_relevance_update";
  const c10::cuda::CUDAGuard guard(v.device());
  check_all_finite(v, op, "v");  // K x N values: cheap next to the B x H x N x N pass
  const int64_t B = v.size(0), K = v.size(1), N = v.size(2);
  if (K > kFusedRowUpdateMaxRows) return row_relevance_update_via_gemm(v, grad, attn, aggregate);
  const at::Tensor vc = v.contiguous(), g = grad.contiguous(), a = attn.contiguous();
  at::Tensor out = at::empty_like(vc);
  if (out.numel() == 0) return out;

  // Row chunks: enough blocks to fill the GPU (about 4 per SM), at most kMaxChunkRows rows each,
  // and no empty chunk.
  const int64_t column_blocks = cuda::ceil_div(N, kColumnThreads);
  const int64_t wanted_blocks = 4 * static_cast<int64_t>(cuda::multiprocessor_count());
  int64_t chunks = std::max(cuda::ceil_div(wanted_blocks, column_blocks * B), cuda::ceil_div(N, kMaxChunkRows));
  chunks = std::min(chunks, N);
  const int64_t chunk_rows = cuda::ceil_div(N, chunks);
  chunks = cuda::ceil_div(N, chunk_rows);

  at::Tensor partial = at::empty({B, chunks, K, N}, vc.options().dtype(accumulation_dtype(vc.scalar_type())));
  cuda::NonfiniteFlag flag(vc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, vc.scalar_type(), "row_relevance_update_cuda", [&] {
    if (K == 1) {
      launch_partial_rows<scalar_t, 1>(vc, g, a, partial, chunks, chunk_rows, flag.data());
    } else {
      launch_partial_rows<scalar_t, 8>(vc, g, a, partial, chunks, chunk_rows, flag.data());
    }
    const int64_t total = out.numel();
    cuda::reduce_chunks<scalar_t>(vc.const_data_ptr<scalar_t>(), partial.const_data_ptr<at::opmath_type<scalar_t>>(),
                                  out.mutable_data_ptr<scalar_t>(), K * N, chunks, total, aggregate);
  });
  if (flag.raised()) raise_nonfinite(op, "arguments 'grad' and 'attn'");
  return out;
}

TORCH_LIBRARY_IMPL(relfast, CUDA, m) { m.impl("row_relevance_update", &row_relevance_update_op); }

}  // namespace relfast
