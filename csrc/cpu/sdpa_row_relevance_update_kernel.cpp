// CPU kernel of sdpa_row_relevance_update (see csrc/composite/sdpa_row_relevance_update.cpp):
//   out[b,k,j] = (aggregate ? v[b,k,j] : 0) + sum_i v[b,k,i] * (1/H) sum_h max(dA[b,h,i,j] * A[b,h,i,j], 0)
//   A = exp(scale * q k^T + mask - lse),  dA = grad_out value^T,
// never forming A or dA beyond one column strip of one head.
//
// A task is (sample b, strip of kBlockColumns keys). It transposes the strip's keys and values
// once, then walks the query rows in tiles (only rows i >= j0 under a causal mask): per head, two
// tile GEMMs give the scores S = q k^T and dA = dO v^T, one fused pass turns them into
// max(exp(S*scale + mask - lse) * dA, 0) summed over heads, and a last tile GEMM applies the
// K rows. Working memory: a few tiles per thread, reused across calls; never O(N^2).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "../kernels.h"
#include "row_loops.h"


namespace relfast {
namespace {

// Keys per task and query rows per tile: the score, gradient and head-sum tiles (16 KiB each in
// float) stay in L1/L2 while the heads go by.
constexpr int64_t kBlockColumns = 64;
constexpr int64_t kBlockRows = 64;

// exp(x) for x <= ~0 in float, written so the compiler vectorises it (no libm call): Cody-Waite
// range reduction to r in [-ln2/2, ln2/2], a degree-6 polynomial, and 2^n built in the exponent
// bits. Below -87 (including -inf, a masked score) it returns exactly 0; relative error ~2 ulp.
inline float exp_nonpositive(float x) {
  constexpr float kLowest = -87.0f;
  const float kept = x >= kLowest ? 1.0f : 0.0f;  // selects, not branches: the loop stays vectorisable
  x = x >= kLowest ? x : kLowest;
  constexpr float kShifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer in the low bits
  const float t = x * 1.44269504088896341f + kShifter;
  const float n = t - kShifter;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t exponent = (std::bit_cast<int32_t>(t) - 0x4B400000 + 127) << 23;  // n + 127
  return p * std::bit_cast<float>(exponent) * kept;
}

inline double exp_nonpositive(double x) { return std::exp(x); }

// sum[c] += max(exp(scores[c] * scale + bias[c] - lse) * grad[c], 0) for c < n; `bias` may be null.
template <typename acc_t>
RELFAST_CPU_MULTIVERSION void accumulate_weights(const acc_t* __restrict scores, const acc_t* __restrict grad,
                                                 const acc_t* __restrict bias, acc_t* __restrict sum, int64_t n,
                                                 acc_t scale, acc_t lse) {
  if (bias == nullptr) {
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) {
      const acc_t w = exp_nonpositive(scores[c] * scale - lse) * grad[c];
      sum[c] += w > acc_t(0) ? w : acc_t(0);
    }
  } else {
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) {
      const acc_t w = exp_nonpositive(scores[c] * scale + bias[c] - lse) * grad[c];
      sum[c] += w > acc_t(0) ? w : acc_t(0);
    }
  }
}

// Tasks in the order 0, n-1, 1, n-2, ...: at::parallel_for hands each thread a contiguous range,
// and under a causal mask early strips have the most rows, so interleaving balances the threads.
inline int64_t balanced_strip(int64_t task, int64_t strips) {
  return task % 2 == 0 ? task / 2 : strips - 1 - task / 2;
}

// The mask as the kernel reads it: an additive bias in acc_t, read through the (B, H, Nq, Nk)
// strides of the expanded view (0 for broadcast dimensions). Converted on its compact form, so a
// (B, 1, 1, Nk) padding mask is never materialised at (B, H, Nq, Nk).
at::Tensor additive_bias(const at::Tensor& mask, at::ScalarType acc) {
  at::Tensor compact = mask;
  for (int64_t d = 0; d < 4; ++d) {
    if (compact.stride(d) == 0 && compact.size(d) > 1) compact = compact.narrow(d, 0, 1);
  }
  at::Tensor bias = compact.scalar_type() == at::kBool
                        ? at::zeros(compact.sizes(), compact.options().dtype(acc))
                              .masked_fill_(compact.logical_not(), -std::numeric_limits<double>::infinity())
                        : compact.to(acc).contiguous();
  return bias.expand(mask.sizes());
}

