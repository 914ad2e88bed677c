// Element types of the kernels' tensors, shared by every parameter struct.
// Device-neutral: no CUDA or thread-pool types here.
#pragma once

#include <cstddef>
#include <cstdint>

namespace joule::kernels {

// F32, or BF16 (the top 16 bits of an F32; F32 -> BF16 rounds to nearest
// even, NaN stays NaN, and BF16 -> F32 is exact). kF8E4M3 is for weights only:
// OCP FP8 E4M3 codes (bias 7, subnormals, 0x7f/0xff NaN, largest finite 448)
// with an F32 scale per block of the matrix (GemmParams::w_scale_inv),
// widened to F32 in registers inside the GEMM.
enum class DType : uint8_t { kF32, kBF16, kF8E4M3 };

// Weights and exchanged rows are both F32 or BF16 (weights also FP8); the
// historical names stay as aliases so a weight type and a row type are the
// same concept.
using WeightType = DType;
using RowType = DType;

constexpr size_t ElementBytes(DType type) {
  return type == DType::kBF16 ? 2 : type == DType::kF8E4M3 ? 1 : 4;
}
constexpr const char* DTypeName(DType type) {
  return type == DType::kBF16 ? "bf16" : type == DType::kF8E4M3 ? "f8_e4m3" : "f32";
}

}  // namespace joule::kernels
