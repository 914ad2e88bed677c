// cuBLASLt dense GEMM: round x to BF16, one cublasLtMatmul, then the bias.
//
// Row-major as transposed column-major. cuBLASLt is column-major, and a
// row-major [r, c] matrix with row stride ld is, read column-major, a
// [c, r] matrix with leading dimension ld: its transpose. So the product is
// computed transposed, y^T = W x^T:
//   A = W as stored: column-major [k, n], ld k, BF16, TRANSA = T -> op(A) is [n, k];
//   B = the BF16 copy of x: column-major [k, m], ld PackedLd(k), TRANSB = N;
//   C = D = y: column-major [n, m], ld ldy, F32;
//   op(A) op(B) = W x^T = (x W^T)^T = y^T, D = alpha op(A) op(B) + beta C.
// Rows n..ldy-1 of that column-major D (y's padding columns) lie outside the
// [n, m] matrix, so cuBLASLt leaves them alone.
//
// The bias is added by a small kernel after the matmul rather than through
// a cuBLASLt bias epilogue: simpler, and certain for every shape and beta
// (epilogue support varies by algorithm and layout).
#include "kernels/cuda/blas.h"

#include <cublasLt.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/elementwise.h"
#include "kernels/cuda/moe.h"

namespace joule::kernels::cuda {
namespace {

// Elements between rows of the BF16 copy of x: k rounded up to 8, so each
// row starts 16-byte aligned. The padding is never read.
int64_t PackedLd(int64_t k) { return (k + 7) / 8 * 8; }

// The largest power of two dividing the address, up to cuBLASLt's default
// assumption of 256.
uint32_t Alignment(const void* ptr) {
  const uintptr_t address = reinterpret_cast<uintptr_t>(ptr);
  uint32_t align = 256;
  while (align > 1 && address % align != 0) align /= 2;
  return align;
}

struct DescDeleter {
  void operator()(cublasLtMatmulDesc_t desc) const { cublasLtMatmulDescDestroy(desc); }
};
struct LayoutDeleter {
  void operator()(cublasLtMatrixLayout_t layout) const { cublasLtMatrixLayoutDestroy(layout); }
};
struct PreferenceDeleter {
  void operator()(cublasLtMatmulPreference_t pref) const { cublasLtMatmulPreferenceDestroy(pref); }
};
using DescPtr = std::unique_ptr<std::remove_pointer_t<cublasLtMatmulDesc_t>, DescDeleter>;
using LayoutPtr = std::unique_ptr<std::remove_pointer_t<cublasLtMatrixLayout_t>, LayoutDeleter>;
using PreferencePtr =
    std::unique_ptr<std::remove_pointer_t<cublasLtMatmulPreference_t>, PreferenceDeleter>;

// What the algorithm choice depends on. ldx is not part of it: x reaches
// cuBLASLt only as the packed BF16 copy. Alignments are, because the
// heuristic offers only algorithms whose loads the pointers can take.
struct PlanKey {
  int64_t m, n, k, ldy;
  bool accumulate;
  uint32_t align_w, align_x, align_y;

