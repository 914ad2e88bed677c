// A test double of a GPU backend that runs on the CPU, for testing the host
// side of the GPU path on machines without one: its device memory is host
// memory the model must still stage into and copy out of
// (device_memory_is_host() is false, so weights are uploaded, metadata staged
// and logits copied back); launches made during a capture are recorded and
// replayed later over whatever the memory then holds, as a CUDA graph does;
// and padded batches are honoured as the CUDA kernels honour them (the
// router's valid_tokens, expert id -1 left out of the layout and the
// un-permute, zero attention for a sequence with no context). The kernels are
// the CPU's, so every row's result has the CPU backend's bits.
#pragma once

#include <functional>
#include <memory>
#include <vector>

#include "worker/device/backend.h"
#include "worker/device/cpu_backend.h"

namespace joule::device {

class FakeDeviceBackend final : public Backend {
 public:
  explicit FakeDeviceBackend(int num_threads) : cpu_(num_threads) {}

  const DeviceSpec& spec() const override { return cpu_.spec(); }
  std::string Describe() const override { return "fake device on " + cpu_.Describe(); }
  bool device_memory_is_host() const override { return false; }
  kernels::DType kv_cache_type() const override { return cpu_.kv_cache_type(); }
  kernels::DType weight_type(kernels::DType stored) const override { return stored; }
  kernels::cpu::CpuStream host_stream() override { return cpu_.host_stream(); }

  absl::StatusOr<Buffer> Allocate(MemoryKind kind, size_t bytes) override;
  absl::Status CopyAsync(void* dst, const void* src, size_t bytes) override;
  absl::Status Zero(void* dst, size_t bytes) override;
  // Fails (from the injected fault on, as a faulted CUDA context does).
  absl::Status Synchronize() override;
  absl::StatusOr<MemoryInfo> DeviceMemory() override { return cpu_.DeviceMemory(); }

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

  bool SupportsGraphs() const override { return true; }
  absl::Status BeginCapture() override;
  absl::StatusOr<std::unique_ptr<Graph>> EndCapture() override;

  // Launches run so far (replays count each recorded launch), and launches
  // recorded into graphs.
  int64_t launches() const { return launches_; }

  // A fault inside a kernel, as a GPU reports it: the `after`-th Synchronize
  // from now (1: the next) and every later one return `fault`.
  void InjectFault(int64_t after, absl::Status fault) {
    syncs_to_fault_ = after;
    fault_ = std::move(fault);
  }
  int64_t recorded() const { return recorded_total_; }

 private:
  using Op = std::function<absl::Status()>;
  // Runs `op` now, or records it while a capture is open.
  absl::Status Launch(Op op);

  CpuBackend cpu_;
  bool capturing_ = false;
  std::vector<Op> recording_;
  int64_t launches_ = 0;
  int64_t syncs_to_fault_ = 0;  // 0: no fault pending
  absl::Status fault_;
  int64_t recorded_total_ = 0;
};

}  // namespace joule::device
