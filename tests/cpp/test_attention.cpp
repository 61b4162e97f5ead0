// CPU mixed-precision attention and KV quantization on tiny cases worked out by hand.
#include <gtest/gtest.h>

#include <cmath>

#include "ops.h"

namespace {

constexpr int64_t kD = 8;  // smallest head_dim the KV format allows

at::Tensor zeros(std::vector<int64_t> shape, at::ScalarType dt = at::kFloat) { return at::zeros(shape, dt); }

// An empty quantized segment [B, Hkv, 0, ...] (4-bit, one group).
struct Empty {
  at::Tensor q = zeros({1, 1, 0, kD / 2}, at::kByte), s = zeros({1, 1, 0, 1}, at::kHalf), z = zeros({1, 1, 0, 1}, at::kHalf);
};

TEST(Attention, OnePromptKeyReturnsItsValue) {
  auto q = at::randn({1, 2, 1, kD});  // two query heads share the one KV head (GQA)
  auto k = at::randn({1, 1, 1, kD});
  auto v = at::arange(kD, at::kFloat).view({1, 1, 1, kD});
  Empty e;
  auto out = bisup::attention_cpu(q, k, v, e.q, e.s, e.z, e.q, e.s, e.z, 4, -1, std::nullopt, true, std::nullopt, 0);
  EXPECT_TRUE(at::allclose(out, v.expand({1, 2, 1, kD})));
}

TEST(Attention, TwoKeysWeightedOneToThree) {
  // q = e0, k0 = 0, k1 = ln(3) e0, scale 1: scores 0 and ln 3 -> weights 1/4 and 3/4.
  auto q = zeros({1, 1, 1, kD});
  q[0][0][0][0] = 1.f;
  auto k = zeros({1, 1, 2, kD});
  k[0][0][1][0] = std::log(3.f);
  auto v = at::cat({at::full({1, 1, 1, kD}, 1.f), at::full({1, 1, 1, kD}, 5.f)}, 2);
  Empty e;
  auto out = bisup::attention_cpu(q, k, v, e.q, e.s, e.z, e.q, e.s, e.z, 4, -1, 1.0, true, std::nullopt, 0);
  EXPECT_TRUE(at::allclose(out, at::full({1, 1, 1, kD}, 4.f)));  // 1/4 * 1 + 3/4 * 5
}

TEST(Attention, QuantizedKeysAndEndAlignedCausalMask) {
  // Prompt key 0 (value 1), then one 4-bit key: codes 1 at dim 0 (scale 1, zero 0) and value codes 5.
  // softmax_scale ln 3 -> weights 1/4, 3/4 for a query that sees both keys.
  auto q = zeros({1, 1, 2, kD});
  q[0][0][0][0] = 1.f;
  q[0][0][1][0] = 1.f;
  auto kp = zeros({1, 1, 1, kD});
  auto vp = at::full({1, 1, 1, kD}, 1.f);
  auto kq = zeros({1, 1, 1, kD / 2}, at::kByte);
  kq[0][0][0][0] = 0x01;  // element 0 in the low nibble
  auto vq = at::full({1, 1, 1, kD / 2}, 0x55, at::kByte);
  auto one = at::ones({1, 1, 1, 1}, at::kHalf), zero = zeros({1, 1, 1, 1}, at::kHalf);
  auto out = bisup::attention_cpu(q, kp, vp, kq, one, zero, vq, one, zero, 4, -1, std::log(3.0), true, std::nullopt, 0);
  // Tq = 2, L = 2: query 0 sees key 0 only, query 1 sees keys 0 and 1.
  EXPECT_TRUE(at::allclose(out[0][0][0], at::full({kD}, 1.f)));
  EXPECT_TRUE(at::allclose(out[0][0][1], at::full({kD}, 4.f)));
  // Without the causal mask both queries see both keys.
  auto full = bisup::attention_cpu(q, kp, vp, kq, one, zero, vq, one, zero, 4, -1, std::log(3.0), false, std::nullopt, 0);
  EXPECT_TRUE(at::allclose(full[0][0][0], at::full({kD}, 4.f)));
  // seq_lens = 0: the quantized key is padding, so both queries see only the prompt key.
  auto lens = zeros({1}, at::kLong);
  auto padded = bisup::attention_cpu(q, kp, vp, kq, one, zero, vq, one, zero, 4, -1, std::log(3.0), true, lens, 0);
  EXPECT_TRUE(at::allclose(padded[0][0][1], at::full({kD}, 1.f)));
  EXPECT_TRUE(at::allclose(padded[0][0][0], at::zeros({kD})));  // query 0 now sees nothing
}

TEST(Attention, RejectsMismatchedHeads) {
  Empty e;
  EXPECT_THROW(bisup::attention_cpu(at::randn({1, 3, 1, kD}), at::randn({1, 2, 1, kD}), at::randn({1, 2, 1, kD}),
                                    e.q, e.s, e.z, e.q, e.s, e.z, 4, -1, std::nullopt, true, std::nullopt, 0),
               c10::Error);
  auto q = at::randn({1, 1, 1, kD}), k = at::randn({1, 1, 1, kD});
  EXPECT_THROW(bisup::attention_cpu(q, k, k, e.q, e.s, e.z, e.q, e.s, e.z, 4, -1, std::nullopt, true, std::nullopt, -1),
               c10::Error);  // a negative window
}

TEST(Attention, SlidingWindowMasksThePromptToo) {
  // Three prompt keys (all zero: equal scores) with values 1, 2, 4 and three queries at positions 0, 1, 2.
  // Window 2: query i sees keys i - 1 and i (the prompt segment is masked like any other key).
  auto q = at::randn({1, 1, 3, kD});
  auto k = zeros({1, 1, 3, kD});
  auto v = at::cat({at::full({1, 1, 1, kD}, 1.f), at::full({1, 1, 1, kD}, 2.f), at::full({1, 1, 1, kD}, 4.f)}, 2);
  Empty e;
  auto out = bisup::attention_cpu(q, k, v, e.q, e.s, e.z, e.q, e.s, e.z, 4, -1, std::nullopt, true, std::nullopt, 2);
  EXPECT_TRUE(at::allclose(out[0][0][0], at::full({kD}, 1.f)));
  EXPECT_TRUE(at::allclose(out[0][0][1], at::full({kD}, 1.5f)));
  EXPECT_TRUE(at::allclose(out[0][0][2], at::full({kD}, 3.f)));
  // Window 1: each query sees itself only.
  auto own = bisup::attention_cpu(q, k, v, e.q, e.s, e.z, e.q, e.s, e.z, 4, -1, std::nullopt, true, std::nullopt, 1);
  EXPECT_TRUE(at::allclose(own, v));
}

TEST(KvQuantize, EightBitCodesOfARamp) {
  // x = 0..7 (one group): s = 7/255, z = 0, codes = round(x * 255 / 7).
  auto x = at::arange(kD, at::kFloat).view({1, kD});
  auto [q, s, z] = bisup::kv_quantize_cpu(x, 8, -1);
  const float scale = static_cast<float>(c10::Half(7.f / 255.f));
  EXPECT_EQ(static_cast<float>(s.data_ptr<c10::Half>()[0]), scale);
  EXPECT_EQ(static_cast<float>(z.data_ptr<c10::Half>()[0]), 0.f);
  for (int i = 0; i < kD; ++i) EXPECT_EQ(q.data_ptr<uint8_t>()[i], static_cast<uint8_t>(std::nearbyint(i / scale)));
}

TEST(KvQuantize, FourBitMatchesQuantizePackAsym) {
  auto x = at::randn({3, 2 * kD});
  auto [q, s, z] = bisup::kv_quantize_cpu(x, 4, kD);
  auto [q2, s2, z2] = bisup::quantize_pack_cpu(x, 4, kD, false, 1.0);
  EXPECT_TRUE(at::equal(q, q2));
  EXPECT_TRUE(at::equal(s, s2));
  EXPECT_TRUE(at::equal(z, z2));
}

}  // namespace
