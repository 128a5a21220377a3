// CUDA kernel of sdpa_row_relevance_update: the streaming rule 6 on K rows, with the attention and
// its gradient recomputed tile by tile from a fused attention's saved tensors:
//   A[b,h,i,j]  = exp(scale * q[b,h,i] . k[b,h/G,j] + mask[b,h,i,j] - lse[b,h,i])  (0 where masked,
//                 0 on a row whose lse is -inf; G = H / Hkv query heads per key/value head)
//   dA[b,h,i,j] = grad_out[b,h,i] . value[b,h/G,j]
//   out[b,k,j]  = (aggregate ? v[b,k,j] : 0) + sum_i v[b,k,i] * (1/H) sum_h max(dA * A, 0)
// No (Nq, Nk) matrix is written to global memory.
//
// Pass 1: block (key tile of 64 columns j, query chunk c, sample b), 256 threads. The chunk is a
// run of 64-row query tiles (with is_causal, only tiles with some i >= j0). For each query tile,
// for each head, the block streams D (then Dv) in chunks of 32 (8 for double) through shared
// memory, q|grad_out on one side and k|value on the other, stored d-major; each thread owns a
// 4 x 4 block of the 64 x 64 score and dA tiles in registers (SIMT FMAs, float4 shared loads).
// The next chunk's global loads are issued before the current chunk's FMAs. After a head's last
// chunk the thread turns its scores into A and adds max(A * dA, 0) to its own 4 x 4 block of the
// head-sum tile w in shared memory. After the last head each thread forms
// sum_i v[b,k,i] / H * w[i,j] for two (k, j) of the tile, rows of v in groups of 8: for K <= 8
// the sums stay in registers across the chunk's query tiles; for K > 8 the thread that owns an
// entry of the workspace accumulates into it.
// Partials go to an opmath workspace (B, C, K, Nk); pass 2 sums the C chunks in a fixed order
// (deterministic, no atomics), adds v when aggregating and casts to v's dtype.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>

#include "../kernels.h"
#include "cuda_utils.cuh"

