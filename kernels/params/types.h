// Element types of the kernels' tensors, shared by every parameter struct.
// Device-neutral: no CUDA or thread-pool types here.
#pragma once

#include <cstddef>
#include <cstdint>

namespace joule::kernels {

// F32, or BF16 (the top 16 bits of an F32; F32 -> BF16 rounds to nearest
// even, NaN stays NaN, and BF16 -> F32 is exact).
enum class DType : uint8_t { kF32, kBF16 };

// Weights and exchanged rows are both F32 or BF16; the historical names stay
// as aliases so a weight type and a row type are the same concept.
using WeightType = DType;
using RowType = DType;

constexpr size_t ElementBytes(DType type) { return type == DType::kBF16 ? 2 : 4; }
constexpr const char* DTypeName(DType type) { return type == DType::kBF16 ? "bf16" : "f32"; }

}  // namespace joule::kernels
