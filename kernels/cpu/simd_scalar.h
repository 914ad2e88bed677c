// One-lane "vector" traits: the portable fallback of the templated kernels (internal).
#pragma once

#include <cstdint>
#include <cstring>

namespace joule::kernels::cpu {
namespace {

struct Scalar {
  using Reg = float;
  static constexpr int kLanes = 1;

  static Reg Zero() { return 0.0f; }
  static Reg Set1(float v) { return v; }
  static Reg Load(const float* p) { return *p; }
  static Reg LoadTail(const float* p, int /*count*/) { return *p; }  // never called: count < 1 lane
  static void Store(float* p, Reg v) { *p = v; }
  static void StoreTail(float* p, Reg v, int /*count*/) { *p = v; }
  static void Pin(Reg& /*r*/) {}
  static void Prefetch(const void* /*p*/) {}
  static Reg Fma(Reg a, Reg b, Reg c) { return a * b + c; }
  static Reg Add(Reg a, Reg b) { return a + b; }
  static Reg Mul(Reg a, Reg b) { return a * b; }
  static float ReduceAdd(Reg v) { return v; }

  static void ReduceAdd4(Reg a, Reg b, Reg c, Reg d, float* out) {
    out[0] = a;
    out[1] = b;
    out[2] = c;
    out[3] = d;
  }

  static Reg LoadW(const uint16_t* p) {
    uint32_t bits = static_cast<uint32_t>(*p) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
  }
  static Reg LoadWTail(const uint16_t* p, int /*count*/) { return LoadW(p); }
  static Reg LoadW(const float* p) { return *p; }
  static Reg LoadWTail(const float* p, int /*count*/) { return *p; }

  // FP8 E4M3 codes, widened to their value times 2^-8 (see simd_avx2.h).
  static Reg LoadW(const uint8_t* p) {
    const int exponent = (*p >> 3) & 0xf, mantissa = *p & 0x7;
    float v;
    if (exponent == 0xf && mantissa == 0x7) {
      v = __builtin_nanf("");
    } else if (exponent == 0) {
      v = static_cast<float>(mantissa) * 0x1p-17f;  // subnormal: mantissa * 2^-9 * 2^-8
    } else {  // (8 + mantissa) * 2^(exponent - 10) * 2^-8, built from its bits
      const uint32_t bits = static_cast<uint32_t>(exponent + 127 - 7 - 8) << 23 |
                            static_cast<uint32_t>(mantissa) << 20;
      std::memcpy(&v, &bits, sizeof(v));
    }
    return (*p & 0x80) ? -v : v;
  }
  static Reg LoadWTail(const uint8_t* p, int /*count*/) { return LoadW(p); }
};

}  // namespace
}  // namespace joule::kernels::cpu
