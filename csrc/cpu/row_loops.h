// Inner loops shared by the CPU kernels.
//
// Memory layout drives the design: rows q0..q0+R of one head are contiguous, so kernels take a
// block of rows and, head by head, make one long contiguous pass over grad and attn into an
// L1-sized accumulator. Reading the H heads of a single row instead keeps 2H short streams in
// flight, more than the hardware prefetcher follows (measured 2-3x slower).
#pragma once

#include <algorithm>
#include <cstdint>

// The inner loops below are the CPU kernels' whole arithmetic. They are compiled twice, for AVX2
// + FMA and for the baseline ISA, and the loader picks one for the machine (GCC/Clang function
// multi-versioning), so one binary runs everywhere and uses 8-wide vectors where it can.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define RELFAST_CPU_MULTIVERSION __attribute__((target_clones("avx2,fma", "default")))
#else
#define RELFAST_CPU_MULTIVERSION
#endif

namespace relfast::cpu {

// Elements of one row block's accumulator: 16 KiB of float32, so it stays in L1 while the H heads
// stream through it.
constexpr int64_t kBlockElements = 4096;

// Rows per block for rows of `row_length` elements.
inline int64_t rows_per_block(int64_t row_length) {
  return std::max<int64_t>(1, kBlockElements / std::max<int64_t>(row_length, 1));
}

// Independent lanes for the finiteness check: x * 0 is 0 for finite x and NaN otherwise; summing
// it in lanes keeps the loop vectorisable (no floating-point reassociation needed).
constexpr int kCheckLanes = 8;

template <typename acc_t>
struct FiniteCheck {
  acc_t lanes[kCheckLanes] = {};
  bool saw_nonfinite() const {
    acc_t total = 0;
    for (int l = 0; l < kCheckLanes; ++l) total += lanes[l];
    return total != acc_t(0);  // NaN != 0
  }
};

// sum[j] += sum_h max(g[h][j] * a[h][j], 0) for j < n and kHeads heads per pass (each product
// also goes through the finiteness check). Several heads per pass cut the load/store round trips
// of the accumulator; 2 * kHeads input streams stay within what the prefetcher follows.
template <int kHeads, typename scalar_t, typename acc_t>
RELFAST_CPU_MULTIVERSION void accumulate_positive_products(const scalar_t* const* g, const scalar_t* const* a,
                                                           acc_t* __restrict sum, int64_t n,
                                                           FiniteCheck<acc_t>& check) {
  const scalar_t* __restrict gh[kHeads];
  const scalar_t* __restrict ah[kHeads];
  for (int h = 0; h < kHeads; ++h) gh[h] = g[h], ah[h] = a[h];
  acc_t lanes[kCheckLanes];
  for (int l = 0; l < kCheckLanes; ++l) lanes[l] = check.lanes[l];
  int64_t j = 0;
  for (; j + kCheckLanes <= n; j += kCheckLanes) {
#pragma omp simd
    for (int l = 0; l < kCheckLanes; ++l) {
      acc_t s = sum[j + l];
      for (int h = 0; h < kHeads; ++h) {
        const acc_t p = static_cast<acc_t>(gh[h][j + l]) * static_cast<acc_t>(ah[h][j + l]);
        s += p > acc_t(0) ? p : acc_t(0);
        lanes[l] += p * acc_t(0);
      }
      sum[j + l] = s;
    }
  }
  for (; j < n; ++j) {
    for (int h = 0; h < kHeads; ++h) {
      const acc_t p = static_cast<acc_t>(gh[h][j]) * static_cast<acc_t>(ah[h][j]);
      sum[j] += p > acc_t(0) ? p : acc_t(0);
      lanes[0] += p * acc_t(0);
    }
  }
  for (int l = 0; l < kCheckLanes; ++l) check.lanes[l] = lanes[l];
}

// sum += the positive products of heads 0..H-1 over one row block: `offset(h)` is where head h's
// block starts in grad and attn. Four heads per pass, then the remainder one by one.
template <typename scalar_t, typename acc_t, typename Offset>
void accumulate_positive_products_over_heads(const scalar_t* grad, const scalar_t* attn, int64_t H, Offset offset,
                                             acc_t* sum, int64_t n, FiniteCheck<acc_t>& check) {
  int64_t h = 0;
  for (; h + 4 <= H; h += 4) {
    const scalar_t* g[4] = {grad + offset(h), grad + offset(h + 1), grad + offset(h + 2), grad + offset(h + 3)};
    const scalar_t* a[4] = {attn + offset(h), attn + offset(h + 1), attn + offset(h + 2), attn + offset(h + 3)};
    accumulate_positive_products<4>(g, a, sum, n, check);
  }
  for (; h < H; ++h) {
    const scalar_t* g[1] = {grad + offset(h)};
    const scalar_t* a[1] = {attn + offset(h)};
    accumulate_positive_products<1>(g, a, sum, n, check);
  }
}

// sum[j] += x[j]
template <typename scalar_t, typename acc_t>
RELFAST_CPU_MULTIVERSION void accumulate(const scalar_t* __restrict x, acc_t* __restrict sum, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) sum[j] += static_cast<acc_t>(x[j]);
}

// y[j] += w * x[j]
template <typename acc_t>
RELFAST_CPU_MULTIVERSION void axpy(acc_t w, const acc_t* __restrict x, acc_t* __restrict y, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) y[j] += w * x[j];
}

}  // namespace relfast::cpu

namespace relfast::cpu {

// sum_j x[j], in lanes (vectorisable without reassociation), for row normalisations.
template <typename acc_t>
RELFAST_CPU_MULTIVERSION acc_t sum(const acc_t* __restrict x, int64_t n) {
  acc_t lanes[kCheckLanes] = {};
  int64_t j = 0;
  for (; j + kCheckLanes <= n; j += kCheckLanes) {
#pragma omp simd
    for (int l = 0; l < kCheckLanes; ++l) lanes[l] += x[j + l];
  }
  for (; j < n; ++j) lanes[0] += x[j];
  acc_t total = 0;
  for (int l = 0; l < kCheckLanes; ++l) total += lanes[l];
  return total;
}

}  // namespace relfast::cpu