// C (m x n, row stride ldc) = A (m x k, lda) . B (k x n, ldb), or += with `accumulate`: row-major
// tiles small enough for L1/L2. float goes to the library's batch-reduce GEMM microkernel (what
// torch's own CPU flash attention uses); float64, only ever used for reference-precision checks,
// to plain loops.
inline void tile_gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
                      float* c, int64_t ldc, bool accumulate) {
  at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, accumulate, a, b, c);
}

inline void tile_gemm(int64_t m, int64_t n, int64_t k, const double* a, int64_t lda, const double* b, int64_t ldb,
                      double* c, int64_t ldc, bool accumulate) {
  for (int64_t i = 0; i < m; ++i) {
    double* c_row = c + i * ldc;
    if (!accumulate) std::fill(c_row, c_row + n, 0.0);
    for (int64_t p = 0; p < k; ++p) {
      const double a_ip = a[i * lda + p];
      const double* b_row = b + p * ldb;
      for (int64_t j = 0; j < n; ++j) c_row[j] += a_ip * b_row[j];
    }
  }
}

// Per-thread scratch, kept across calls (a served model reuses it instead of allocating per call).
template <typename acc_t>
acc_t* thread_scratch(int64_t elements) {
  thread_local std::vector<acc_t> scratch;
  if (static_cast<int64_t>(scratch.size()) < elements) scratch.resize(elements);
  return scratch.data();
}

// A (B, H, N, D) tensor whose rows can be read with a leading dimension: unit stride last.
at::Tensor rows_readable(const at::Tensor& t, at::ScalarType acc) {
  at::Tensor converted = t.to(acc);
  return converted.stride(3) == 1 ? converted : converted.contiguous();
}

template <typename acc_t>
void sdpa_rows_kernel(const at::Tensor& rows, const at::Tensor& q, const at::Tensor& k, const at::Tensor& val,
                      const at::Tensor& dout, const at::Tensor& lse, const at::Tensor& bias, bool is_causal,
                      acc_t scale, bool aggregate, at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), D = q.size(3), Hkv = k.size(1), Nk = k.size(2),
                Dv = val.size(3), K = rows.size(1);
  const int64_t group = H / Hkv, strips = (Nk + kBlockColumns - 1) / kBlockColumns;
  const acc_t inv_heads = acc_t(1) / static_cast<acc_t>(H);
  const acc_t *q_data = q.const_data_ptr<acc_t>(), *k_data = k.const_data_ptr<acc_t>();
  const acc_t *v_data = val.const_data_ptr<acc_t>(), *dout_data = dout.const_data_ptr<acc_t>();
  const acc_t *rows_data = rows.const_data_ptr<acc_t>(), *lse_data = lse.const_data_ptr<acc_t>();
  acc_t* out_data = out.mutable_data_ptr<acc_t>();
  const acc_t* bias_data = bias.defined() ? bias.const_data_ptr<acc_t>() : nullptr;
  const auto strides = [](const at::Tensor& t) {
    return std::array<int64_t, 4>{t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
  };
  const std::array<int64_t, 4> qs = strides(q), ks = strides(k), vs = strides(val), ds = strides(dout),
                               bs = bias.defined() ? strides(bias) : std::array<int64_t, 4>{};
  // scratch per thread: K^T and V^T strips of every key/value head, S, dA and their head sum
  // (kBlockRows x kBlockColumns each), the K x kBlockColumns result, one mask row
  const int64_t kv_strips = Hkv * (D + Dv) * kBlockColumns, tile = kBlockRows * kBlockColumns;
  const int64_t scratch_elements = kv_strips + 3 * tile + (K + 1) * kBlockColumns;
  at::parallel_for(0, B * strips, 1, [&](int64_t begin, int64_t end) {
    acc_t* const key_t = thread_scratch<acc_t>(scratch_elements);
    acc_t* const value_t = key_t + Hkv * D * kBlockColumns;
    acc_t* const scores = value_t + Hkv * Dv * kBlockColumns;
    acc_t* const grads = scores + tile;
    acc_t* const sums = grads + tile;
    acc_t* const result = sums + tile;
    acc_t* const bias_row = result + K * kBlockColumns;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / strips, j0 = balanced_strip(task % strips, strips) * kBlockColumns;
      const int64_t n = std::min(kBlockColumns, Nk - j0);
      for (int64_t kv = 0; kv < Hkv; ++kv) {  // the strip's keys and values, transposed (d-major)
        for (int64_t c = 0; c < n; ++c) {
          const acc_t* key_row = k_data + b * ks[0] + kv * ks[1] + (j0 + c) * ks[2];
          const acc_t* value_row = v_data + b * vs[0] + kv * vs[1] + (j0 + c) * vs[2];
          for (int64_t d = 0; d < D; ++d) key_t[(kv * D + d) * kBlockColumns + c] = key_row[d * ks[3]];
          for (int64_t d = 0; d < Dv; ++d) value_t[(kv * Dv + d) * kBlockColumns + c] = value_row[d * vs[3]];
        }
      }
      std::fill(result, result + K * kBlockColumns, acc_t(0));
      // Under the causal mask rows i < j0 see none of these keys.
      for (int64_t i0 = is_causal ? std::min(j0, Nq) : 0; i0 < Nq; i0 += kBlockRows) {
        const int64_t m = std::min(kBlockRows, Nq - i0);
        std::fill(sums, sums + m * kBlockColumns, acc_t(0));
        for (int64_t h = 0; h < H; ++h) {
          const int64_t kv = h / group;
          tile_gemm(m, n, D, q_data + b * qs[0] + h * qs[1] + i0 * qs[2], qs[2], key_t + kv * D * kBlockColumns,
                    kBlockColumns, scores, kBlockColumns, false);
          tile_gemm(m, n, Dv, dout_data + b * ds[0] + h * ds[1] + i0 * ds[2], ds[2],
                    value_t + kv * Dv * kBlockColumns, kBlockColumns, grads, kBlockColumns, false);
          for (int64_t r = 0; r < m; ++r) {
            const int64_t i = i0 + r;
            const acc_t row_lse = lse_data[(b * H + h) * Nq + i];
            if (row_lse == -std::numeric_limits<acc_t>::infinity()) continue;  // every key masked: A = 0
            const int64_t cols = is_causal ? std::min(n, i - j0 + 1) : n;     // keys j <= i
            const acc_t* row_bias = nullptr;
            if (bias_data != nullptr) {
              const acc_t* base = bias_data + b * bs[0] + h * bs[1] + i * bs[2] + j0 * bs[3];
              if (bs[3] == 1) {
                row_bias = base;
              } else {
                for (int64_t c = 0; c < cols; ++c) bias_row[c] = base[c * bs[3]];
                row_bias = bias_row;
              }
            }
            accumulate_weights<acc_t>(scores + r * kBlockColumns, grads + r * kBlockColumns, row_bias,
                                      sums + r * kBlockColumns, cols, scale, row_lse);
          }
        }
        // result += rows[b, :, i0:i0+m] . sums: the K explained rows through this block of Abar
        tile_gemm(K, n, m, rows_data + b * K * Nq + i0, Nq, sums, kBlockColumns, result, kBlockColumns, true);
      }
      for (int64_t kk = 0; kk < K; ++kk) {
        const acc_t* v_row = rows_data + (b * K + kk) * Nq + j0;
        acc_t* out_row = out_data + (b * K + kk) * Nk + j0;
        for (int64_t c = 0; c < n; ++c) {
          out_row[c] = (aggregate ? v_row[c] : acc_t(0)) + result[kk * kBlockColumns + c] * inv_heads;
        }
      }
    }
    if constexpr (std::is_same_v<acc_t, float>) at::native::cpublas::brgemm_release(false);
  });
}

}  // namespace

