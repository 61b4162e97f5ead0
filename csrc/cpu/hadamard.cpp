// CPU twin of the `hadamard` op: y = x @ (S_p / sqrt(p) (x) B)^T along the last dim, where
// n = p * m, S_p the Sylvester matrix of order p = 2^k and B an orthonormal m x m base
// (bisup/rotation/hadamard.py). fp32 math inside; output in x's dtype.
// The base multiply of every chunk of every row is one matrix product (ATen's BLAS: a 344 base
// at n = 11008 is 344 multiply-adds per value), then per row the Walsh-Hadamard butterflies across
// chunks (stride m) and the 1/sqrt(p) scale.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "checks.h"
#include "hadamard_plan.h"
#include "ops.h"

namespace bisup {

namespace {

// z: fp32 [rows, n], each chunk of m values already multiplied by the base.
template <typename T>
void butterfly_rows(const float* z, T* y, int64_t rows, int64_t n, int64_t m) {
  const int64_t p = n / m;
  const float scale = 1.0f / std::sqrt(static_cast<float>(p));
  at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / n), [&](int64_t begin, int64_t end) {
    std::vector<float> buf(n);
    for (int64_t r = begin; r < end; ++r) {
      std::copy(z + r * n, z + (r + 1) * n, buf.begin());
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
  // buf[a, b] = sum_j B[b, j] x[a, j] for every chunk a of every row: (x as [rows * p, m]) @ B^T
  const at::Tensor xf = x.reshape({rows * (n / m), m}).to(at::kFloat);
  const at::Tensor z = (m == 1 ? xf : at::mm(xf, base->t())).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hadamard_cpu", [&] {
    butterfly_rows<scalar_t>(z.data_ptr<float>(), y.data_ptr<scalar_t>(), rows, n, m);
  });
  return y;
}

}  // namespace bisup