  bool operator==(const PlanKey& o) const {
    return m == o.m && n == o.n && k == o.k && ldy == o.ldy && accumulate == o.accumulate &&
           align_w == o.align_w && align_x == o.align_x && align_y == o.align_y;
  }
  template <typename H>
  friend H AbslHashValue(H h, const PlanKey& key) {
    return H::combine(std::move(h), key.m, key.n, key.k, key.ldy, key.accumulate, key.align_w,
                      key.align_x, key.align_y);
  }
};

std::string ShapeName(const PlanKey& key) {
  return absl::StrCat("m=", key.m, " n=", key.n, " k=", key.k, " ldy=", key.ldy,
                      " accumulate=", key.accumulate, " (alignment of w ", key.align_w, ", x ",
                      key.align_x, ", y ", key.align_y, " bytes)");
}

struct Plan {
  DescPtr matmul;
  LayoutPtr w;  // A
  LayoutPtr x;  // B
  LayoutPtr y;  // C and D
  cublasLtMatmulAlgo_t algo;
};

absl::Status MakeLayout(cudaDataType type, int64_t rows, int64_t cols, int64_t ld,
                        LayoutPtr* layout) {
  cublasLtMatrixLayout_t raw = nullptr;
  JOULE_CUBLAS_RETURN_IF_ERROR(cublasLtMatrixLayoutCreate(&raw, type, static_cast<uint64_t>(rows),
                                                          static_cast<uint64_t>(cols), ld));
  layout->reset(raw);
  return absl::OkStatus();
}

template <typename T>
absl::Status SetPreference(cublasLtMatmulPreference_t pref,
                           cublasLtMatmulPreferenceAttributes_t attr, T value) {
  JOULE_CUBLAS_RETURN_IF_ERROR(
      cublasLtMatmulPreferenceSetAttribute(pref, attr, &value, sizeof(value)));
  return absl::OkStatus();
}

// Descriptors for the mapping at the top of this file, and the heuristic's
// first (fastest estimated) algorithm.
absl::StatusOr<std::unique_ptr<Plan>> MakePlan(cublasLtHandle_t handle, const PlanKey& key,
                                               size_t library_workspace_bytes) {
  auto plan = std::make_unique<Plan>();
  cublasLtMatmulDesc_t desc = nullptr;
  JOULE_CUBLAS_RETURN_IF_ERROR(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  plan->matmul.reset(desc);
  const int32_t transpose = CUBLAS_OP_T;
  const int32_t no_transpose = CUBLAS_OP_N;
  JOULE_CUBLAS_RETURN_IF_ERROR(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA,
                                                              &transpose, sizeof(transpose)));
  JOULE_CUBLAS_RETURN_IF_ERROR(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB,
                                                              &no_transpose, sizeof(no_transpose)));
  if (absl::Status s = MakeLayout(CUDA_R_16BF, key.k, key.n, key.k, &plan->w); !s.ok()) return s;
  if (absl::Status s = MakeLayout(CUDA_R_16BF, key.k, key.m, PackedLd(key.k), &plan->x); !s.ok()) {
    return s;
  }
  if (absl::Status s = MakeLayout(CUDA_R_32F, key.n, key.m, key.ldy, &plan->y); !s.ok()) return s;

  cublasLtMatmulPreference_t raw_pref = nullptr;
  JOULE_CUBLAS_RETURN_IF_ERROR(cublasLtMatmulPreferenceCreate(&raw_pref));
  PreferencePtr pref(raw_pref);
  const std::pair<cublasLtMatmulPreferenceAttributes_t, uint32_t> alignments[] = {
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, key.align_w},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, key.align_x},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, key.align_y},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, key.align_y},
  };
  for (const auto& [attr, bytes] : alignments) {
    if (absl::Status s = SetPreference(raw_pref, attr, bytes); !s.ok()) return s;
  }
  if (absl::Status s = SetPreference(raw_pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                     static_cast<uint64_t>(library_workspace_bytes));
      !s.ok()) {
    return s;
  }

  cublasLtMatmulHeuristicResult_t result = {};
  int found = 0;
  const cublasStatus_t status =
      cublasLtMatmulAlgoGetHeuristic(handle, desc, plan->w.get(), plan->x.get(), plan->y.get(),
                                     plan->y.get(), raw_pref, 1, &result, &found);
  if (status == CUBLAS_STATUS_NOT_SUPPORTED || (status == CUBLAS_STATUS_SUCCESS && found == 0)) {
    return absl::UnimplementedError(
        absl::StrCat("LtGemm: cuBLASLt has no algorithm for ", ShapeName(key)));
  }
  JOULE_CUBLAS_RETURN_IF_ERROR(status);
  JOULE_CUBLAS_RETURN_IF_ERROR(result.state);
  plan->algo = result.algo;
  return plan;
}

