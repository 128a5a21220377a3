// Inner loops shared by the CPU kernels. Each works on one contiguous row segment so that the
// compiler vectorises it; kernels keep the head loop outside these calls (a head loop inside each
// output element was measured 6x slower than eager PyTorch).
#pragma once

#include <cstdint>

namespace relfast::cpu {

// sum[j] += max(g[j] * a[j], 0). check[j] += g[j] * a[j] * 0 stays 0 for finite products and
// becomes NaN otherwise, so the finiteness check rides on the same pass for one extra FMA.
template <typename scalar_t, typename acc_t>
inline void accumulate_positive_products(const scalar_t* __restrict g, const scalar_t* __restrict a,
                                         acc_t* __restrict sum, acc_t* __restrict check, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const acc_t p = static_cast<acc_t>(g[j]) * static_cast<acc_t>(a[j]);
    sum[j] += p > acc_t(0) ? p : acc_t(0);
    check[j] += p * acc_t(0);
  }
}

// y[j] += w * x[j]
template <typename acc_t>
inline void axpy(acc_t w, const acc_t* __restrict x, acc_t* __restrict y, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) y[j] += w * x[j];
}

// True when a check buffer filled by accumulate_positive_products saw a NaN or inf.
template <typename acc_t>
inline bool saw_nonfinite(const acc_t* check, int64_t n) {
  acc_t total = 0;
  for (int64_t j = 0; j < n; ++j) total += check[j];
  return total != acc_t(0);  // NaN != 0
}

}  // namespace relfast::cpu
