// RMSNorm, SiLU-mul and RoPE. Simple, memory-bound kernels: one block per row
// (RMSNorm) or token (RoPE), grid-stride loops elsewhere.
#include <cuda_runtime.h>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/elementwise.h"
#include "kernels/cuda/launch_util.cuh"

namespace joule::kernels::cuda {
namespace {

constexpr int kRmsNormThreads = 256;

__global__ void RmsNormKernel(RmsNormParams p) {
  const float* x = p.x + blockIdx.x * p.cols;
  float* out = p.out + blockIdx.x * p.cols;
  // Sum of squares in double and 1/sqrt rather than rsqrtf, as the CPU kernel
  // does, so both agree to the last bit or two.
  double sum = 0.0;
  for (int64_t c = threadIdx.x; c < p.cols; c += blockDim.x) {
    sum += static_cast<double>(x[c]) * static_cast<double>(x[c]);
  }
  sum = BlockSum<kRmsNormThreads>(sum);
  const float mean = static_cast<float>(sum / static_cast<double>(p.cols));
  const float scale = 1.f / sqrtf(mean + p.eps);
  // Same rounding order as Hugging Face and the CPU kernel: (x * rsqrt) * weight.
  for (int64_t c = threadIdx.x; c < p.cols; c += blockDim.x) out[c] = (x[c] * scale) * p.weight[c];
}

__global__ void SiluMulKernel(SiluMulParams p) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < p.n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float g = p.gate[i];
    p.out[i] = g / (1.f + expf(-g)) * p.up[i];
  }
}

__device__ void RotateHalf(float* x, int heads, int head_dim, const float* cos, const float* sin) {
  const int half = head_dim / 2;
  for (int i = threadIdx.x; i < heads * half; i += blockDim.x) {
    float* h = x + (i / half) * head_dim;
    const int j = i % half;
    const float x1 = h[j];
    const float x2 = h[j + half];
    h[j] = x1 * cos[j] - x2 * sin[j];
    h[j + half] = x2 * cos[j] + x1 * sin[j];
  }
}

__global__ void RopeKernel(RopeParams p) {
  const int64_t t = blockIdx.x;
  const int half = p.head_dim / 2;
  const int64_t pos = p.positions[t];
  const float* cos = p.cos + pos * half;
  const float* sin = p.sin + pos * half;
  if (p.q != nullptr) {
    RotateHalf(p.q + t * p.num_q_heads * p.head_dim, p.num_q_heads, p.head_dim, cos, sin);
  }
  if (p.k != nullptr) {
    RotateHalf(p.k + t * p.num_kv_heads * p.head_dim, p.num_kv_heads, p.head_dim, cos, sin);
  }
}

}  // namespace

absl::Status LaunchRmsNorm(const RmsNormParams& p, cudaStream_t stream) {
  if (p.rows < 0 || p.cols < 0) return absl::InvalidArgumentError("RmsNorm: negative shape");
  if (p.rows == 0 || p.cols == 0) return absl::OkStatus();
  if (!p.x || !p.weight || !p.out) return absl::InvalidArgumentError("RmsNorm: null pointer");
  if (p.rows > kMaxGridX) return absl::InvalidArgumentError("RmsNorm: too many rows");
  RmsNormKernel<<<static_cast<unsigned>(p.rows), kRmsNormThreads, 0, stream>>>(p);
  JOULE_CUDA_RETURN_IF_LAUNCH_FAILED("RmsNormKernel");
  return absl::OkStatus();
}

absl::Status LaunchSiluMul(const SiluMulParams& p, cudaStream_t stream) {
  if (p.n < 0) return absl::InvalidArgumentError("SiluMul: negative n");
  if (p.n == 0) return absl::OkStatus();
  if (!p.gate || !p.up || !p.out) return absl::InvalidArgumentError("SiluMul: null pointer");
  SiluMulKernel<<<GridStrideBlocks(p.n, 256), 256, 0, stream>>>(p);
  JOULE_CUDA_RETURN_IF_LAUNCH_FAILED("SiluMulKernel");
  return absl::OkStatus();
}

absl::Status LaunchRope(const RopeParams& p, cudaStream_t stream) {
  if (p.tokens < 0) return absl::InvalidArgumentError("Rope: negative tokens");
  if (p.tokens == 0) return absl::OkStatus();
  if (p.head_dim <= 0 || p.head_dim % 2 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("Rope: head_dim must be positive and even, got ", p.head_dim));
  }
  if (!p.positions || !p.cos || !p.sin) {
    return absl::InvalidArgumentError("Rope: null pointer");
  }
  if (p.tokens > kMaxGridX) return absl::InvalidArgumentError("Rope: too many tokens");
  RopeKernel<<<static_cast<unsigned>(p.tokens), 128, 0, stream>>>(p);
  JOULE_CUDA_RETURN_IF_LAUNCH_FAILED("RopeKernel");
  return absl::OkStatus();
}

}  // namespace joule::kernels::cuda
