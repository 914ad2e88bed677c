// Dense GEMM with BF16, F32 or block-scaled FP8 (E4M3) weights and F32
// activations on CUDA cores (the SIMT kernel; kernels/cuda/blas.h is the
// cuBLASLt path for BF16 weights). FP8 codes are widened exactly and
// multiplied by their block's F32 scale (GemmParams::w_scale_inv, w_blocks)
// before the F32 FMAs; x is read as F32 or rounded to BF16 (XRounding).
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

// How x reaches the multiply: as given (F32), or rounded to BF16 (nearest
// even) first, as cuBLASLt's path and the grouped GEMM take it; CudaBackend
// asks for kBf16, so every GEMM on a GPU sees BF16 inputs (the numerics the
// reference's --bf16-activations mirrors).
enum class XRounding { kNone, kBf16 };

absl::Status LaunchGemm(const GemmParams& p, cudaStream_t stream,
                        XRounding x_rounding = XRounding::kNone);

}  // namespace joule::kernels::cuda
