// hadamard CPU twin on hand-worked cases.
#include <gtest/gtest.h>

#include <cmath>

#include "ops.h"

namespace {

at::Tensor floats(std::vector<float> v, std::vector<int64_t> shape) {
  return at::from_blob(v.data(), shape, at::kFloat).clone();
}

TEST(Hadamard, WalshOrder4) {
  // H4 (Sylvester) rows: ++++, +-+-, ++--, +--+ ; x = (1, 2, 3, 4) -> (10, -2, -4, 0) / 2
  auto y = bisup::hadamard_cpu(floats({1, 2, 3, 4}, {1, 4}), std::nullopt);
  const float* p = y.data_ptr<float>();
  EXPECT_FLOAT_EQ(p[0], 5.f);
  EXPECT_FLOAT_EQ(p[1], -1.f);
  EXPECT_FLOAT_EQ(p[2], -2.f);
  EXPECT_FLOAT_EQ(p[3], 0.f);
}

TEST(Hadamard, BaseTimesSylvester) {
  // n = 4 = p 2 * m 2, base B = [[0, 1], [1, 0]] (a permutation): chunks (1, 2), (3, 4) ->
  // B: (2, 1), (4, 3) -> butterfly across chunks: (6, 4), (-2, -2) -> / sqrt(2)
  auto base = floats({0, 1, 1, 0}, {2, 2});
  auto y = bisup::hadamard_cpu(floats({1, 2, 3, 4}, {1, 4}), base);
  const float* p = y.data_ptr<float>();
  const float r = 1.f / std::sqrt(2.f);
  EXPECT_NEAR(p[0], 6 * r, 1e-6);
  EXPECT_NEAR(p[1], 4 * r, 1e-6);
  EXPECT_NEAR(p[2], -2 * r, 1e-6);
  EXPECT_NEAR(p[3], -2 * r, 1e-6);
}

TEST(Hadamard, HalfInHalfOutAndRows) {
  auto x = floats({1, 1, 2, -2}, {2, 2}).to(at::kHalf);
  auto y = bisup::hadamard_cpu(x, std::nullopt);
  ASSERT_EQ(y.scalar_type(), at::kHalf);
  auto f = y.to(at::kFloat);
  const float r = std::sqrt(2.f);
  EXPECT_NEAR(f[0][0].item<float>(), r, 1e-3);
  EXPECT_NEAR(f[0][1].item<float>(), 0.f, 1e-6);
  EXPECT_NEAR(f[1][0].item<float>(), 0.f, 1e-6);
  EXPECT_NEAR(f[1][1].item<float>(), 2 * r, 2e-3);
}

TEST(Hadamard, RejectsBadShapes) {
  EXPECT_THROW(bisup::hadamard_cpu(at::zeros({2, 6}), std::nullopt), c10::Error);       // 6 not 2^k
  EXPECT_THROW(bisup::hadamard_cpu(at::zeros({2, 12}), at::eye(5)), c10::Error);        // 12 % 5
  EXPECT_THROW(bisup::hadamard_cpu(at::zeros({2, 12}), at::eye(3).to(at::kDouble)), c10::Error);
  EXPECT_THROW(bisup::hadamard_cpu(at::zeros({2, 8}, at::kInt), std::nullopt), c10::Error);
  EXPECT_NO_THROW(bisup::hadamard_cpu(at::zeros({2, 12}), at::eye(3)));
}

}  // namespace
