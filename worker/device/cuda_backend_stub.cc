// Built when nvcc was not found: a worker asked for a GPU says why it has none.
#include "absl/strings/str_cat.h"
#include "worker/device/cuda_backend.h"

namespace joule::device {

absl::StatusOr<std::unique_ptr<Backend>> CreateCudaBackend(int ordinal, const BackendOptions&) {
  return absl::FailedPreconditionError(absl::StrCat(
      "--device cuda:", ordinal,
      ": this joule-worker was built without CUDA (nvcc was not found at build time)"));
}

}  // namespace joule::device
