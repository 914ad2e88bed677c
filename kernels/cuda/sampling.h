// Next-token sampling on CUDA (SampleParams and its semantics:
// kernels/params/sampling.h), one block per row: the logits of rows the
// device samples never leave the GPU, only their token ids do.
#pragma once

#include <cuda_runtime_api.h>

#include "absl/status/status.h"
#include "kernels/params/sampling.h"

namespace joule::kernels::cuda {

using ::joule::kernels::SampleParams;

absl::Status LaunchSample(const SampleParams& p, cudaStream_t stream);

}  // namespace joule::kernels::cuda
