// Element types found in checkpoints and their conversions to float.
#pragma once

#include <cstdint>
#include <cstring>
#include <string_view>

namespace joule {

// kF8E4M3: OCP FP8 E4M3 ("e4m3fn", safetensors' F8_E4M3): 1 sign, 4 exponent (bias 7) and 3
// mantissa bits, subnormals, no infinities, S.1111.111 NaN, largest finite 448. Block-scaled
// FP8 checkpoints (DeepSeek-V3) store their projections in it.
enum class DType { kF32, kF16, kBF16, kF8E4M3 };

inline constexpr size_t DTypeSize(DType t) {
  return t == DType::kF32 ? 4 : t == DType::kF8E4M3 ? 1 : 2;
}
std::string_view DTypeName(DType t);

inline float Bf16ToF32(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// Round-to-nearest-even, NaN preserved (as PyTorch does).
inline uint16_t F32ToBf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  uint32_t rounding = 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>((bits + rounding) >> 16);
}

float F16ToF32(uint16_t h);
uint16_t F32ToF16(float f);

// Exact: every E4M3 value is an F32 (0x7f and 0xff are NaN).
float E4M3ToF32(uint8_t v);
// Round to nearest even; magnitudes past 448 saturate to +-448 (as DeepSeek's quantizer clamps
// before its cast), NaN stays NaN.
uint8_t F32ToE4M3(float f);

}  // namespace joule
