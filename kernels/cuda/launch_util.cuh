// Small device helpers shared by the .cu files of this directory (not public).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "kernels/params/gemm.h"

namespace joule::kernels::cuda {

inline constexpr int64_t kMaxGridX = 2147483647;

// Blocks for a grid-stride loop over n elements: enough to fill an H100, no more.
inline unsigned GridStrideBlocks(int64_t n, int threads) {
  int64_t blocks = (n + threads - 1) / threads;
  return static_cast<unsigned>(blocks < 4096 ? blocks : 4096);
}

// The FP8 scale of weight (row, col): its block's entry in the row-major
// scale grid of `scale_ld` columns. Divided in 32 bits (launches refuse
// larger indices, ValidateFp8Blocks): the GPU emulates a 64-bit division in tens
// of instructions, and this runs for every weight staged.
__device__ __forceinline__ int64_t Fp8ScaleIndex(int64_t row, int64_t col, int64_t block_rows,
                                                 int64_t block_cols, int64_t scale_ld) {
  const uint32_t block_row = static_cast<uint32_t>(row) / static_cast<uint32_t>(block_rows);
  const uint32_t block_col = static_cast<uint32_t>(col) / static_cast<uint32_t>(block_cols);
  return static_cast<int64_t>(block_row) * scale_ld + block_col;
}

// The FP8 scale blocks of weights of n rows and k columns, for `kernel`'s
// messages: positive blocks, and indices Fp8ScaleIndex can divide in 32 bits.
inline absl::Status ValidateFp8Blocks(const char* kernel, const WeightBlocks& b, int64_t n,
                                      int64_t k) {
  if (b.rows <= 0 || b.cols <= 0 || b.first_row < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        kernel, ": f8_e4m3 weights need positive w_blocks.rows and cols and first_row >= 0, got ",
        b.rows, "x", b.cols, " first_row ", b.first_row));
  }
  constexpr int64_t kMax = UINT32_MAX;
  if (b.first_row + n > kMax || k > kMax || b.rows > kMax || b.cols > kMax) {
    return absl::InvalidArgumentError(
        absl::StrCat(kernel, ": f8_e4m3 weights' rows, k and blocks must fit 32 bits"));
  }
  return absl::OkStatus();
}

template <typename T>
__device__ __forceinline__ T WarpSum(T v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ float WarpMax(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  }
  return v;
}

// Sum over a block of kThreads threads (a multiple of 32); every thread gets it.
template <int kThreads, typename T>
__device__ T BlockSum(T v) {
  __shared__ T partial[kThreads / 32];
  v = WarpSum(v);
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  v = lane < kThreads / 32 ? partial[lane] : T(0);
  v = WarpSum(v);
  __syncthreads();  // partial may be reused by the caller's next BlockSum
  return v;
}

__device__ __forceinline__ float Bf16BitsToFloat(uint16_t v) {
  return __uint_as_float(static_cast<uint32_t>(v) << 16);
}

// An OCP FP8 E4M3 code as F32, exactly (common/dtype.h's E4M3ToF32): 1 sign,
// 4 exponent (bias 7) and 3 mantissa bits; exponent 0 is subnormal
// (mantissa * 2^-9), S.1111.111 is NaN, there are no infinities.
__device__ __forceinline__ float E4M3ToFloat(uint8_t v) {
  const uint32_t sign = static_cast<uint32_t>(v & 0x80u) << 24;
  const uint32_t exponent = (v >> 3) & 0xfu;
  const uint32_t mantissa = v & 0x7u;
  float magnitude;
  if (exponent == 0) {
    magnitude = static_cast<float>(mantissa) * (1.0f / 512.0f);  // exact: 3 bits times 2^-9
  } else if (exponent == 0xfu && mantissa == 0x7u) {
    magnitude = __uint_as_float(0x7fc00000u);
  } else {
    // (1 + m/8) * 2^(e - 7): F32 exponent field e - 7 + 127, mantissa's top 3 bits.
    magnitude = __uint_as_float(((exponent + 120u) << 23) | (mantissa << 20));
  }
  return __uint_as_float(__float_as_uint(magnitude) | sign);
}

}  // namespace joule::kernels::cuda
