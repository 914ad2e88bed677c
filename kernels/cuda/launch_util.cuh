// Small device helpers shared by the .cu files of this directory (not public).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace joule::kernels::cuda {

inline constexpr int64_t kMaxGridX = 2147483647;

// Blocks for a grid-stride loop over n elements: enough to fill an H100, no more.
inline unsigned GridStrideBlocks(int64_t n, int threads) {
  int64_t blocks = (n + threads - 1) / threads;
  return static_cast<unsigned>(blocks < 4096 ? blocks : 4096);
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

}  // namespace joule::kernels::cuda
