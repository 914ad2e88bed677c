// The checkpoint element types' conversions: FP8 E4M3 both ways.
#include "common/dtype.h"

#include <cmath>
#include <cstdint>
#include <limits>

#include "gtest/gtest.h"

namespace joule {
namespace {

// OCP E4M3 ("e4m3fn") from its definition: bias 7, exponent 0 subnormal
// (mantissa * 2^-9), S.1111.111 NaN, no infinities.
double E4M3Definition(uint8_t code) {
  const int exponent = (code >> 3) & 0xf, mantissa = code & 0x7;
  if (exponent == 0xf && mantissa == 0x7) return std::numeric_limits<double>::quiet_NaN();
  const double magnitude = exponent == 0 ? mantissa * std::ldexp(1.0, -9)
                                         : (1.0 + mantissa / 8.0) * std::ldexp(1.0, exponent - 7);
  return (code & 0x80) ? -magnitude : magnitude;
}

TEST(DTypeTest, F8E4M3IsOneByteNamedAsSafetensorsDoes) {
  EXPECT_EQ(DTypeSize(DType::kF8E4M3), 1u);
  EXPECT_EQ(DTypeName(DType::kF8E4M3), "F8_E4M3");
}

TEST(DTypeTest, E4M3DecodesEveryCodeExactly) {
  for (int code = 0; code < 256; ++code) {
    const double want = E4M3Definition(static_cast<uint8_t>(code));
    const float got = E4M3ToF32(static_cast<uint8_t>(code));
    if (std::isnan(want)) {
      EXPECT_TRUE(std::isnan(got)) << code;
    } else {
      EXPECT_EQ(got, want) << code;
      EXPECT_EQ(std::signbit(got), (code & 0x80) != 0) << code;
    }
  }
  EXPECT_EQ(E4M3ToF32(0x01), std::ldexp(1.0f, -9));  // smallest subnormal
  EXPECT_EQ(E4M3ToF32(0x07), 7 * std::ldexp(1.0f, -9));
  EXPECT_EQ(E4M3ToF32(0x08), std::ldexp(1.0f, -6));  // smallest normal
  EXPECT_EQ(E4M3ToF32(0x38), 1.0f);
  EXPECT_EQ(E4M3ToF32(0x7e), 448.0f);
  EXPECT_EQ(E4M3ToF32(0xfe), -448.0f);
  EXPECT_TRUE(std::isnan(E4M3ToF32(0x7f)));
  EXPECT_TRUE(std::isnan(E4M3ToF32(0xff)));
}

TEST(DTypeTest, E4M3EncodeRoundsToNearestEvenAndSaturates) {
  for (int code = 0; code < 256; ++code) {
    if ((code & 0x7f) == 0x7f) continue;
    EXPECT_EQ(F32ToE4M3(E4M3ToF32(static_cast<uint8_t>(code))), code) << code;
  }
  // Halfway between 1 (0x38) and 1.125 (0x39): the even code; past it, up.
  EXPECT_EQ(F32ToE4M3(1.0625f), 0x38);
  EXPECT_EQ(F32ToE4M3(1.0626f), 0x39);
  EXPECT_EQ(F32ToE4M3(1.1875f), 0x3a);  // halfway between 0x39 and 0x3a: even
  // Subnormals in steps of 2^-9, ties to even.
  EXPECT_EQ(F32ToE4M3(1.5f * std::ldexp(1.0f, -9)), 0x02);
  EXPECT_EQ(F32ToE4M3(0.5f * std::ldexp(1.0f, -9)), 0x00);
  EXPECT_EQ(F32ToE4M3(-std::ldexp(1.0f, -9)), 0x81);
  // Past the largest finite value: 448, never NaN.
  EXPECT_EQ(F32ToE4M3(460.0f), 0x7e);
  EXPECT_EQ(F32ToE4M3(1e6f), 0x7e);
  EXPECT_EQ(F32ToE4M3(-std::numeric_limits<float>::infinity()), 0xfe);
  EXPECT_EQ(F32ToE4M3(std::nanf("")) & 0x7f, 0x7f);
}

}  // namespace
}  // namespace joule
