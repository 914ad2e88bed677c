#include "worker/device/cpu_backend.h"

#include <unistd.h>

#include <cstdlib>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "kernels/cpu/attention.h"
#include "kernels/cpu/cpu_isa.h"
#include "kernels/cpu/elementwise.h"
#include "kernels/cpu/gemm.h"
#include "kernels/cpu/moe.h"
#include "kernels/cpu/sampling.h"
#include "kernels/cuda/gemm_checks.h"

namespace joule::device {

namespace kc = kernels::cpu;
using kernels::DType;

namespace {

constexpr size_t kHostAlignment = 64;  // a cache line; AVX-512 rows

void FreeHost(void* data, MemoryKind) { std::free(data); }

absl::Status F32Only(const char* op, const char* field, DType type) {
  if (type == DType::kF32) return absl::OkStatus();
  return absl::UnimplementedError(absl::StrCat(op, ": the CPU backend keeps ", field,
                                               " in f32, got ", kernels::DTypeName(type)));
}

// FP8 weights need their block scales and a block geometry.
absl::Status CheckFp8(const char* op, kernels::DType w_type, bool has_scales,
                      const kernels::WeightBlocks& blocks) {
  if (w_type != DType::kF8E4M3) return absl::OkStatus();
  if (!has_scales || blocks.rows <= 0 || blocks.cols <= 0 || blocks.first_row < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        op, ": f8_e4m3 weights need w_scale_inv and positive block sizes, got ", blocks.rows, "x",
        blocks.cols, has_scales ? "" : " without scales"));
  }
  return absl::OkStatus();
}

}  // namespace

CpuBackend::CpuBackend(int num_threads)
    : spec_{}, pool_(std::make_unique<kc::ThreadPool>(num_threads)), stream_{pool_.get()} {}

CpuBackend::CpuBackend(kc::CpuStream stream) : spec_{}, stream_(stream) {}

std::string CpuBackend::Describe() const {
  const int threads = stream_.pool != nullptr ? stream_.pool->num_threads() : 1;
  return absl::StrCat("cpu (", threads, " threads, ", kc::IsaName(kc::ActiveIsa()), ")");
}

absl::StatusOr<Buffer> CpuBackend::Allocate(MemoryKind kind, size_t bytes) {
  const size_t rounded = (std::max<size_t>(bytes, 1) + kHostAlignment - 1) / kHostAlignment * kHostAlignment;
  void* data = std::aligned_alloc(kHostAlignment, rounded);
  if (data == nullptr) {
    return absl::ResourceExhaustedError(
        absl::StrCat("cannot allocate ", bytes, " bytes of ", std::string(MemoryKindName(kind)),
                     " memory"));
  }
  std::memset(data, 0, rounded);  // zero-filled, and resident before the hot path
  return Buffer(data, bytes, kind, &FreeHost);
}

absl::Status CpuBackend::CopyAsync(void* dst, const void* src, size_t bytes) {
  if (bytes > 0 && dst != src) std::memmove(dst, src, bytes);
  return absl::OkStatus();
}

absl::Status CpuBackend::Zero(void* dst, size_t bytes) {
  if (bytes > 0) std::memset(dst, 0, bytes);
  return absl::OkStatus();
}

absl::StatusOr<MemoryInfo> CpuBackend::DeviceMemory() {
  const int64_t page = sysconf(_SC_PAGESIZE);
  return MemoryInfo{.free_bytes = sysconf(_SC_AVPHYS_PAGES) * page,
                    .total_bytes = sysconf(_SC_PHYS_PAGES) * page};
}

absl::Status CpuBackend::Gemm(const kernels::GemmParams& p) {
  if (absl::Status s = CheckFp8("Gemm", p.w_type, p.w_scale_inv != nullptr, p.w_blocks); !s.ok()) return s;
  if (absl::Status s = kernels::cuda::ValidateGemmBatch("Gemm", p); !s.ok()) return s;
  kc::LaunchGemm(p, stream());
  return absl::OkStatus();
}

absl::Status CpuBackend::GroupedGemm(const kernels::GroupedGemmParams& p) {
  if (absl::Status s = CheckFp8("GroupedGemm", p.w_type, p.w_scale_inv != nullptr, p.w_blocks);
      !s.ok()) {
    return s;
  }
  kc::LaunchGroupedGemm(p, stream());
  return absl::OkStatus();
}

