// AVX2 + FMA vector traits for the templated kernels (internal).
// Include only from translation units compiled with -mavx2 -mfma; everything
// here has internal linkage (see simd_avx512.h).
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace joule::kernels::cpu {
namespace {

struct Avx2 {
  using Reg = __m256;
  static constexpr int kLanes = 8;

  static __m256i TailMask(int count) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(count), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static Reg Zero() { return _mm256_setzero_ps(); }
  static Reg Set1(float v) { return _mm256_set1_ps(v); }
  static Reg Load(const float* p) { return _mm256_loadu_ps(p); }
  static Reg LoadTail(const float* p, int count) { return _mm256_maskload_ps(p, TailMask(count)); }
  static void Store(float* p, Reg v) { _mm256_storeu_ps(p, v); }
  static void StoreTail(float* p, Reg v, int count) { _mm256_maskstore_ps(p, TailMask(count), v); }
  // Keeps a value in a register: stops GCC from re-reading it from memory as an
  // FMA operand on every use (one extra load per FMA halves the tile's speed).
  static void Pin(Reg& r) { __asm__("" : "+v"(r)); }
  static void Prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }
  static Reg Fma(Reg a, Reg b, Reg c) { return _mm256_fmadd_ps(a, b, c); }
  static Reg Add(Reg a, Reg b) { return _mm256_add_ps(a, b); }
  static Reg Mul(Reg a, Reg b) { return _mm256_mul_ps(a, b); }
  static float ReduceAdd(Reg v) {
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    q = _mm_add_ss(q, _mm_movehdup_ps(q));
    return _mm_cvtss_f32(q);
  }

  // out[0..3] = horizontal sums of a, b, c, d.
  static void ReduceAdd4(Reg a, Reg b, Reg c, Reg d, float* out) {
    const __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1)));
  }

  static Reg LoadW(const uint16_t* p) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static Reg LoadWTail(const uint16_t* p, int count) {
    // No 16-bit masked load in AVX2: go through a zeroed buffer (tails only).
    alignas(16) uint16_t buf[kLanes] = {};
    std::memcpy(buf, p, sizeof(uint16_t) * count);
    return LoadW(buf);
  }
  static Reg LoadW(const float* p) { return Load(p); }
  static Reg LoadWTail(const float* p, int count) { return LoadTail(p, count); }

  // FP8 E4M3 codes, widened to their value times 2^-8 (the caller scales by
  // 2^8 once per dot product): the code's exponent and mantissa bits are an
  // F16 with the same bits and bias 15 instead of 7, and F16C widens F16
  // exactly, subnormals included, whatever MXCSR's DAZ says.
  static Reg LoadW(const uint8_t* p) {
    return DecodeE4M3(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  }
  static Reg LoadWTail(const uint8_t* p, int count) {
    alignas(16) uint8_t buf[16] = {};
    std::memcpy(buf, p, count);
    return DecodeE4M3(_mm_load_si128(reinterpret_cast<const __m128i*>(buf)));
  }
  // The low 8 bytes of `codes`.
  static Reg DecodeE4M3(__m128i codes) {
    // Sign-extended to 16 bits and shifted left 7: bit 15 is the sign,
    // bits 7..13 the exponent and mantissa; bit 14 (a copy of the sign) cleared.
    __m128i h = _mm_and_si128(_mm_slli_epi16(_mm_cvtepi8_epi16(codes), 7),
                              _mm_set1_epi16(static_cast<short>(0xbf80)));
    // S.1111.111 is NaN in E4M3 (480 as an F16): all ones is an F16 NaN.
    const __m128i nan_bits = _mm_set1_epi16(0x3f80);
    h = _mm_or_si128(h, _mm_cmpeq_epi16(_mm_and_si128(h, nan_bits), nan_bits));
    return _mm256_cvtph_ps(h);
  }
};

}  // namespace
}  // namespace joule::kernels::cpu
