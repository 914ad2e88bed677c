#include "kernels/cuda/gemm_checks.h"

#include "absl/strings/str_cat.h"

namespace joule::kernels::cuda {

absl::Status ValidateGemmBatch(const char* kernel, const GemmParams& p) {
  if (p.batch < 1 || p.batch > kMaxGemmBatch) {
    return absl::InvalidArgumentError(
        absl::StrCat(kernel, ": batch must be in [1, ", kMaxGemmBatch, "], got ", p.batch));
  }
  if (p.x_batch_stride < 0 || p.w_batch_stride < 0 || p.y_batch_stride < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        kernel, ": batch strides must not be negative, got x_batch_stride=", p.x_batch_stride,
        " w_batch_stride=", p.w_batch_stride, " y_batch_stride=", p.y_batch_stride));
  }
  if (p.batch > 1 && p.w_type == WeightType::kF8E4M3) {
    return absl::InvalidArgumentError(absl::StrCat(
        kernel, ": f8_e4m3 weights take batch 1 (their scales have no batch stride), got batch ",
        p.batch));
  }
  return absl::OkStatus();
}

}  // namespace joule::kernels::cuda