// x rounded to BF16 (nearest even) into the packed copy cuBLASLt reads as B.
absl::Status RoundXToBf16(const GemmParams& p, int64_t ldx, cudaStream_t stream) {
  GatherRowsParams round_x;
  round_x.in = p.x;
  round_x.in_type = RowType::kF32;
  round_x.in_stride_bytes = ldx * static_cast<int64_t>(sizeof(float));
  round_x.out = p.workspace;
  round_x.out_type = RowType::kBF16;
  round_x.out_stride_bytes = PackedLd(p.k) * static_cast<int64_t>(sizeof(uint16_t));
  round_x.rows = p.m;
  round_x.hidden = p.k;
  return LaunchGatherRows(round_x, stream);
}

absl::Status AddBias(const GemmParams& p, int64_t ldy, cudaStream_t stream) {
  BiasAddParams bias;
  bias.y = p.y;
  bias.bias = p.bias;
  bias.rows = p.m;
  bias.cols = p.n;
  bias.ldy = ldy;
  return LaunchBiasAdd(bias, stream);
}

absl::Status CheckAligned(const char* field, const void* ptr, size_t bytes) {
  if (reinterpret_cast<uintptr_t>(ptr) % bytes == 0) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat("LtGemm: ", field, " must be ", bytes, "-byte aligned"));
}

}  // namespace

struct LtGemm::PlanCache {
  absl::StatusOr<const Plan*> Get(cublasLtHandle_t handle, const PlanKey& key,
                                  size_t library_workspace_bytes) {
    auto it = plans.find(key);
    if (it == plans.end()) {
      if (auto no = unsupported.find(key); no != unsupported.end()) return no->second;
      absl::StatusOr<std::unique_ptr<Plan>> made = MakePlan(handle, key, library_workspace_bytes);
      // "No algorithm" is the same answer next time (the caller falls back
      // for every step of that shape): asked once. Other errors: asked again.
      if (absl::IsUnimplemented(made.status())) unsupported.emplace(key, made.status());
      if (!made.ok()) return made.status();
      it = plans.emplace(key, *std::move(made)).first;
    }
    return it->second.get();
  }

  absl::flat_hash_map<PlanKey, std::unique_ptr<Plan>> plans;
  absl::flat_hash_map<PlanKey, absl::Status> unsupported;  // shapes cuBLASLt has no algorithm for
};

size_t LtGemmWorkspaceBytes(int64_t m, int64_t k) {
  if (m <= 0 || k <= 0) return 0;
  return static_cast<size_t>(m) * static_cast<size_t>(PackedLd(k)) * sizeof(uint16_t);
}

absl::Status ValidateLtGemmParams(const GemmParams& p) {
  if (p.w_type != WeightType::kBF16) {
    return absl::InvalidArgumentError(absl::StrCat(
        "LtGemm: w_type must be bf16 (f32 and f8_e4m3 weights take kernels::cuda::LaunchGemm), got ",
        DTypeName(p.w_type)));
  }
  if (p.m < 0 || p.n < 0 || p.k < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("LtGemm: m, n and k must be >= 0, got m=", p.m, " n=", p.n, " k=", p.k));
  }
  if (p.batch != 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "LtGemm: batch must be 1 (CudaBackend::Gemm runs a batch's members one by one), got ",
        p.batch));
  }
  const int64_t ldx = p.ldx == 0 ? p.k : p.ldx;
  const int64_t ldy = p.ldy == 0 ? p.n : p.ldy;
  if (ldx < p.k) {
    return absl::InvalidArgumentError(absl::StrCat("LtGemm: ldx=", ldx, " is less than k=", p.k));
  }
  if (ldy < p.n) {
    return absl::InvalidArgumentError(absl::StrCat("LtGemm: ldy=", ldy, " is less than n=", p.n));
  }
  if (p.m == 0 || p.n == 0) return absl::OkStatus();  // nothing is read or written
  if (!p.y) return absl::InvalidArgumentError("LtGemm: y is null");
  if (absl::Status s = CheckAligned("y", p.y, sizeof(float)); !s.ok()) return s;
  if (p.bias != nullptr) {
    if (absl::Status s = CheckAligned("bias", p.bias, sizeof(float)); !s.ok()) return s;
  }
  if (p.k == 0) return absl::OkStatus();  // x, w and workspace are not read
  if (!p.x) return absl::InvalidArgumentError("LtGemm: x is null");
  if (!p.w) return absl::InvalidArgumentError("LtGemm: w is null");
  if (!p.workspace) {
    return absl::InvalidArgumentError(absl::StrCat(
        "LtGemm: workspace is null (needs LtGemmWorkspaceBytes(m, k) = ",
        LtGemmWorkspaceBytes(p.m, p.k), " bytes)"));
  }
  if (absl::Status s = CheckAligned("x", p.x, sizeof(float)); !s.ok()) return s;
  if (absl::Status s = CheckAligned("w", p.w, sizeof(uint16_t)); !s.ok()) return s;
  return CheckAligned("workspace", p.workspace, sizeof(uint16_t));
}

