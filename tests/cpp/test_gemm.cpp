// CPU GEMM (csrc/cpu/gemm.cpp) on small cases worked out by hand.
#include <gtest/gtest.h>

#include "ops.h"

namespace {

at::Tensor int8_row(std::vector<int8_t> v) {
  return at::from_blob(v.data(), {1, static_cast<int64_t>(v.size())}, at::kChar).clone();
}

at::Tensor halfs(std::vector<float> v, std::vector<int64_t> shape) {
  return at::from_blob(v.data(), shape, at::kFloat).to(at::kHalf);
}

at::Tensor run(const at::Tensor& qa, const at::Tensor& a_scale, const at::Tensor& w_packed, const at::Tensor& w_scale,
               int64_t w_bits, int64_t group_size, const std::optional<at::Tensor>& bias = std::nullopt,
               const std::optional<at::Tensor>& ao = std::nullopt, const std::optional<at::Tensor>& sao = std::nullopt,
               const std::optional<at::Tensor>& wo = std::nullopt, const std::optional<at::Tensor>& swo = std::nullopt) {
  return bisup::gemm_cpu(bisup::pack_int4_cpu(qa, true), a_scale, w_packed, w_scale, 4, w_bits, group_size, at::kFloat,
                         bias, ao, sao, wo, swo);
}

// a = [-8, 7, 1, 1, ..., 1] (K = 32); w0 = all 2 -> dot 2 * 29 = 58; w1 = +1 / -1 alternating -> dot -8 - 7 + 0 = -15.
struct OneGroup {
  at::Tensor qa, w;
  OneGroup() {
    std::vector<int8_t> a(32, 1), w0(32, 2), w1(32);
    a[0] = -8;
    a[1] = 7;
    for (int k = 0; k < 32; ++k) w1[k] = k % 2 ? -1 : 1;
    qa = int8_row(a);
    w = at::cat({int8_row(w0), int8_row(w1)});
  }
};

TEST(GemmCpu, OneGroupByHand) {
  OneGroup c;
  auto y = run(c.qa, halfs({0.5f}, {1, 1}), bisup::pack_int4_cpu(c.w, true), halfs({0.25f, 1.0f}, {2, 1}), 4, -1);
  ASSERT_EQ(y.sizes(), (std::vector<int64_t>{1, 2}));
  EXPECT_EQ(y[0][0].item<float>(), 58 * 0.125f);
  EXPECT_EQ(y[0][1].item<float>(), -15 * 0.5f);
}

TEST(GemmCpu, BiasAndOutliers) {
  OneGroup c;
  auto bias = at::tensor({1.0f, -1.0f});
  // outlier dot: 100 * -50 = -5000, scales 0.125 * 0.5 -> -312.5 (row 0, both columns share w_outlier row values)
  auto ao = at::zeros({1, 16}, at::kChar);
  auto wo = at::zeros({2, 16}, at::kChar);
  ao[0][0] = 100;
  wo[0][0] = -50;
  wo[1][3] = 9;  // meets a zero activation: contributes nothing
  auto y = run(c.qa, halfs({0.5f}, {1, 1}), bisup::pack_int4_cpu(c.w, true), halfs({0.25f, 1.0f}, {2, 1}), 4, 32, bias,
               ao, halfs({0.125f}, {1}), wo, halfs({0.5f, 2.0f}, {2}));
  EXPECT_EQ(y[0][0].item<float>(), 58 * 0.125f - 312.5f + 1.0f);
  EXPECT_EQ(y[0][1].item<float>(), -15 * 0.5f - 1.0f);
}

TEST(GemmCpu, Int3WeightsTwoGroups) {
  // a = 1 everywhere (K = 64, group 32); w = 3 in group 0, -4 in group 1: dots 96 and -128.
  auto qa = at::ones({1, 64}, at::kChar);
  auto w = at::cat({at::full({1, 32}, 3, at::kChar), at::full({1, 32}, -4, at::kChar)}, 1);
  auto y = run(qa, halfs({1.0f, 2.0f}, {1, 2}), bisup::pack_int3_cpu(w, true), halfs({0.5f, 0.25f}, {1, 2}), 3, 32);
  EXPECT_EQ(y[0][0].item<float>(), 96 * 0.5f + (-128) * 0.5f);
}

TEST(GemmCpu, HalfOutputAndRejects) {
  OneGroup c;
  auto wp = bisup::pack_int4_cpu(c.w, true);
  auto y = bisup::gemm_cpu(bisup::pack_int4_cpu(c.qa, true), halfs({0.5f}, {1, 1}), wp, halfs({0.25f, 1.0f}, {2, 1}), 4,
                           4, -1, at::kHalf, std::nullopt, std::nullopt, std::nullopt, std::nullopt, std::nullopt);
  EXPECT_EQ(y.scalar_type(), at::kHalf);
  EXPECT_EQ(y[0][1].item<float>(), -7.5f);
  // wrong scale shape, bad a_bits
  EXPECT_THROW(run(c.qa, halfs({0.5f, 0.5f}, {1, 2}), wp, halfs({0.25f, 1.0f}, {2, 1}), 4, -1), c10::Error);
  EXPECT_THROW(bisup::gemm_cpu(bisup::pack_int4_cpu(c.qa, true), halfs({0.5f}, {1, 1}), wp, halfs({0.25f, 1.0f}, {2, 1}),
                               5, 4, -1, at::kFloat, std::nullopt, std::nullopt, std::nullopt, std::nullopt, std::nullopt),
               c10::Error);
}

}  // namespace
