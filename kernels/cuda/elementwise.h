// Normalization, activation, rotary-embedding, embedding-lookup and
// residual-add kernels on CUDA (F32).
// The parameter structs (and their semantics) are in kernels/params/elementwise.h,
// shared with kernels/cpu/elementwise.h; every pointer is device memory (RoPE
// cos/sin tables are built with kernels::cpu::BuildRopeTable and copied once).
// Launches are asynchronous on `stream`; the Status reports bad parameters and
// launch failures, not faults inside the kernel.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/status.h"
#include "kernels/params/elementwise.h"

namespace joule::kernels::cuda {

using ::joule::kernels::AddParams;
using ::joule::kernels::DType;
using ::joule::kernels::EmbeddingParams;
using ::joule::kernels::GatedAddParams;
using ::joule::kernels::RmsNormParams;
using ::joule::kernels::RopeParams;
using ::joule::kernels::SiluMulParams;

// Strides (RmsNormParams::stride, RopeParams' q_head_stride, q_out_head_stride
// and k_row_stride) are 0 or at least the packed width (cols, head_dim,
// num_kv_heads * head_dim), so rows and heads never overlap; checked.
absl::Status LaunchRmsNorm(const RmsNormParams& p, cudaStream_t stream);
absl::Status LaunchSiluMul(const SiluMulParams& p, cudaStream_t stream);
absl::Status LaunchRope(const RopeParams& p, cudaStream_t stream);
absl::Status LaunchEmbedding(const EmbeddingParams& p, cudaStream_t stream);
absl::Status LaunchAdd(const AddParams& p, cudaStream_t stream);
absl::Status LaunchGatedAdd(const GatedAddParams& p, cudaStream_t stream);

// y[r, c] += bias[c] for r < rows, c < cols, rows ldy elements apart: the bias
// of a cuBLASLt GEMM (kernels/cuda/blas.h), added after the matmul. CUDA-only
// (the CPU GEMM adds its bias in place), so the struct lives here.
struct BiasAddParams {
  float* y = nullptr;            // [rows, ldy]
  const float* bias = nullptr;   // [cols]
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t ldy = 0;               // 0 means cols
};
absl::Status LaunchBiasAdd(const BiasAddParams& p, cudaStream_t stream);

}  // namespace joule::kernels::cuda