absl::Status CpuBackend::RmsNorm(const kernels::RmsNormParams& p) {
  kc::LaunchRmsNorm(p, stream());
  return absl::OkStatus();
}

absl::Status CpuBackend::SiluMul(const kernels::SiluMulParams& p) {
  kc::LaunchSiluMul(p, stream());
  return absl::OkStatus();
}

absl::Status CpuBackend::Rope(const kernels::RopeParams& p) {
  kc::LaunchRope(p, stream());
  return absl::OkStatus();
}

absl::Status CpuBackend::Embedding(const kernels::EmbeddingParams& p) {
  kc::LaunchEmbedding(p, stream());
  return absl::OkStatus();
}

absl::Status CpuBackend::Add(const kernels::AddParams& p) {
  kc::LaunchAdd(p, stream());
  return absl::OkStatus();
}

absl::Status CpuBackend::GatedAdd(const kernels::GatedAddParams& p) {
  kc::LaunchGatedAdd(p, stream());
  return absl::OkStatus();
}

absl::Status CpuBackend::KvCacheWrite(const kernels::KvCacheWriteParams& p) {
  if (absl::Status s = F32Only("KvCacheWrite", "the KV cache", p.cache_type); !s.ok()) return s;
  kc::LaunchKvCacheWrite(p, stream());
  return absl::OkStatus();
}

absl::Status CpuBackend::PagedAttention(const kernels::PagedAttentionParams& p) {
  if (absl::Status s = F32Only("PagedAttention", "the KV cache", p.cache_type); !s.ok()) return s;
  if (p.v_head_dim < 0 || p.v_head_dim > p.head_dim) {
    return absl::InvalidArgumentError(absl::StrCat("PagedAttention: v_head_dim must be in [0, head_dim ",
                                                   p.head_dim, "], got ", p.v_head_dim));
  }
  kc::LaunchPagedAttention(p, stream());
  return absl::OkStatus();
}

absl::Status CpuBackend::RouterTopK(const kernels::RouterTopKParams& p) {
  if (p.valid_tokens != nullptr) {
    return absl::UnimplementedError("RouterTopK: the CPU backend runs no padded batches (valid_tokens)");
  }
  if (p.method == kernels::RouterMethod::kNoauxTc &&
      (p.selection_bias == nullptr || p.num_groups < 1 || p.num_experts % p.num_groups != 0 ||
       p.num_experts / p.num_groups < 2 || p.topk_groups < 1 || p.topk_groups > p.num_groups ||
       p.top_k > p.topk_groups * (p.num_experts / p.num_groups))) {
    return absl::InvalidArgumentError(absl::StrCat(
        "RouterTopK: noaux_tc needs a selection bias and groups of >= 2 experts holding top_k, got ",
        p.num_experts, " experts in ", p.num_groups, " groups, ", p.topk_groups, " kept, top_k ",
        p.top_k, p.selection_bias == nullptr ? ", no bias" : ""));
  }
  kc::LaunchRouterTopK(p, stream());
  return absl::OkStatus();
}

absl::Status CpuBackend::MoeLayout(const kernels::MoeLayoutParams& p) {
  kc::ComputeMoeLayout(p);
  return absl::OkStatus();
}

absl::Status CpuBackend::ExpertLoad(const kernels::ExpertLoadParams& p) {
  kc::AccumulateExpertLoad(p);
  return absl::OkStatus();
}

absl::Status CpuBackend::Unpermute(const kernels::UnpermuteParams& p) {
  kc::LaunchUnpermute(p, stream());
  return absl::OkStatus();
}

absl::Status CpuBackend::GatherRows(const kernels::GatherRowsParams& p) {
  kc::LaunchGatherRows(p, stream());
  return absl::OkStatus();
}

// Refused as the CUDA launch refuses it, rather than ignored as kernels::cpu does.
absl::Status CpuBackend::ReduceRows(const kernels::ReduceRowsParams& p) {
  if (p.accumulate && p.out_type != kernels::RowType::kF32) {
    return absl::InvalidArgumentError(absl::StrCat(
        "ReduceRows: accumulate needs F32 out, got out_type ", kernels::DTypeName(p.out_type)));
  }
  kc::LaunchReduceRows(p, stream());
  return absl::OkStatus();
}

absl::Status CpuBackend::Sample(const kernels::SampleParams& p) {
  kc::LaunchSample(p, stream());
  return absl::OkStatus();
}

}  // namespace joule::device
