// The execution seam: everything the model, the engine and the expert
// executors do on a device goes through one Backend, chosen once per worker
// (--device cpu | cuda:N).
//
// A Backend binds three things to one device and one stream (in the manner of
// TensorRT-LLM's BufferManager): allocation of Buffers that know where they
// live, stream-ordered copies, and the launches of kernels/cpu or kernels/cuda
// with the parameter structs of kernels/params — one method per struct.
// Pointers in the structs are device memory of this backend (host memory on
// the CPU). Operations that need temporary memory take a caller-owned
// workspace and answer a size query first, so nothing allocates on the hot
// path and a CUDA graph can replay a step.
//
// Launches are asynchronous on the backend's stream (the CPU's run to
// completion); their Status reports bad parameters and launch failures, while
// faults inside a kernel surface at the next Synchronize().
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/cpu/thread_pool.h"
#include "kernels/params/attention.h"
#include "kernels/params/elementwise.h"
#include "kernels/params/gemm.h"
#include "kernels/params/moe.h"
#include "kernels/params/sampling.h"
#include "kernels/params/types.h"
#include "worker/device/buffer.h"
#include "worker/device/device_spec.h"

namespace joule::device {

struct MemoryInfo {
  int64_t free_bytes = 0;
  int64_t total_bytes = 0;
};

// A point in a backend's stream: everything launched before its last
// Record(). The host can wait for that work alone while later launches run on
// (two micro-batches of one MoE layer: one's exchange waits while the other's
// kernels run). A fault inside that work surfaces at Wait().
class Event {
 public:
  virtual ~Event() = default;
  virtual absl::Status Record() = 0;
  virtual absl::Status Wait() = 0;
};

// A second stream of a backend that only copies. Its work is not ordered
// with the backend's stream, so a staged collective's few copies do not wait
// for the kernels queued there (the other micro-batch of a layer). The host
// orders the two: it waits for the backend's work (an Event) before copying
// what that work wrote, and synchronizes this stream before the backend's
// launches read what it copied. Copies follow Backend::CopyAsync otherwise.
class CopyStream {
 public:
  virtual ~CopyStream() = default;
  virtual absl::Status CopyAsync(void* dst, const void* src, size_t bytes) = 0;
  // Waits for this stream's copies (a fault in the device surfaces here too).
  virtual absl::Status Synchronize() = 0;
};

// A recorded sequence of launches (a CUDA graph) replayed as one.
class Graph {
 public:
  virtual ~Graph() = default;
  virtual absl::Status Launch() = 0;
};

class Backend {
 public:
  virtual ~Backend() = default;

  virtual const DeviceSpec& spec() const = 0;
  // One line for the start-up log: the device, its memory, how it was matched.
  virtual std::string Describe() const = 0;
  // The GPU's PCI bus id as NVML spells it ("00000000:1B:00.0"), so the
  // energy meter reads the GPU this backend computes on; empty on the CPU.
  virtual std::string pci_bus_id() const { return ""; }
  // True when kDevice memory is ordinary host memory (the CPU): results can
  // be written straight where the caller wants them, no staging copies.
  virtual bool device_memory_is_host() const = 0;
  // The element type of the paged KV cache on this device.
  virtual kernels::DType kv_cache_type() const = 0;
  // The type a weight stored as `stored` has on this device (the GPU keeps
  // every matrix in BF16 for its tensor cores, except block-scaled FP8, kept
  // as stored; the CPU uses them as stored).
  virtual kernels::DType weight_type(kernels::DType stored) const = 0;
  // Host work that stays on the CPU (expert-parallel packing, sampling):
  // the CPU backend's thread pool; single-threaded elsewhere.
  virtual kernels::cpu::CpuStream host_stream() = 0;

