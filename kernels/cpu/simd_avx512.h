// AVX-512 (F/BW/VL) vector traits for the templated kernels (internal).
// Include only from translation units compiled with -mavx512f -mavx512bw
// -mavx512vl -mfma; everything here has internal linkage so no out-of-line
// copy can leak into code that runs on CPUs without AVX-512.
#pragma once

// GCC 12's AVX-512 intrinsics warn about their own `_mm512_undefined_*`
// self-initialization (GCC bug 105593); the warning points into the header, so
// silencing it for the header's lines alone is enough.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include <cstdint>

namespace joule::kernels::cpu {
namespace {

struct Avx512 {
  using Reg = __m512;
  static constexpr int kLanes = 16;

  static Reg Zero() { return _mm512_setzero_ps(); }
  static Reg Set1(float v) { return _mm512_set1_ps(v); }
  static Reg Load(const float* p) { return _mm512_loadu_ps(p); }
  static Reg LoadTail(const float* p, int count) {
    return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << count) - 1), p);
  }
  static void Store(float* p, Reg v) { _mm512_storeu_ps(p, v); }
  static void StoreTail(float* p, Reg v, int count) {
    _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << count) - 1), v);
  }
  // Keeps a value in a register: stops GCC from re-reading it from memory as an
  // FMA operand on every use (one extra load per FMA halves the tile's speed).
  static void Pin(Reg& r) { __asm__("" : "+v"(r)); }
  static void Prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }
  static Reg Fma(Reg a, Reg b, Reg c) { return _mm512_fmadd_ps(a, b, c); }
  static Reg Add(Reg a, Reg b) { return _mm512_add_ps(a, b); }
  static Reg Mul(Reg a, Reg b) { return _mm512_mul_ps(a, b); }
  static float ReduceAdd(Reg v) {
    // Fold 512 -> 128 bits with in-register lane shuffles, then finish in SSE.
    v = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, _MM_SHUFFLE(1, 0, 3, 2)));
    v = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, _MM_SHUFFLE(2, 3, 0, 1)));
    __m128 q = _mm512_castps512_ps128(v);
    q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    q = _mm_add_ss(q, _mm_movehdup_ps(q));
    return _mm_cvtss_f32(q);
  }

  // out[0..3] = horizontal sums of a, b, c, d (one merged shuffle tree).
  static void ReduceAdd4(Reg a, Reg b, Reg c, Reg d, float* out) {
    // Per 128-bit lane: ab = [a0+a2, b0+b2, a1+a3, b1+b3], likewise cd.
    const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    // Per 128-bit lane: [sum a, sum b, sum c, sum d] of that lane.
    __m512 v = _mm512_add_ps(
        _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))),
        _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))));
    v = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, _MM_SHUFFLE(1, 0, 3, 2)));
    v = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, _MM_SHUFFLE(2, 3, 0, 1)));
    _mm_storeu_ps(out, _mm512_castps512_ps128(v));
  }

  // Weights: BF16 is the high half of an F32, so widening is a 16-bit shift.
  static Reg LoadW(const uint16_t* p) {
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static Reg LoadWTail(const uint16_t* p, int count) {
    __m256i h = _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << count) - 1), p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static Reg LoadW(const float* p) { return Load(p); }
  static Reg LoadWTail(const float* p, int count) { return LoadTail(p, count); }

  // FP8 E4M3 codes, widened to their value times 2^-8 (see simd_avx2.h).
  static Reg LoadW(const uint8_t* p) {
    return DecodeE4M3(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static Reg LoadWTail(const uint8_t* p, int count) {
    return DecodeE4M3(_mm_maskz_loadu_epi8(static_cast<__mmask16>((1u << count) - 1), p));
  }
  static Reg DecodeE4M3(__m128i codes) {
    const __m256i h = _mm256_and_si256(_mm256_slli_epi16(_mm256_cvtepi8_epi16(codes), 7),
                                       _mm256_set1_epi16(static_cast<short>(0xbf80)));
    // S.1111.111 (NaN) lanes keep NaN; the others are converted.
    const __mmask16 nan = _mm_cmpeq_epi8_mask(_mm_or_si128(codes, _mm_set1_epi8(static_cast<char>(0x80))),
                                              _mm_set1_epi8(-1));
    return _mm512_mask_cvtph_ps(_mm512_set1_ps(__builtin_nanf("")), static_cast<__mmask16>(~nan), h);
  }
};

}  // namespace
}  // namespace joule::kernels::cpu
