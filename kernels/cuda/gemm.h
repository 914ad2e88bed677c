// Dense GEMM with BF16 or F32 weights and F32 activations on CUDA.
//
// GemmParams and WeightType (layout and semantics) are in kernels/params/gemm.h,
// shared with kernels/cpu/gemm.h, so results match the CPU kernel up to
// summation order. Every pointer is device memory.
#pragma once

#include <cuda_runtime_api.h>

#include "absl/status/status.h"
#include "kernels/params/gemm.h"

namespace joule::kernels::cuda {

using ::joule::kernels::GemmParams;
using ::joule::kernels::WeightType;

absl::Status LaunchGemm(const GemmParams& p, cudaStream_t stream);

}  // namespace joule::kernels::cuda