  // --- memory ---------------------------------------------------------------
  // A zero-filled allocation. ResourceExhausted names the bytes asked for and
  // the bytes free.
  virtual absl::StatusOr<Buffer> Allocate(MemoryKind kind, size_t bytes) = 0;
  // Stream-ordered copy between any two memories of this backend.
  virtual absl::Status CopyAsync(void* dst, const void* src, size_t bytes) = 0;
  // Stream-ordered zero fill of backend memory.
  virtual absl::Status Zero(void* dst, size_t bytes) = 0;
  // Waits for everything launched so far; surfaces faults inside kernels.
  virtual absl::Status Synchronize() = 0;
  // An event of this backend's stream. The default waits by Synchronize()
  // (everything launched so far): right on every backend, and exact where
  // launches run to completion.
  virtual absl::StatusOr<std::unique_ptr<Event>> CreateEvent();
  // A copy stream beside this backend's. The default copies on the backend's
  // own stream (right everywhere; nothing overlaps): the CPU's copies run to
  // completion anyway, the GPU and the fake device give a stream of its own.
  virtual absl::StatusOr<std::unique_ptr<CopyStream>> CreateCopyStream();
  // Device memory free and in total (the CPU reports physical memory).
  virtual absl::StatusOr<MemoryInfo> DeviceMemory() = 0;

  // --- workspace size queries (bytes; 0 when none is needed) ----------------
  // For a Gemm over m rows of k inputs.
  virtual size_t GemmWorkspaceBytes(int64_t m, int64_t k) const = 0;
  // For a PagedAttention over `tokens` query rows whose contexts are at most
  // max_context_len keys long.
  virtual size_t AttentionWorkspaceBytes(int64_t tokens, int num_q_heads, int head_dim,
                                         int64_t max_context_len) const = 0;

  // --- kernels --------------------------------------------------------------
  virtual absl::Status Gemm(const kernels::GemmParams& p) = 0;
  virtual absl::Status GroupedGemm(const kernels::GroupedGemmParams& p) = 0;
  virtual absl::Status RmsNorm(const kernels::RmsNormParams& p) = 0;
  virtual absl::Status SiluMul(const kernels::SiluMulParams& p) = 0;
  virtual absl::Status Rope(const kernels::RopeParams& p) = 0;
  virtual absl::Status Embedding(const kernels::EmbeddingParams& p) = 0;
  virtual absl::Status Add(const kernels::AddParams& p) = 0;
  virtual absl::Status GatedAdd(const kernels::GatedAddParams& p) = 0;
  virtual absl::Status KvCacheWrite(const kernels::KvCacheWriteParams& p) = 0;
  virtual absl::Status PagedAttention(const kernels::PagedAttentionParams& p) = 0;
  virtual absl::Status RouterTopK(const kernels::RouterTopKParams& p) = 0;
  virtual absl::Status MoeLayout(const kernels::MoeLayoutParams& p) = 0;
  virtual absl::Status ExpertLoad(const kernels::ExpertLoadParams& p) = 0;
  virtual absl::Status Unpermute(const kernels::UnpermuteParams& p) = 0;
  virtual absl::Status GatherRows(const kernels::GatherRowsParams& p) = 0;
  // Sums weighted rows into each output row (expert-parallel combine's reduce).
  virtual absl::Status ReduceRows(const kernels::ReduceRowsParams& p) = 0;
  virtual absl::Status Sample(const kernels::SampleParams& p) = 0;

  // --- graphs ---------------------------------------------------------------
  // Between BeginCapture and EndCapture launches are recorded, not run; the
  // graph replays them with the same pointers and shapes. Unimplemented on
  // backends without graphs (SupportsGraphs() false).
  virtual bool SupportsGraphs() const { return false; }
  virtual absl::Status BeginCapture();
  // Ends the capture begun by BeginCapture, also after a failed launch (then
  // returns that failure).
  virtual absl::StatusOr<std::unique_ptr<Graph>> EndCapture();
};

struct BackendOptions {
  int num_threads = 0;  // CPU compute threads; 0: every usable core
  // CUDA: bytes of cuBLASLt's own workspace (kept for the backend's life).
  size_t gemm_library_workspace_bytes = size_t{32} << 20;
};

// The backend for `spec`. For CUDA: FailedPrecondition when this build has no
// CUDA, the host has no driver or no GPU, or the ordinal is out of range (the
// message says how many devices there are).
// For fake: the factory a test build registered (FailedPrecondition without one).
absl::StatusOr<std::unique_ptr<Backend>> CreateBackend(const DeviceSpec& spec,
                                                       const BackendOptions& options = {});

// How CreateBackend makes --device fake: set by test builds that link the fake
// device (joule-worker-fake-device), never by production binaries.
using FakeBackendFactory = std::unique_ptr<Backend> (*)(const BackendOptions& options);
void SetFakeBackendFactory(FakeBackendFactory factory);

}  // namespace joule::device
