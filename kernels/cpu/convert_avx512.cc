// AVX-512 F32 <-> BF16 row conversions (see convert_internal.h).
// GCC 12's AVX-512 intrinsics warn about their own `_mm512_undefined_*`
// self-initialization (GCC bug 105593); silence it for the header only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include "kernels/cpu/convert_internal.h"

namespace joule::kernels::cpu {
namespace {

// 16 floats -> 16 BF16, round to nearest even; NaNs keep their top bits with
// the quiet bit set, as the scalar F32ToBf16 does.
inline __m256i RoundToBf16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded =
      _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  const __m512i quiet = _mm512_or_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(0x40));
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  return _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(rounded, nan, quiet));
}

inline __m512 WidenBf16(__m256i h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

}  // namespace

void F32ToBf16RowAvx512(const float* src, uint16_t* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), RoundToBf16(_mm512_loadu_ps(src + i)));
  }
  if (i < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1);
    _mm256_mask_storeu_epi16(dst + i, m, RoundToBf16(_mm512_maskz_loadu_ps(m, src + i)));
  }
}

void Bf16ToF32RowAvx512(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    _mm512_storeu_ps(dst + i,
                     WidenBf16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
  }
  if (i < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1);
    _mm512_mask_storeu_ps(dst + i, m, WidenBf16(_mm256_maskz_loadu_epi16(m, src + i)));
  }
}

void AxpyBf16RowAvx512(float w, const uint16_t* src, float* dst, int64_t n) {
  const __m512 wv = _mm512_set1_ps(w);
  int64_t i = 0;
  // Multiply then add (not FMA), so results match the scalar path bit for bit.
  for (; i + 16 <= n; i += 16) {
    const __m512 x = WidenBf16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i)));
    _mm512_storeu_ps(dst + i, _mm512_add_ps(_mm512_loadu_ps(dst + i), _mm512_mul_ps(wv, x)));
  }
  if (i < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1);
    const __m512 x = WidenBf16(_mm256_maskz_loadu_epi16(m, src + i));
    _mm512_mask_storeu_ps(dst + i, m,
                          _mm512_add_ps(_mm512_maskz_loadu_ps(m, dst + i), _mm512_mul_ps(wv, x)));
  }
}

void AxpyF32RowAvx512(float w, const float* src, float* dst, int64_t n) {
  const __m512 wv = _mm512_set1_ps(w);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    _mm512_storeu_ps(dst + i, _mm512_add_ps(_mm512_loadu_ps(dst + i),
                                            _mm512_mul_ps(wv, _mm512_loadu_ps(src + i))));
  }
  if (i < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1);
    _mm512_mask_storeu_ps(dst + i, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, dst + i),
                                                    _mm512_mul_ps(wv, _mm512_maskz_loadu_ps(m, src + i))));
  }
}

}  // namespace joule::kernels::cpu
