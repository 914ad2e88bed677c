// CUDA, cuBLAS and NCCL results as absl::Status, with the failing call and its
// call site: JOULE_CUDA_RETURN_IF_ERROR(cudaMalloc(&p, n)) returns
//   Internal "cudaMalloc(&p, n) failed at kernels/cuda/x.cc:42: cudaErrorInvalidValue: invalid argument"
// Out-of-memory results map to ResourceExhausted so callers can shed load
// instead of treating them as bugs.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include "absl/status/status.h"

#if defined(JOULE_HAVE_NCCL)
#include <nccl.h>
#endif

namespace joule::kernels::cuda {

absl::Status CudaErrorToStatus(cudaError_t err, const char* call, const char* file, int line);
absl::Status CublasErrorToStatus(cublasStatus_t err, const char* call, const char* file, int line);
#if defined(JOULE_HAVE_NCCL)
// ncclInProgress (nonblocking communicators) is not success: it becomes
// Unavailable, and a caller that polls must check for it before this macro.
absl::Status NcclErrorToStatus(ncclResult_t err, const char* call, const char* file, int line);
#endif

// Number of visible CUDA devices; 0 (not an error) when there is no driver or
// no GPU. Resets the runtime's last error after a failed probe (without a
// driver every runtime call keeps failing with cudaErrorInsufficientDriver).
int DeviceCount();

// OK when at least one device is usable, otherwise FailedPrecondition
// "no CUDA device: <cudaGetErrorString>" (the reason tests print when they skip).
absl::Status CheckDeviceAvailable();

}  // namespace joule::kernels::cuda

#define JOULE_CUDA_RETURN_IF_ERROR(expr)                                                      \
  do {                                                                                        \
    const cudaError_t joule_cuda_err_ = (expr);                                               \
    if (joule_cuda_err_ != cudaSuccess) {                                                     \
      return ::joule::kernels::cuda::CudaErrorToStatus(joule_cuda_err_, #expr, __FILE__,      \
                                                       __LINE__);                             \
    }                                                                                         \
  } while (0)

#define JOULE_CUBLAS_RETURN_IF_ERROR(expr)                                                    \
  do {                                                                                        \
    const cublasStatus_t joule_cublas_err_ = (expr);                                          \
    if (joule_cublas_err_ != CUBLAS_STATUS_SUCCESS) {                                         \
      return ::joule::kernels::cuda::CublasErrorToStatus(joule_cublas_err_, #expr, __FILE__,  \
                                                         __LINE__);                           \
    }                                                                                         \
  } while (0)

#define JOULE_NCCL_RETURN_IF_ERROR(expr)                                                      \
  do {                                                                                        \
    const ncclResult_t joule_nccl_err_ = (expr);                                              \
    if (joule_nccl_err_ != ncclSuccess) {                                                     \
      return ::joule::kernels::cuda::NcclErrorToStatus(joule_nccl_err_, #expr, __FILE__,      \
                                                       __LINE__);                             \
    }                                                                                         \
  } while (0)

// After a <<<...>>> launch, with a string literal naming the kernel: reports
// bad launch configurations right away (asynchronous faults surface at the
// next synchronizing call).
#define JOULE_CUDA_RETURN_IF_LAUNCH_FAILED(kernel_name)                                       \
  do {                                                                                        \
    const cudaError_t joule_cuda_err_ = cudaGetLastError();                                   \
    if (joule_cuda_err_ != cudaSuccess) {                                                     \
      return ::joule::kernels::cuda::CudaErrorToStatus(joule_cuda_err_,                       \
                                                       "launch of " kernel_name, __FILE__,    \
                                                       __LINE__);                             \
    }                                                                                         \
  } while (0)