absl::StatusOr<std::unique_ptr<LtGemm>> LtGemm::Create(size_t library_workspace_bytes) {
  if (absl::Status s = CheckDeviceAvailable(); !s.ok()) return s;
  cublasLtHandle_t handle = nullptr;
  JOULE_CUBLAS_RETURN_IF_ERROR(cublasLtCreate(&handle));
  std::unique_ptr<LtGemm> gemm(new LtGemm(handle));
  if (library_workspace_bytes > 0) {
    JOULE_CUDA_RETURN_IF_ERROR(cudaMalloc(&gemm->library_workspace_, library_workspace_bytes));
    gemm->library_workspace_bytes_ = library_workspace_bytes;
  }
  return gemm;
}

LtGemm::LtGemm(cublasLtHandle_t handle)
    : handle_(handle), plans_(std::make_unique<PlanCache>()) {}

LtGemm::~LtGemm() {
  plans_.reset();
  cudaFree(library_workspace_);
  cublasLtDestroy(handle_);
}

size_t LtGemm::cached_plans() const { return plans_->plans.size(); }

absl::Status LtGemm::Run(const GemmParams& p, cudaStream_t stream) {
  if (absl::Status s = ValidateLtGemmParams(p); !s.ok()) return s;
  if (p.m == 0 || p.n == 0) return absl::OkStatus();
  const int64_t ldx = p.ldx == 0 ? p.k : p.ldx;
  const int64_t ldy = p.ldy == 0 ? p.n : p.ldy;

  if (p.k == 0) {
    // An empty sum (cuBLASLt wants k >= 1): y = 0, or y unchanged, then the bias.
    if (!p.accumulate) {
      JOULE_CUDA_RETURN_IF_ERROR(cudaMemset2DAsync(p.y, ldy * sizeof(float), 0,
                                                   p.n * sizeof(float), p.m, stream));
    }
  } else {
    if (absl::Status s = RoundXToBf16(p, ldx, stream); !s.ok()) return s;
    const PlanKey key{p.m, p.n, p.k, ldy, p.accumulate,
                      Alignment(p.w), Alignment(p.workspace), Alignment(p.y)};
    absl::StatusOr<const Plan*> plan = plans_->Get(handle_, key, library_workspace_bytes_);
    if (!plan.ok()) return plan.status();
    const float alpha = 1.f;
    const float beta = p.accumulate ? 1.f : 0.f;
    JOULE_CUBLAS_RETURN_IF_ERROR(cublasLtMatmul(
        handle_, (*plan)->matmul.get(), &alpha, p.w, (*plan)->w.get(), p.workspace,
        (*plan)->x.get(), &beta, p.y, (*plan)->y.get(), p.y, (*plan)->y.get(), &(*plan)->algo,
        library_workspace_, library_workspace_bytes_, stream));
  }
  return p.bias != nullptr ? AddBias(p, ldy, stream) : absl::OkStatus();
}

}  // namespace joule::kernels::cuda
