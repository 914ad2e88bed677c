// Dense GEMM on tensor cores through cuBLASLt: y = x W^T (+ bias) (+ y) with
// F32 activations, BF16 weights and F32 accumulation (GemmParams,
// kernels/params/gemm.h). x is first rounded to BF16 (nearest even) into the
// caller-owned GemmParams::workspace of LtGemmWorkspaceBytes(m, k) bytes, so
// results match kernels::cpu::LaunchGemm run on BF16-rounded x up to
// summation order. Every pointer is device memory.
//
// Run is asynchronous on `stream` and allocates nothing, so it can be
// captured into a CUDA graph. Run each shape once before capturing: the
// first Run of a shape asks cuBLASLt's heuristic for an algorithm (host-only
// work, cached per shape), and cuBLASLt's kernels load on first use.
#pragma once

#include <cublasLt.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/params/gemm.h"

namespace joule::kernels::cuda {

using ::joule::kernels::GemmParams;
using ::joule::kernels::WeightType;

// Bytes of GemmParams::workspace for a Run over m rows of k inputs: the BF16
// copy of x, its rows padded to a multiple of 8 elements (16 bytes) so that,
// in a 16-byte-aligned workspace, every row starts aligned for the
// tensor-core loads whatever k is.
size_t LtGemmWorkspaceBytes(int64_t m, int64_t k);

// What Run checks before it touches the device (shapes, strides, pointers,
// w_type: BF16 only; F32 and block-scaled FP8 weights take the SIMT kernel,
// kernels/cuda/gemm.h); InvalidArgument naming the field. Needs no GPU.
absl::Status ValidateLtGemmParams(const GemmParams& p);

// One cuBLASLt handle, its workspace and the algorithms chosen so far. Not
// thread-safe: one per stream (a backend owns one).
class LtGemm {
 public:
  // library_workspace_bytes: device memory for cuBLASLt itself (split-K
  // partial sums and the like), allocated here once; 0 limits cuBLASLt to
  // algorithms that need none. FailedPrecondition without a GPU.
  static absl::StatusOr<std::unique_ptr<LtGemm>> Create(size_t library_workspace_bytes);
  ~LtGemm();
  LtGemm(const LtGemm&) = delete;
  LtGemm& operator=(const LtGemm&) = delete;

  absl::Status Run(const GemmParams& p, cudaStream_t stream);

  // Shapes whose algorithm is cached (tests check reuse).
  size_t cached_plans() const;

 private:
  // Descriptors and the chosen algorithm of each shape seen (blas.cc).
  struct PlanCache;

  explicit LtGemm(cublasLtHandle_t handle);

  cublasLtHandle_t handle_;
  void* library_workspace_ = nullptr;
  size_t library_workspace_bytes_ = 0;
  std::unique_ptr<PlanCache> plans_;
};

}  // namespace joule::kernels::cuda
