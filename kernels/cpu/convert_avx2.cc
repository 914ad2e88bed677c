// AVX2 F32 <-> BF16 row conversions (see convert_internal.h). Tails fall back
// to the scalar rows, which compute the same values.
#include <immintrin.h>

#include "kernels/cpu/convert_internal.h"

namespace joule::kernels::cpu {
namespace {

// 8 floats -> 8 BF16 in the low 128 bits; same rounding and NaN rule as scalar.
inline __m128i RoundToBf16(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded =
      _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(0x40));
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  const __m256i r = _mm256_blendv_epi8(rounded, quiet, nan);
  // Values are < 0x10000, so the unsigned-saturating pack keeps them exactly.
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

inline __m256 WidenBf16(__m128i h) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

}  // namespace

void F32ToBf16RowAvx2(const float* src, uint16_t* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), RoundToBf16(_mm256_loadu_ps(src + i)));
  }
  F32ToBf16RowScalar(src + i, dst + i, n - i);
}

void Bf16ToF32RowAvx2(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(dst + i, WidenBf16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  }
  Bf16ToF32RowScalar(src + i, dst + i, n - i);
}

void AxpyBf16RowAvx2(float w, const uint16_t* src, float* dst, int64_t n) {
  const __m256 wv = _mm256_set1_ps(w);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 x = WidenBf16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
    _mm256_storeu_ps(dst + i, _mm256_add_ps(_mm256_loadu_ps(dst + i), _mm256_mul_ps(wv, x)));
  }
  AxpyBf16RowScalar(w, src + i, dst + i, n - i);
}

void AxpyF32RowAvx2(float w, const float* src, float* dst, int64_t n) {
  const __m256 wv = _mm256_set1_ps(w);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(dst + i, _mm256_add_ps(_mm256_loadu_ps(dst + i),
                                            _mm256_mul_ps(wv, _mm256_loadu_ps(src + i))));
  }
  AxpyF32RowScalar(w, src + i, dst + i, n - i);
}

}  // namespace joule::kernels::cpu
