// What a batched GemmParams may hold (kernels/params/gemm.h), as plain C++
// built with or without CUDA: the CPU backend, the fake device and the CUDA
// launches all check with it, so a call the GPU would refuse fails in CI too.
#pragma once

#include "absl/status/status.h"
#include "kernels/params/gemm.h"

namespace joule::kernels::cuda {

// One CUDA launch covers the batch in its grid's z dimension.
inline constexpr int64_t kMaxGemmBatch = 65535;

// batch in [1, kMaxGemmBatch], strides not negative, FP8 weights only
// unbatched, and members whose outputs cannot overlap (side by side in each
// row of y, or one after another). `kernel` names the launch in the message.
absl::Status ValidateGemmBatch(const char* kernel, const GemmParams& p);

}  // namespace joule::kernels::cuda
