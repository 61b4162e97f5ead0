// Index math of the factored Hadamard transform, shared (host and device) by the CPU twin and
// the CUDA kernel. A row of n = p * m values is viewed as p chunks of m; butterfly stage h
// (h = 1, 2, 4, ..., p/2) pairs chunk a0 with a0 + h for every a0 whose bit h is clear.
#pragma once
#include <cstdint>

#include "host_device.h"

namespace bisup {

BISUP_HD bool is_pow2(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }

// Flat index of the first element of butterfly pair t (0 <= t < n/2) at stage h; its partner
// sits h * m further.
BISUP_HD int64_t butterfly_index(int64_t t, int64_t h, int64_t m) {
  const int64_t b = t % m, u = t / m;          // position in the chunk, pair of chunks
  const int64_t a0 = (u / h) * 2 * h + u % h;  // chunk with bit h clear
  return a0 * m + b;
}

}  // namespace bisup
