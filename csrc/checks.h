// Argument checks shared by the CPU and CUDA entry points. Every message says what was
// expected and what arrived, so a user can fix the call without reading the kernel.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#define BISUP_CHECK_DTYPE(t, dt)                                                     \
  TORCH_CHECK((t).scalar_type() == (dt), "bisup: ", #t, " must have dtype ", (dt), \
              ", got ", (t).scalar_type())

#define BISUP_CHECK_CONTIGUOUS(t) \
  TORCH_CHECK((t).is_contiguous(), "bisup: ", #t, " must be contiguous (call .contiguous())")

#define BISUP_CHECK_DIM(t, d)                                                       \
  TORCH_CHECK((t).dim() == (d), "bisup: ", #t, " must have ", (d), " dims, got ", \
              (t).dim(), " (shape ", (t).sizes(), ")")

#define BISUP_CHECK_SAME_DEVICE(a, b)                                                   \
  TORCH_CHECK((a).device() == (b).device(), "bisup: ", #a, " is on ", (a).device(), \
              " but ", #b, " is on ", (b).device(), "; move them to one device")

#define BISUP_CHECK_FLOAT(t)                                                        \
  TORCH_CHECK((t).scalar_type() == at::kHalf || (t).scalar_type() == at::kBFloat16 || \
                  (t).scalar_type() == at::kFloat,                                    \
              "bisup: ", #t, " must be float16, bfloat16 or float32, got ", (t).scalar_type())

namespace bisup {

// Number of groups along the last dim K for a group size (-1 = one group per row).
inline int64_t num_groups(int64_t k, int64_t group_size) {
  return group_size == -1 ? 1 : k / group_size;
}

inline int64_t effective_group(int64_t k, int64_t group_size) {
  return group_size == -1 ? k : group_size;
}

inline void check_group_size(int64_t k, int64_t group_size, int64_t multiple_of) {
  TORCH_CHECK(group_size == -1 || group_size > 0, "bisup: group_size must be -1 or positive, got ",
              group_size);
  const int64_t g = effective_group(k, group_size);
  TORCH_CHECK(g > 0 && k % g == 0, "bisup: K=", k, " must be a multiple of group_size=", group_size);
  TORCH_CHECK(g % multiple_of == 0, "bisup: group size ", g, " must be a multiple of ", multiple_of,
              " for this format");
}

}  // namespace bisup