namespace relfast {
namespace {

constexpr int kThreads = 256;
constexpr int kTile = 64;              // query rows and key columns of a tile
constexpr int kLd = kTile + 4;         // padded row of a staged tile (keeps 16-byte alignment)
constexpr int kMicro = 4;              // each thread owns a kMicro x kMicro block of the tile
constexpr int kGroupRows = 8;          // rows of v per pass of the v-accumulation step
// Workspace elements above which the query rows are not split (large K); one chunk always fits.
constexpr int64_t kMaxPartialElems = int64_t(1) << 25;

static_assert(kThreads == (kTile / kMicro) * (kTile / kMicro), "one thread per micro-tile");
static_assert(kThreads % kTile == 0 && 2 * (kThreads / kTile) == kGroupRows, "two (k, j) pairs per thread");

// D elements per staged chunk, and blocks per SM the register budget is sized for. For double,
// a narrower chunk keeps the static shared memory under 48 KiB, and the accumulators take two
// registers each, so one block per SM.
template <typename acc_t>
struct TileTraits {
  static constexpr int kChunk = 32;
  static constexpr int kMinBlocks = 2;
};
template <>
struct TileTraits<double> {
  static constexpr int kChunk = 8;
  static constexpr int kMinBlocks = 1;
};

// How the mask is stored; read through a runtime switch so the kernel is not instantiated per
// mask dtype (the load is a small part of the work per score).
enum MaskKind : int { kNoMask = 0, kBoolMask, kHalfMask, kBFloat16Mask, kFloatMask, kDoubleMask };

template <typename scalar_t>
struct Params {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* query;     // (B, H, Nq, D), strides q_st
  const scalar_t* key;       // (B, Hkv, Nk, D), strides k_st
  const scalar_t* value;     // (B, Hkv, Nk, Dv), strides v_st
  const scalar_t* grad_out;  // (B, H, Nq, Dv), strides g_st
  const scalar_t* v;         // (B, K, Nq), contiguous
  const acc_t* lse;          // (B, H, Nq), contiguous
  const void* mask;          // (B, H, Nq, Nk) view, strides m_st; null for kNoMask
  acc_t* partial;            // (B, chunks, K, Nk)
  int64_t q_st[4], k_st[4], v_st[4], g_st[4], m_st[4];
  int64_t B, H, heads_per_kv, Nq, Nk, D, Dv, K, chunks;
  acc_t scale, inv_heads;
  int64_t mask_elem_bytes;  // 0 for kNoMask
  int mask_kind;
  bool causal;
};

// cuda::ceil_div is host-only.
__host__ __device__ __forceinline__ int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return ::exp(x); }

// Four consecutive elements of a 16-byte aligned shared array.
__device__ __forceinline__ void load4(const float* p, float (&x)[4]) {
  const float4 t = *reinterpret_cast<const float4*>(p);
  x[0] = t.x, x[1] = t.y, x[2] = t.z, x[3] = t.w;
}
__device__ __forceinline__ void load4(const double* p, double (&x)[4]) {
  const double2 t0 = reinterpret_cast<const double2*>(p)[0], t1 = reinterpret_cast<const double2*>(p)[1];
  x[0] = t0.x, x[1] = t0.y, x[2] = t1.x, x[3] = t1.y;
}
__device__ __forceinline__ void store4(float* p, const float (&x)[4]) {
  *reinterpret_cast<float4*>(p) = make_float4(x[0], x[1], x[2], x[3]);
}
__device__ __forceinline__ void store4(double* p, const double (&x)[4]) {
  reinterpret_cast<double2*>(p)[0] = make_double2(x[0], x[1]);
  reinterpret_cast<double2*>(p)[1] = make_double2(x[2], x[3]);
}

// acc[r][c] += sum_d a[d][r] * b[d][c] over the first `len` rows of two d-major staged chunks
// (a and b already offset to the thread's rows / columns). Rows past `len` up to a multiple of 4
// were staged as zeros, so the partial loop may round up.
template <int kChunk, typename acc_t>
__device__ __forceinline__ void tile_fma(const acc_t* a, const acc_t* b, int len, acc_t (&acc)[kMicro][kMicro]) {
  auto step = [&](int d) {
    acc_t x[kMicro], y[kMicro];
    load4(a + d * kLd, x);
    load4(b + d * kLd, y);
#pragma unroll
    for (int r = 0; r < kMicro; ++r) {
#pragma unroll
      for (int c = 0; c < kMicro; ++c) acc[r][c] += x[r] * y[c];
    }
  };
  if (len == kChunk) {
#pragma unroll
    for (int d = 0; d < kChunk; ++d) step(d);
  } else {
    for (int d0 = 0; d0 < len; d0 += 4) {
#pragma unroll
      for (int u = 0; u < 4; ++u) step(d0 + u);
    }
  }
}

// Additive mask value of a float mask at element offset `off`.
template <typename acc_t>
__device__ __forceinline__ acc_t additive_mask(const void* mask, int kind, int64_t off) {
  switch (kind) {
    case kHalfMask:
      return static_cast<acc_t>(static_cast<float>(static_cast<const c10::Half*>(mask)[off]));
    case kBFloat16Mask:
      return static_cast<acc_t>(static_cast<float>(static_cast<const c10::BFloat16*>(mask)[off]));
    case kFloatMask:
      return static_cast<acc_t>(static_cast<const float*>(mask)[off]);
    default:  // kDoubleMask
      return static_cast<acc_t>(static_cast<const double*>(mask)[off]);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, TileTraits<at::opmath_type<scalar_t>>::kMinBlocks)
    sdpa_partial_rows_kernel(const Params<scalar_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kChunk = TileTraits<acc_t>::kChunk;
  constexpr int kChunkGroups = kChunk / 8;  // 8-wide d groups of a chunk (one per 8 lanes)
  constexpr int kLoadIters = kChunk * kTile / kThreads;
  static_assert(kChunk % 8 == 0 && (kChunk * kTile) % kThreads == 0, "bad chunk width");

  // Staging buffers of one chunk (a: query side, b: key side, d-major); the head-summed tile w
  // (kept here rather than in registers, which would spill); rows of v / H.
  __shared__ __align__(16) acc_t a_tile[kChunk * kLd];
  __shared__ __align__(16) acc_t b_tile[kChunk * kLd];
  __shared__ __align__(16) acc_t w_tile[kTile * kLd];
  __shared__ acc_t v_tile[kGroupRows][kTile];

  const int tid = threadIdx.x, warp = tid / cuda::kWarpSize, lane = tid % cuda::kWarpSize;
  // A warp covers 4 x 8 micro-tiles, so its shared loads of a and b are one wavefront each.
  const int ty = (warp / 2) * 4 + lane / 8, tx = (warp % 2) * 8 + lane % 8;
  // Staging position of the r-th element a thread loads: row stage_row + r * kRowStep, column
  // stage_col. A warp loads 8 consecutive d (coalesced when the d stride is 1) by 4 rows, which
  // makes the d-major shared stores conflict-free.
  constexpr int kRowStep = 32 / kChunkGroups;
  const int stage_row = (warp / kChunkGroups) * 4 + lane / 8, stage_col = (warp % kChunkGroups) * 8 + lane % 8;
  // The v-accumulation step: column `col` of the tile, rows k = kslot + 4m of a group.
  const int col = tid % kTile, kslot = tid / kTile;

  const int64_t Nq = p.Nq, Nk = p.Nk, K = p.K, H = p.H;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t rows_b = Nk - j0 < kTile ? Nk - j0 : kTile;
  const int64_t q_tiles = div_up(Nq, kTile);
  // With is_causal, query tile t holds some i >= j0 iff t >= j0 / kTile; earlier tiles are all
  // masked and are skipped.
  const int64_t t_first = p.causal ? (j0 / kTile < q_tiles ? j0 / kTile : q_tiles) : 0;
  const int64_t per_chunk = div_up(q_tiles - t_first, p.chunks);
  const int n_s = static_cast<int>(div_up(p.D, kChunk)), n_d = static_cast<int>(div_up(p.Dv, kChunk));
  const int steps = n_s + n_d;  // chunks per head: scores, then dA
  const int total_steps = static_cast<int>(H) * steps;
  const int64_t groups = div_up(K, kGroupRows);
  const bool multi_group = groups > 1;

  // Global loads of chunk `s` of query tile i0 into registers (zeros outside the tensors). A
  // running pointer per side keeps the per-row offsets out of registers.
  acc_t ra[kLoadIters], rb[kLoadIters];
  auto load_step = [&](int64_t b, int64_t i0, int s) {
    const int h = s / steps, st = s - h * steps;
    const int64_t kvh = h / p.heads_per_kv;
    const scalar_t *a, *bb;
    int64_t a_rs, b_rs, d;
    bool d_ok;
    if (st < n_s) {
      d = static_cast<int64_t>(st) * kChunk + stage_col, d_ok = d < p.D;
      a_rs = p.q_st[2], b_rs = p.k_st[2];
      a = p.query + b * p.q_st[0] + h * p.q_st[1] + (i0 + stage_row) * a_rs + d * p.q_st[3];
      bb = p.key + b * p.k_st[0] + kvh * p.k_st[1] + (j0 + stage_row) * b_rs + d * p.k_st[3];
    } else {
      d = static_cast<int64_t>(st - n_s) * kChunk + stage_col, d_ok = d < p.Dv;
      a_rs = p.g_st[2], b_rs = p.v_st[2];
      a = p.grad_out + b * p.g_st[0] + h * p.g_st[1] + (i0 + stage_row) * a_rs + d * p.g_st[3];
      bb = p.value + b * p.v_st[0] + kvh * p.v_st[1] + (j0 + stage_row) * b_rs + d * p.v_st[3];
    }
    const int64_t rows_a = Nq - i0;
#pragma unroll
    for (int r = 0; r < kLoadIters; ++r) {
      const int ii = stage_row + r * kRowStep;
      ra[r] = (d_ok && ii < rows_a) ? static_cast<acc_t>(*a) : acc_t(0);
      rb[r] = (d_ok && ii < rows_b) ? static_cast<acc_t>(*bb) : acc_t(0);
      a += kRowStep * a_rs;
      bb += kRowStep * b_rs;
    }
  };

  // gridDim.y/z are capped at 65535: stride over chunks and samples. All loop bounds below are
  // uniform across the block, so every thread reaches every __syncthreads().
  for (int64_t b = blockIdx.z; b < p.B; b += gridDim.z) {
    for (int64_t c = blockIdx.y; c < p.chunks; c += gridDim.y) {
      const int64_t t_begin = t_first + c * per_chunk;
      const int64_t t_end = t_begin + per_chunk < q_tiles ? t_begin + per_chunk : q_tiles;
      acc_t* const part = p.partial + (b * p.chunks + c) * K * Nk + j0 + col;
      const bool col_ok = col < rows_b;
      acc_t acc[2] = {acc_t(0), acc_t(0)};  // K <= 8: rows kslot and kslot + 4
      if (multi_group && col_ok) {
        // K > 8: the sums live in the workspace; each entry is only touched by this thread.
        for (int64_t k = kslot; k < K; k += kGroupRows / 2) part[k * Nk] = acc_t(0);
      }
      if (t_begin < t_end) load_step(b, t_begin * kTile, 0);

      for (int64_t t = t_begin; t < t_end; ++t) {
        const int64_t i0 = t * kTile;
        acc_t s_acc[kMicro][kMicro], da_acc[kMicro][kMicro];
#pragma unroll
        for (int r = 0; r < kMicro; ++r) {
#pragma unroll
          for (int cc = 0; cc < kMicro; ++cc) s_acc[r][cc] = da_acc[r][cc] = acc_t(0);
        }
        // Until the v step, each thread touches only its own block of w (no barrier needed);
        // the v step of the previous tile ended with a barrier.
        acc_t* const w_own = w_tile + ty * kMicro * kLd + tx * kMicro;
#pragma unroll
        for (int r = 0; r < kMicro; ++r) {
          const acc_t zero[kMicro] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
          store4(w_own + r * kLd, zero);
        }

        for (int s = 0; s < total_steps; ++s) {
          const int h = s / steps, st = s - h * steps;
          __syncthreads();  // the previous chunk's readers are done
#pragma unroll
          for (int r = 0; r < kLoadIters; ++r) {
            const int at = stage_col * kLd + stage_row + r * kRowStep;
            a_tile[at] = ra[r];
            b_tile[at] = rb[r];
          }
          __syncthreads();
          // Prefetch the next chunk (or the next query tile's first) while this one is used.
          if (s + 1 < total_steps) {
            load_step(b, i0, s + 1);
          } else if (t + 1 < t_end) {
            load_step(b, i0 + kTile, 0);
          }
          if (st < n_s) {
            const int64_t left = p.D - static_cast<int64_t>(st) * kChunk;
            tile_fma<kChunk>(a_tile + ty * kMicro, b_tile + tx * kMicro, left < kChunk ? int(left) : kChunk, s_acc);
          } else {
            const int64_t left = p.Dv - static_cast<int64_t>(st - n_s) * kChunk;
            tile_fma<kChunk>(a_tile + ty * kMicro, b_tile + tx * kMicro, left < kChunk ? int(left) : kChunk, da_acc);
          }
          if (st != steps - 1) continue;

          // Head h complete: w += max(A * dA, 0), then reset the accumulators.
          const acc_t* lse_row = p.lse + (b * H + h) * Nq;
          const char* mask_bh =
              static_cast<const char*>(p.mask) + (b * p.m_st[0] + h * p.m_st[1]) * p.mask_elem_bytes;
#pragma unroll
          for (int r = 0; r < kMicro; ++r) {
            acc_t w_row[kMicro];
            load4(w_own + r * kLd, w_row);
            const int64_t i = i0 + ty * kMicro + r;
            const acc_t l = i < Nq ? lse_row[i] : acc_t(0);
            // lse = -inf: every key of the row is masked, A = 0 (exp would give NaN or inf).
            const bool row_ok = i < Nq && !::isinf(l);
#pragma unroll
            for (int cc = 0; cc < kMicro; ++cc) {
              const int64_t j = j0 + tx * kMicro + cc;
              bool ok = row_ok && j < Nk && !(p.causal && j > i);
              acc_t x = s_acc[r][cc] * p.scale - l;
              if (ok && p.mask_kind != kNoMask) {
                const int64_t off = i * p.m_st[2] + j * p.m_st[3];
                if (p.mask_kind == kBoolMask) {
                  ok = reinterpret_cast<const bool*>(mask_bh)[off];
                } else {
                  x += additive_mask<acc_t>(mask_bh, p.mask_kind, off);  // -inf gives A = 0
                }
              }
              const acc_t prod = ok ? exp_acc(x) * da_acc[r][cc] : acc_t(0);
              w_row[cc] += prod < acc_t(0) ? acc_t(0) : prod;  // clamp per head (a NaN passes, as in clamp)
              s_acc[r][cc] = da_acc[r][cc] = acc_t(0);
            }
            store4(w_own + r * kLd, w_row);
          }
        }

        // out[k, j] += sum_i v[k, i] / H * w[i, j], rows of v in groups of 8. Rows i >= Nq and
        // columns j >= Nk of w are 0, and so are the staged v past K or Nq.
        for (int64_t g = 0; g < groups; ++g) {
          for (int e = tid; e < kGroupRows * kTile; e += kThreads) {
            const int kk = e / kTile, ii = e % kTile;
            const int64_t k = g * kGroupRows + kk, i = i0 + ii;
            v_tile[kk][ii] = (k < K && i < Nq) ? static_cast<acc_t>(p.v[(b * K + k) * Nq + i]) * p.inv_heads : acc_t(0);
          }
          __syncthreads();  // w (first group) and v tiles ready
#pragma unroll
          for (int m = 0; m < 2; ++m) {
            const int kk = kslot + m * (kGroupRows / 2);
            acc_t sum = 0;
#pragma unroll 8
            for (int ii = 0; ii < kTile; ++ii) sum += v_tile[kk][ii] * w_tile[ii * kLd + col];
            const int64_t k = g * kGroupRows + kk;
            if (multi_group) {
              if (k < K && col_ok) part[k * Nk] += sum;
            } else {
              acc[m] += sum;
            }
          }
          __syncthreads();  // v tile (next group) and w tile (next query tile) readers done
        }
      }

      if (!multi_group && col_ok) {
#pragma unroll
        for (int m = 0; m < 2; ++m) {
          const int64_t k = kslot + m * (kGroupRows / 2);
          if (k < K) part[k * Nk] = acc[m];
        }
      }
    }
  }
}

void copy_strides(const at::Tensor& t, int64_t (&dst)[4]) {
  for (int d = 0; d < 4; ++d) dst[d] = t.stride(d);
}

int mask_kind_of(const at::Tensor& mask) {
  if (!mask.defined()) return kNoMask;
  switch (mask.scalar_type()) {
    case at::kBool:
      return kBoolMask;
    case at::kHalf:
      return kHalfMask;
    case at::kBFloat16:
      return kBFloat16Mask;
    case at::kFloat:
      return kFloatMask;
    case at::kDouble:
      return kDoubleMask;
    default:
      TORCH_CHECK(false, "relfast.sdpa_row_relevance_update: unsupported attn_mask dtype ", mask.scalar_type());
  }
}

}  // namespace

at::Tensor sdpa_row_relevance_update_cuda(const at::Tensor& v, const at::Tensor& query, const at::Tensor& key,
                                          const at::Tensor& value, const at::Tensor& grad_out,
                                          const at::Tensor& logsumexp, const at::Tensor& mask, bool is_causal,
                                          double scale, bool aggregate) {
  const c10::cuda::CUDAGuard guard(v.device());
  const int64_t B = v.size(0), K = v.size(1), Nq = v.size(2), H = query.size(1), Hkv = key.size(1),
                Nk = key.size(2), D = query.size(3), Dv = value.size(3);
  const at::Tensor vc = v.contiguous();  // B x K x Nq values: cheap next to the attention pass
  at::Tensor out = at::empty({B, K, Nk}, vc.options());
  if (out.numel() == 0) return out;
  if (Nq == 0 || Dv == 0) {
    // No query rows, or dA = 0: only the v part is left (aggregate implies Nk == Nq).
    return aggregate ? out.copy_(vc) : out.zero_();
  }

  const at::ScalarType acc_type = accumulation_dtype(vc.scalar_type());
  const at::Tensor lse = logsumexp.to(acc_type).contiguous();  // B x H x Nq
  const int mask_kind = mask_kind_of(mask);

  // Query chunks: enough blocks to fill the GPU (about 4 per SM), no more chunks than query
  // tiles, and a bounded workspace when K is large.
  const int64_t key_tiles = cuda::ceil_div(Nk, kTile), q_tiles = cuda::ceil_div(Nq, kTile);
  const int64_t wanted_blocks = 4 * static_cast<int64_t>(cuda::multiprocessor_count());
  int64_t chunks = std::clamp<int64_t>(cuda::ceil_div(wanted_blocks, key_tiles * B), 1, q_tiles);
  chunks = std::min(chunks, std::max<int64_t>(1, kMaxPartialElems / (B * K * Nk)));

  at::Tensor partial = at::empty({B, chunks, K, Nk}, vc.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, vc.scalar_type(), "sdpa_row_relevance_update_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    Params<scalar_t> p{};
    p.query = query.const_data_ptr<scalar_t>();
    p.key = key.const_data_ptr<scalar_t>();
    p.value = value.const_data_ptr<scalar_t>();
    p.grad_out = grad_out.const_data_ptr<scalar_t>();
    p.v = vc.const_data_ptr<scalar_t>();
    p.lse = lse.const_data_ptr<acc_t>();
    p.mask = mask_kind == kNoMask ? nullptr : mask.const_data_ptr();
    p.partial = partial.mutable_data_ptr<acc_t>();
    copy_strides(query, p.q_st);
    copy_strides(key, p.k_st);
    copy_strides(value, p.v_st);
    copy_strides(grad_out, p.g_st);
    if (mask_kind != kNoMask) {
      copy_strides(mask, p.m_st);
    } else {
      std::fill(std::begin(p.m_st), std::end(p.m_st), int64_t(0));
    }
    p.B = B, p.H = H, p.heads_per_kv = H / Hkv, p.Nq = Nq, p.Nk = Nk, p.D = D, p.Dv = Dv, p.K = K;
    p.chunks = chunks;
    p.scale = static_cast<acc_t>(scale);
    p.inv_heads = acc_t(1) / static_cast<acc_t>(H);
    p.mask_kind = mask_kind;
    p.mask_elem_bytes = mask_kind == kNoMask ? 0 : static_cast<int64_t>(mask.element_size());
    p.causal = is_causal;

    const dim3 grid(static_cast<unsigned int>(key_tiles), static_cast<unsigned int>(std::min(chunks, cuda::kMaxGridYZ)),
                    static_cast<unsigned int>(std::min(B, cuda::kMaxGridYZ)));
    sdpa_partial_rows_kernel<scalar_t><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    const int64_t total = out.numel();
    cuda::reduce_chunks<scalar_t>(vc.const_data_ptr<scalar_t>(), partial.const_data_ptr<acc_t>(),
                                  out.mutable_data_ptr<scalar_t>(), K * Nk, chunks, total, aggregate);
  });
  return out;
}

}  // namespace relfast
