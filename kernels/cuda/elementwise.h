// Normalization, activation and rotary-embedding kernels on CUDA (F32).
// The parameter structs (and their semantics) are in kernels/params/elementwise.h,
// shared with kernels/cpu/elementwise.h; every pointer is device memory (RoPE
// cos/sin tables are built with kernels::cpu::BuildRopeTable and copied once).
// Launches are asynchronous on `stream`; the Status reports bad parameters and
// launch failures, not faults inside the kernel.
#pragma once

#include <cuda_runtime_api.h>

#include "absl/status/status.h"
#include "kernels/params/elementwise.h"

namespace joule::kernels::cuda {

using ::joule::kernels::RmsNormParams;
using ::joule::kernels::RopeParams;
using ::joule::kernels::SiluMulParams;

absl::Status LaunchRmsNorm(const RmsNormParams& p, cudaStream_t stream);
absl::Status LaunchSiluMul(const SiluMulParams& p, cudaStream_t stream);
absl::Status LaunchRope(const RopeParams& p, cudaStream_t stream);

}  // namespace joule::kernels::cuda
