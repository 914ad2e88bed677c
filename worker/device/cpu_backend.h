// The CPU backend: kernels/cpu on a thread pool, host memory for every
// MemoryKind, F32 KV cache, weights used as stored. Launches run to
// completion before they return, so copies are plain memcpy and
// Synchronize() has nothing to wait for.
#pragma once

#include <memory>

#include "kernels/cpu/thread_pool.h"
#include "worker/device/backend.h"

namespace joule::device {

class CpuBackend final : public Backend {
 public:
  // Owns a pool of num_threads threads (0: every usable core).
  explicit CpuBackend(int num_threads);
  // Runs on `stream`'s pool (not owned; null: single-threaded).
  explicit CpuBackend(kernels::cpu::CpuStream stream);

  const DeviceSpec& spec() const override { return spec_; }
  std::string Describe() const override;
  bool device_memory_is_host() const override { return true; }
  kernels::DType kv_cache_type() const override { return kernels::DType::kF32; }
  kernels::DType weight_type(kernels::DType stored) const override { return stored; }
  kernels::cpu::CpuStream host_stream() override { return stream_; }

  absl::StatusOr<Buffer> Allocate(MemoryKind kind, size_t bytes) override;
  absl::Status CopyAsync(void* dst, const void* src, size_t bytes) override;
  absl::Status Zero(void* dst, size_t bytes) override;
  absl::Status Synchronize() override { return absl::OkStatus(); }
  absl::StatusOr<MemoryInfo> DeviceMemory() override;

  size_t GemmWorkspaceBytes(int64_t, int64_t) const override { return 0; }
  size_t AttentionWorkspaceBytes(int64_t, int, int, int64_t) const override { return 0; }

  absl::Status Gemm(const kernels::GemmParams& p) override;
  absl::Status GroupedGemm(const kernels::GroupedGemmParams& p) override;
  absl::Status RmsNorm(const kernels::RmsNormParams& p) override;
  absl::Status SiluMul(const kernels::SiluMulParams& p) override;
  absl::Status Rope(const kernels::RopeParams& p) override;
  absl::Status Embedding(const kernels::EmbeddingParams& p) override;
  absl::Status Add(const kernels::AddParams& p) override;
  absl::Status GatedAdd(const kernels::GatedAddParams& p) override;
  absl::Status KvCacheWrite(const kernels::KvCacheWriteParams& p) override;
  absl::Status PagedAttention(const kernels::PagedAttentionParams& p) override;
  absl::Status RouterTopK(const kernels::RouterTopKParams& p) override;
  absl::Status MoeLayout(const kernels::MoeLayoutParams& p) override;
  absl::Status ExpertLoad(const kernels::ExpertLoadParams& p) override;
  absl::Status Unpermute(const kernels::UnpermuteParams& p) override;
  absl::Status GatherRows(const kernels::GatherRowsParams& p) override;
  absl::Status ReduceRows(const kernels::ReduceRowsParams& p) override;
  absl::Status Sample(const kernels::SampleParams& p) override;

 private:
  kernels::cpu::CpuStream stream() { return stream_; }
  const DeviceSpec spec_;
  std::unique_ptr<kernels::cpu::ThreadPool> pool_;  // when owned
  kernels::cpu::CpuStream stream_;
};

}  // namespace joule::device
