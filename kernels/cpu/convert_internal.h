// Per-ISA row conversions between F32 and BF16 behind LaunchGatherRows,
// LaunchReduceRows and the BF16 path of LaunchUnpermute (internal). Plain types only: these cross from
// ISA-specific translation units.
#pragma once

#include <cstdint>

namespace joule::kernels::cpu {

// dst[i] = BF16(src[i]), round to nearest even, NaN kept NaN (quiet bit set).
using F32ToBf16RowFn = void (*)(const float* src, uint16_t* dst, int64_t n);
// dst[i] = F32(src[i]).
using Bf16ToF32RowFn = void (*)(const uint16_t* src, float* dst, int64_t n);
// dst[i] += w * F32(src[i]).
using AxpyBf16RowFn = void (*)(float w, const uint16_t* src, float* dst, int64_t n);
// dst[i] += w * src[i] (a multiply, then an add: no FMA, same bits on every ISA).
using AxpyF32RowFn = void (*)(float w, const float* src, float* dst, int64_t n);

void F32ToBf16RowScalar(const float* src, uint16_t* dst, int64_t n);
void Bf16ToF32RowScalar(const uint16_t* src, float* dst, int64_t n);
void AxpyBf16RowScalar(float w, const uint16_t* src, float* dst, int64_t n);
void AxpyF32RowScalar(float w, const float* src, float* dst, int64_t n);
#if defined(JOULE_CPU_X86)
void F32ToBf16RowAvx2(const float* src, uint16_t* dst, int64_t n);
void Bf16ToF32RowAvx2(const uint16_t* src, float* dst, int64_t n);
void AxpyBf16RowAvx2(float w, const uint16_t* src, float* dst, int64_t n);
void AxpyF32RowAvx2(float w, const float* src, float* dst, int64_t n);
void F32ToBf16RowAvx512(const float* src, uint16_t* dst, int64_t n);
void Bf16ToF32RowAvx512(const uint16_t* src, float* dst, int64_t n);
void AxpyBf16RowAvx512(float w, const uint16_t* src, float* dst, int64_t n);
void AxpyF32RowAvx512(float w, const float* src, float* dst, int64_t n);
#endif

}  // namespace joule::kernels::cpu
