// Helpers shared by the CUDA kernels: launch geometry, a deterministic block sum, and the device
// flag through which fused kernels report non-finite values (the CPU kernels' `check` buffers).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace relfast::cuda {

constexpr int kWarpSize = 32;
// Upper bound on gridDim.x for grid-stride kernels (the hardware allows 2^31 - 1; more blocks
// than this only add scheduling overhead).
constexpr int64_t kMaxGridX = int64_t(1) << 20;
// Hardware limit of gridDim.y and gridDim.z.
constexpr int64_t kMaxGridYZ = 65535;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks for a grid-stride loop over `n` items, `per_block` items per block and pass.
inline unsigned int grid_stride_blocks(int64_t n, int64_t per_block) {
  return static_cast<unsigned int>(std::clamp<int64_t>(ceil_div(n, per_block), 1, kMaxGridX));
}

// Streaming multiprocessors of the current device (the caller holds a CUDAGuard).
inline int multiprocessor_count() {
  int device = 0, count = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return std::max(count, 1);
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Sum of `v` over a block of kThreads threads (a multiple of 32, at most 1024), returned to every
// thread. The reduction order is fixed, so the result is deterministic. Every thread of the block
// must call it (it synchronises); `scratch` is shared memory of at least kThreads / 32 elements,
// and may be reused by the next call.
template <int kThreads, typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t v, acc_t* scratch) {
  static_assert(kThreads % kWarpSize == 0 && kThreads <= 1024, "block_sum: bad block size");
  constexpr int kWarps = kThreads / kWarpSize;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  v = warp_sum(v);
  __syncthreads();  // earlier readers of scratch[0] are done
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    acc_t w = lane < kWarps ? scratch[lane] : acc_t(0);
    w = warp_sum(w);
    if (lane == 0) scratch[0] = w;
  }
  __syncthreads();
  return scratch[0];
}

// False for NaN and +-inf.
template <typename acc_t>
__device__ __forceinline__ bool is_finite(acc_t x) {
  return ::isfinite(x);
}

// A device int that kernels set to 1 when they see a non-finite value. Create it under the
// kernel's CUDAGuard; raised() synchronises with the current stream.
class NonfiniteFlag {
 public:
  explicit NonfiniteFlag(const at::Tensor& like) : flag_(at::zeros({1}, like.options().dtype(at::kInt))) {}
  int* data() { return flag_.mutable_data_ptr<int>(); }
  bool raised() const { return flag_.item<int>() != 0; }

 private:
  at::Tensor flag_;
};

// Records a non-finite value seen by this thread (many threads may store the same 1).
__device__ __forceinline__ void raise_flag(int* flag) { *flag = 1; }

constexpr int kReduceThreads = 256;

// out[b, r] = (aggregate ? v[b, r] : 0) + sum_c partial[b, c, r] for r < KN: the second pass of
// the row-update kernels, which write one opmath partial per chunk of rows; summed in chunk order,
// so results are deterministic (no atomics).
template <typename scalar_t>
__global__ void __launch_bounds__(kReduceThreads)
    reduce_chunks_kernel(const scalar_t* __restrict__ v, const at::opmath_type<scalar_t>* __restrict__ partial,
                         scalar_t* __restrict__ out, int64_t KN, int64_t chunks, int64_t total, bool aggregate) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += stride) {
    const int64_t b = idx / KN, r = idx - b * KN;
    const acc_t* p = partial + b * chunks * KN + r;
    acc_t sum = 0;
    for (int64_t c = 0; c < chunks; ++c) sum += p[c * KN];
    out[idx] = static_cast<scalar_t>((aggregate ? static_cast<acc_t>(v[idx]) : acc_t(0)) + sum);
  }
}

// Launches reduce_chunks_kernel over the `total` = B * KN outputs on the current stream.
template <typename scalar_t>
void reduce_chunks(const scalar_t* v, const at::opmath_type<scalar_t>* partial, scalar_t* out, int64_t KN,
                   int64_t chunks, int64_t total, bool aggregate) {
  reduce_chunks_kernel<scalar_t>
      <<<grid_stride_blocks(total, kReduceThreads), kReduceThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          v, partial, out, KN, chunks, total, aggregate);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace relfast::cuda
