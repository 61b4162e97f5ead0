// CPU twin of the `hadamard` op: y = x @ (S_p / sqrt(p) (x) B)^T along the last dim, where
// n = p * m, S_p the Sylvester matrix of order p = 2^k and B an orthonormal m x m base
// (bisup/rotation/hadamard.py). fp32 math inside; output in x's dtype.
// Per row: dense base multiply on each of the p chunks of m values, then the Walsh-Hadamard
// butterflies across chunks (stride m), then the 1/sqrt(p) scale.
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "checks.h"
#include "hadamard_plan.h"
#include "ops.h"

namespace bisup {

namespace {

template <typename T>
void hadamard_rows(const T* x, const float* base, T* y, int64_t rows, int64_t n, int64_t m) {
  const int64_t p = n / m;
  const float scale = 1.0f / std::sqrt(static_cast<float>(p));
  at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / n), [&](int64_t begin, int64_t end) {
    std::vector<float> buf(n), in(m);
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * n;
      if (m == 1) {
        for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(xr[i]);
      } else {
        for (int64_t a = 0; a < p; ++a) {  // buf[a, :] = B @ x[a, :]
          for (int64_t j = 0; j < m; ++j) in[j] = static_cast<float>(xr[a * m + j]);
          for (int64_t b = 0; b < m; ++b) {
            const float* brow = base + b * m;
            float acc = 0.f;
            for (int64_t j = 0; j < m; ++j) acc += brow[j] * in[j];
            buf[a * m + b] = acc;
          }
        }
      }
      for (int64_t h = 1; h < p; h <<= 1) {  // butterflies over the chunk index a
        for (int64_t t = 0; t < n / 2; ++t) {
          const int64_t i0 = butterfly_index(t, h, m), i1 = i0 + h * m;
          const float u = buf[i0], v = buf[i1];
          buf[i0] = u + v;
          buf[i1] = u - v;
        }
      }
      T* yr = y + r * n;
      for (int64_t i = 0; i < n; ++i) yr[i] = static_cast<T>(buf[i] * scale);
    }
  });
}

}  // namespace

at::Tensor hadamard_cpu(const at::Tensor& x, const std::optional<at::Tensor>& base) {
  const int64_t m = check_hadamard_args(x, base);
  TORCH_CHECK(x.device().is_cpu(), "bisup: hadamard_cpu needs a CPU tensor, got ", x.device());
  auto y = at::empty_like(x);
  if (x.numel() == 0) return y;
  const int64_t n = x.size(-1), rows = x.numel() / n;
  const float* bptr = base.has_value() ? base->data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hadamard_cpu", [&] {
    hadamard_rows<scalar_t>(x.data_ptr<scalar_t>(), bptr, y.data_ptr<scalar_t>(), rows, n, m);
  });
  return y;
}

}  // namespace bisup
