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
//
// Asynchronous (the second constructor argument), it is a stream as a GPU's
// is: launches and copies run in order on the backend's own thread while the
// caller goes on, so host code that reads results, reuses memory or publishes
// rows to peers before waiting (Synchronize, an Event) sees stale data or
// races, as it would on a GPU. Copies follow
// cudaMemcpyAsync: from host memory the backend did not allocate (pageable)
// the source is taken at the call; into such memory the call waits for the
// stream and copies before it returns; between the backend's own memory
// (device, pinned) it runs in stream order. Freeing a buffer waits for the
// stream first, as cudaFree does. Its copy stream (CreateCopyStream) runs
// copies between its own memory only when synchronized, and never waits for
// the backend's stream.
#pragma once

#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"

#include "worker/device/backend.h"
#include "worker/device/cpu_backend.h"

namespace joule::device {

class FakeDeviceBackend final : public Backend {
 public:
  explicit FakeDeviceBackend(int num_threads, bool asynchronous = false);
  ~FakeDeviceBackend() override;

  const DeviceSpec& spec() const override { return spec_; }
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
  absl::StatusOr<std::unique_ptr<Event>> CreateEvent() override;
  absl::StatusOr<std::unique_ptr<CopyStream>> CreateCopyStream() override;
  // A pretend 1 GiB device, so --gpu-memory-utilization sizes a KV cache
  // the host can hold next to other workers.
  absl::StatusOr<MemoryInfo> DeviceMemory() override {
    return MemoryInfo{.free_bytes = int64_t{1} << 30, .total_bytes = int64_t{1} << 30};
  }

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

  // A fault inside a kernel, as a GPU reports it: the `after`-th wait from
  // now (Synchronize, an event's Wait, a copy stream's Synchronize; 1: the
  // next) and every later one return `fault`.
  void InjectFault(int64_t after, absl::Status fault) {
    syncs_to_fault_ = after;
    fault_ = std::move(fault);
  }
  int64_t recorded() const { return recorded_total_; }

  // Asynchronous only: queues an op that runs until `release` is notified, as
  // a long kernel would; everything queued later waits behind it.
  absl::Status HoldStream(absl::Notification* release);

 private:
  using Op = std::function<absl::Status()>;
  friend class FakeEvent;
  friend class FakeCopyStream;
  friend class FakeGraph;
  // Runs `op` now (queues it when asynchronous), or records it while a
  // capture is open.
  absl::Status Launch(Op op);
  // Replays a graph's ops as one launch, each counted.
  absl::Status LaunchRecorded(std::shared_ptr<const std::vector<Op>> ops);
  // Asynchronous: ops queued so far; waiting until `seq` of them ran; the
  // first failure of a queued op (sticky, as a CUDA context's).
  int64_t Enqueued();
  absl::Status WaitFor(int64_t seq);
  void RunQueue();
  // Counts one wait against an injected fault.
  absl::Status CountWait();
  // A host wait (Synchronize, an event): for `seq` ops, then the fault count.
  absl::Status Wait(int64_t seq);
  // Whether [p, p + bytes) lies in memory this backend allocated.
  bool Owns(const void* p, size_t bytes);
  static void FreeAfterDrain(void* data, MemoryKind kind);

  const DeviceSpec spec_{.kind = DeviceKind::kFake};
  CpuBackend cpu_;
  const bool asynchronous_;
  absl::Mutex mu_;
  absl::CondVar cv_;
  std::deque<Op> queue_ ABSL_GUARDED_BY(mu_);
  int64_t enqueued_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t completed_ ABSL_GUARDED_BY(mu_) = 0;
  absl::Status sticky_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::map<uintptr_t, size_t> owned_ ABSL_GUARDED_BY(mu_);  // start -> bytes
  std::thread thread_;
  bool capturing_ = false;
  std::vector<Op> recording_;
  int64_t launches_ = 0;
  int64_t syncs_to_fault_ = 0;  // 0: no fault pending
  absl::Status fault_;
  int64_t recorded_total_ = 0;
};

}  // namespace joule::device