at::Tensor sdpa_row_relevance_update_cpu(const at::Tensor& v, const at::Tensor& query, const at::Tensor& key,
                                         const at::Tensor& value, const at::Tensor& grad_out,
                                         const at::Tensor& logsumexp, const at::Tensor& mask, bool is_causal,
                                         double scale, bool aggregate) {
  const int64_t B = v.size(0), K = v.size(1), Nk = key.size(2);
  at::Tensor out = at::empty({B, K, Nk}, v.options());
  if (out.numel() == 0) return out;
  const at::ScalarType acc = accumulation_dtype(v.scalar_type());
  // The tile GEMMs read rows with a leading dimension in the accumulation dtype: a copy only for
  // half types or a non-unit last stride, O(N * D) at most.
  const at::Tensor rows = v.to(acc).contiguous(), q = rows_readable(query, acc), k = rows_readable(key, acc),
                   val = rows_readable(value, acc), dout = rows_readable(grad_out, acc),
                   lse = logsumexp.to(acc).contiguous();
  const at::Tensor bias = mask.defined() ? additive_bias(mask, acc) : at::Tensor();
  at::Tensor out_acc = acc == v.scalar_type() ? out : at::empty({B, K, Nk}, v.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES(acc, "sdpa_row_relevance_update_cpu", [&] {
    sdpa_rows_kernel<scalar_t>(rows, q, k, val, dout, lse, bias, is_causal, static_cast<scalar_t>(scale), aggregate,
                               out_acc);
  });
  if (!out_acc.is_same(out)) out.copy_(out_acc);
  return out;
}

}  // namespace relfast
