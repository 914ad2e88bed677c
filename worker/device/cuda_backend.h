// The CUDA backend (cuda_backend.cc; without CUDA, cuda_backend_stub.cc):
// kernels/cuda on one stream of one GPU, cuBLASLt for dense GEMMs, BF16
// weights and KV cache, CUDA graphs.
#pragma once

#include <memory>

#include "absl/status/statusor.h"
#include "worker/device/backend.h"

namespace joule::device {

// FailedPrecondition naming the reason when the GPU cannot be used: a build
// without CUDA, no driver, no device, or an ordinal past the last device.
absl::StatusOr<std::unique_ptr<Backend>> CreateCudaBackend(int ordinal, const BackendOptions& options);

}  // namespace joule::device
