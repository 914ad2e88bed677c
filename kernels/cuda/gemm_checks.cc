#include "kernels/cuda/gemm_checks.h"

#include "absl/strings/str_cat.h"

namespace joule::kernels::cuda {

namespace {

// Members run in parallel (the CUDA grid's z, the CPU's work items), so two
// writing one element would race. Accepted: the two layouts that cannot
// overlap, members side by side in each row (MLA's heads) or one after another.
absl::Status ValidateDisjointOutputs(const char* kernel, const GemmParams& p) {
  if (p.batch == 1 || p.m == 0 || p.n == 0) return absl::OkStatus();
  const int64_t ldy = p.ldy == 0 ? p.n : p.ldy;
  const int64_t ys = p.y_batch_stride;
  const bool side_by_side = ys >= p.n && (p.m == 1 || (p.batch - 1) * ys + p.n <= ldy);
  const bool one_after_another = ys >= (p.m - 1) * ldy + p.n;
  if (side_by_side || one_after_another) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(
      kernel, ": the batch members' outputs overlap (y_batch_stride=", ys, ", batch=", p.batch,
      ", m=", p.m, ", n=", p.n, ", ldy=", ldy,
      "): members must sit side by side in a row ((batch - 1) * y_batch_stride + n <= ldy) or "
      "one after another (y_batch_stride >= (m - 1) * ldy + n)"));
}

}  // namespace

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
  return ValidateDisjointOutputs(kernel, p);
}

}  // namespace joule::kernels::cuda
