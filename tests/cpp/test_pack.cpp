// Packing CPU kernels checked against bytes worked out by hand (docs/formats.md).
#include <gtest/gtest.h>

#include "ops.h"

namespace {

at::Tensor int8s(std::vector<int8_t> v) {
  return at::from_blob(v.data(), {static_cast<int64_t>(v.size())}, at::kChar).clone();
}

TEST(PackInt4, KnownBytes) {
  // element 0 -> low nibble: (1, -1) -> 0xF1 ; (-8, 7) -> 0x78 ; (0, -2) -> 0xE0
  auto packed = bisup::pack_int4_cpu(int8s({1, -1, -8, 7, 0, -2}), true);
  ASSERT_EQ(packed.numel(), 3);
  const uint8_t* p = packed.data_ptr<uint8_t>();
  EXPECT_EQ(p[0], 0xF1);
  EXPECT_EQ(p[1], 0x78);
  EXPECT_EQ(p[2], 0xE0);
}

TEST(PackInt4, UnsignedRoundTrip) {
  auto q = int8s({0, 15, 7, 8, 3, 12});
  auto packed = bisup::pack_int4_cpu(q, false);
  EXPECT_EQ(packed.data_ptr<uint8_t>()[0], 0xF0);
  EXPECT_TRUE(at::equal(bisup::unpack_int4_cpu(packed, false), q));
}

TEST(PackInt4, RejectsOutOfRangeAndOddK) {
  EXPECT_THROW(bisup::pack_int4_cpu(int8s({8, 0}), true), c10::Error);
  EXPECT_THROW(bisup::pack_int4_cpu(int8s({-1, 0}), false), c10::Error);
  EXPECT_THROW(bisup::pack_int4_cpu(int8s({1, 2, 3}), true), c10::Error);
}

TEST(PackInt3, KnownWords) {
  // value 0 = 3 (0b011), value 1 = -1 (0b111), value 17 = -4 (0b100), rest 0.
  std::vector<int8_t> v(32, 0);
  v[0] = 3;
  v[1] = -1;
  v[17] = -4;
  auto packed = bisup::pack_int3_cpu(int8s(v), true);
  ASSERT_EQ(packed.numel(), 12);
  const uint32_t* w = reinterpret_cast<const uint32_t*>(packed.data_ptr<uint8_t>());
  // word0: value 0 low bits 0b11 at bit 0; value 1 (s=0,b=1) low bits 0b11 at bit 8.
  EXPECT_EQ(w[0], 0x00000303u);
  // word1: value 17 = 16 + (s=0, b=1): low bits 0b00.
  EXPECT_EQ(w[1], 0x00000000u);
  // word2: value 1 high bit at 8*1+0 = 8; value 17 (s=4, b=1) at 8*1+4 = 12.
  EXPECT_EQ(w[2], (1u << 8) | (1u << 12));
  EXPECT_TRUE(at::equal(bisup::unpack_int3_cpu(packed, true), int8s(v)));
}

TEST(PackInt3, RoundTripAllValues) {
  for (bool is_signed : {true, false}) {
    auto q = at::randint(is_signed ? -4 : 0, is_signed ? 4 : 8, {5, 96}, at::kChar);
    EXPECT_TRUE(at::equal(bisup::unpack_int3_cpu(bisup::pack_int3_cpu(q, is_signed), is_signed), q));
  }
}

TEST(QuantizePack, KnownGroup) {
  // One group [0.5, -1.0, 0.25, 1.0], 4-bit symmetric: s = 1/7 (fp16), q = round(x/s).
  std::vector<float> x{0.5f, -1.0f, 0.25f, 1.0f};
  auto t = at::from_blob(x.data(), {1, 4}, at::kFloat).clone();
  auto [q, scale, zero] = bisup::quantize_pack_cpu(t, 4, -1, true, 1.0);
  const float s = static_cast<float>(c10::Half(1.0f / 7.0f));
  EXPECT_EQ(static_cast<float>(scale.data_ptr<c10::Half>()[0]), s);
  auto vals = bisup::unpack_int4_cpu(q, true);
  const int8_t* v = vals.data_ptr<int8_t>();
  EXPECT_EQ(v[0], static_cast<int8_t>(std::nearbyint(0.5f / s)));
  EXPECT_EQ(v[1], -7);
  EXPECT_EQ(v[2], static_cast<int8_t>(std::nearbyint(0.25f / s)));
  EXPECT_EQ(v[3], 7);
}

TEST(QuantizePack, ZeroGroupHasUnitScale) {
  auto t = at::zeros({2, 8}, at::kFloat);
  auto [q, scale, zero] = bisup::quantize_pack_cpu(t, 4, 4, false, 1.0);
  EXPECT_TRUE(at::all(scale.to(at::kFloat) == 1.0f).item<bool>());
  EXPECT_TRUE(at::all(zero.to(at::kFloat) == 0.0f).item<bool>());
}

}  // namespace
