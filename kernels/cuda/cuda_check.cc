#include "kernels/cuda/cuda_check.h"

#include <string>

#include "absl/strings/str_cat.h"

namespace joule::kernels::cuda {
namespace {

absl::Status Failed(absl::StatusCode code, const char* call, const char* file, int line,
                    const char* name, const char* description) {
  return absl::Status(code, absl::StrCat(call, " failed at ", file, ":", line, ": ", name, ": ",
                                         description));
}

}  // namespace

absl::Status CudaErrorToStatus(cudaError_t err, const char* call, const char* file, int line) {
  if (err == cudaSuccess) return absl::OkStatus();
  absl::StatusCode code = err == cudaErrorMemoryAllocation ? absl::StatusCode::kResourceExhausted
                                                           : absl::StatusCode::kInternal;
  return Failed(code, call, file, line, cudaGetErrorName(err), cudaGetErrorString(err));
}

absl::Status CublasErrorToStatus(cublasStatus_t err, const char* call, const char* file,
                                 int line) {
  if (err == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  absl::StatusCode code = err == CUBLAS_STATUS_ALLOC_FAILED ? absl::StatusCode::kResourceExhausted
                                                            : absl::StatusCode::kInternal;
  return Failed(code, call, file, line, cublasGetStatusName(err), cublasGetStatusString(err));
}

#if defined(JOULE_HAVE_NCCL)
absl::Status NcclErrorToStatus(ncclResult_t err, const char* call, const char* file, int line) {
  if (err == ncclSuccess) return absl::OkStatus();
  absl::StatusCode code = absl::StatusCode::kInternal;
  const char* name = "ncclError";
  switch (err) {
    case ncclUnhandledCudaError: name = "ncclUnhandledCudaError"; break;
    case ncclSystemError: name = "ncclSystemError"; break;
    case ncclInternalError: name = "ncclInternalError"; break;
    case ncclInvalidArgument: name = "ncclInvalidArgument"; break;
    case ncclInvalidUsage: name = "ncclInvalidUsage"; break;
    case ncclRemoteError: name = "ncclRemoteError"; break;
    case ncclInProgress:
      name = "ncclInProgress";
      code = absl::StatusCode::kUnavailable;
      break;
    default: break;
  }
  return Failed(code, call, file, line, name, ncclGetErrorString(err));
}
#endif

int DeviceCount() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // the probe's error is not the caller's
    return 0;
  }
  return count;
}

absl::Status CheckDeviceAvailable() {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return absl::FailedPreconditionError(
        absl::StrCat("no CUDA device: ", cudaGetErrorString(err)));
  }
  if (count == 0) {
    return absl::FailedPreconditionError("no CUDA device: cudaGetDeviceCount found 0 devices");
  }
  return absl::OkStatus();
}

}  // namespace joule::kernels::cuda
