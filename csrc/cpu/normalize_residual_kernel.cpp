// CPU kernel of [P2] rules 8-9 (handle_residual): out = (R - I) / rowsum(R - I) + I.
// A row of R - I that sums to exactly 0 is scaled by 0 (it becomes the identity row) where the
// reference code would produce NaN.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>

#include "../checks.h"
#include "../kernels.h"

namespace relfast {
namespace {

template <typename scalar_t, typename out_t>
bool normalize_residual_kernel(const scalar_t* R, out_t* out, int64_t B, int64_t N) {
  using acc_t = at::opmath_type<scalar_t>;
  std::atomic<bool> nonfinite{false};
  at::parallel_for(0, B * N, std::max<int64_t>(1, 32768 / std::max<int64_t>(N, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t i = row % N;
      const scalar_t* x = R + row * N;
      // Sum the off-diagonal part and (R_ii - 1) separately: R_ii is close to 1, and summing it
      // whole before subtracting 1 would lose the small off-diagonal mass to rounding.
      acc_t residual_sum = static_cast<acc_t>(x[i]) - acc_t(1);
      for (int64_t j = 0; j < i; ++j) residual_sum += static_cast<acc_t>(x[j]);
      for (int64_t j = i + 1; j < N; ++j) residual_sum += static_cast<acc_t>(x[j]);
      if (!std::isfinite(residual_sum)) {  // any NaN/inf element makes the sum non-finite
        nonfinite.store(true, std::memory_order_relaxed);
        continue;
      }
      const acc_t scale = residual_sum == acc_t(0) ? acc_t(0) : acc_t(1) / residual_sum;
      out_t* o = out + row * N;
      for (int64_t j = 0; j < N; ++j) o[j] = static_cast<out_t>(static_cast<acc_t>(x[j]) * scale);
      o[i] = static_cast<out_t>((static_cast<acc_t>(x[i]) - acc_t(1)) * scale + acc_t(1));
    }
  });
  return !nonfinite.load();
}

at::Tensor normalize_residual_op(const at::Tensor& R) {
  check_normalize_residual_args(R);
  at::Tensor out = normalize_residual_cpu(R, R.scalar_type());
  check_result_finite(out, "normalize_residual");
  return out;
}

}  // namespace

at::Tensor normalize_residual_cpu(const at::Tensor& R, at::ScalarType out_dtype) {
  const at::Tensor x = R.contiguous();
  const int64_t B = x.size(0), N = x.size(1);
  at::Tensor out = at::empty({B, N, N}, x.options().dtype(out_dtype));
  if (out.numel() == 0) return out;
  bool finite = true;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "normalize_residual_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (out_dtype == x.scalar_type()) {
      finite = normalize_residual_kernel<scalar_t, scalar_t>(x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), B, N);
    } else {
      TORCH_CHECK(out_dtype == accumulation_dtype(x.scalar_type()), "normalize_residual_cpu: unsupported out_dtype");
      finite = normalize_residual_kernel<scalar_t, acc_t>(x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<acc_t>(), B, N);
    }
  });
  if (!finite) raise_nonfinite("normalize_residual", "argument 'R'");
  return out;
}

TORCH_LIBRARY_IMPL(relfast, CPU, m) { m.impl("normalize_residual", &normalize_residual_op); }

}  // namespace relfast
