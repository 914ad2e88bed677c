// The CUDA backend: one GPU, one stream, cuBLASLt for dense GEMMs and
// kernels/cuda for the rest; BF16 weights (block-scaled FP8 kept as FP8) and
// KV cache; CUDA graphs.
#include "worker/device/cuda_backend.h"

#include <cuda_runtime_api.h>

#include <cstdlib>
#include <cstring>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/status.h"
#include "kernels/cuda/attention.h"
#include "kernels/cuda/blas.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/elementwise.h"
#include "kernels/cuda/gemm.h"
#include "kernels/cuda/gemm_checks.h"
#include "kernels/cuda/grouped_gemm.h"
#include "kernels/cuda/moe.h"
#include "kernels/cuda/sampling.h"

namespace joule::device {
namespace {

namespace kcu = kernels::cuda;

void Release(void* data, MemoryKind kind) {
  switch (kind) {
    case MemoryKind::kDevice: cudaFree(data); break;
    case MemoryKind::kPinned: cudaFreeHost(data); break;
    case MemoryKind::kHost: std::free(data); break;
  }
}

class CudaGraph final : public Graph {
 public:
  CudaGraph(cudaGraphExec_t exec, cudaStream_t stream) : exec_(exec), stream_(stream) {}
  ~CudaGraph() override { cudaGraphExecDestroy(exec_); }
  absl::Status Launch() override {
    JOULE_CUDA_RETURN_IF_ERROR(cudaGraphLaunch(exec_, stream_));
    return absl::OkStatus();
  }

 private:
  cudaGraphExec_t exec_;
  cudaStream_t stream_;
};

// Records and waits on the backend's stream without the stream's later work.
class CudaEvent final : public Event {
 public:
  CudaEvent(cudaEvent_t event, cudaStream_t stream, int ordinal)
      : event_(event), stream_(stream), ordinal_(ordinal) {}
  ~CudaEvent() override { cudaEventDestroy(event_); }
  absl::Status Record() override {
    JOULE_CUDA_RETURN_IF_ERROR(cudaSetDevice(ordinal_));
    JOULE_CUDA_RETURN_IF_ERROR(cudaEventRecord(event_, stream_));
    return absl::OkStatus();
  }
  absl::Status Wait() override {
    JOULE_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(event_));
    return absl::OkStatus();
  }

 private:
  cudaEvent_t event_;
  cudaStream_t stream_;
  int ordinal_;
};

// A non-blocking stream of its own: its copies never wait for the backend's
// stream, nor it for them.
class CudaCopyStream final : public CopyStream {
 public:
  CudaCopyStream(cudaStream_t stream, int ordinal) : stream_(stream), ordinal_(ordinal) {}
  ~CudaCopyStream() override {
    cudaSetDevice(ordinal_);
    cudaStreamSynchronize(stream_);
    cudaStreamDestroy(stream_);
  }
  absl::Status CopyAsync(void* dst, const void* src, size_t bytes) override {
    if (bytes == 0) return absl::OkStatus();
    JOULE_CUDA_RETURN_IF_ERROR(cudaSetDevice(ordinal_));
    JOULE_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, stream_));
    return absl::OkStatus();
  }
  absl::Status Synchronize() override {
    JOULE_CUDA_RETURN_IF_ERROR(cudaSetDevice(ordinal_));
    JOULE_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
    return absl::OkStatus();
  }

 private:
  cudaStream_t stream_;
  int ordinal_;
};

// NVML spells a bus id with an 8-digit domain ("00000000:1B:00.0"); the CUDA
// runtime with 4 ("0000:1B:00.0").
std::string NvmlBusId(const char* cuda_bus_id) {
  std::string id = absl::AsciiStrToUpper(cuda_bus_id);
  const size_t colon = id.find(':');
  if (colon != std::string::npos && colon < 8) id.insert(0, 8 - colon, '0');
  return id;
}

class CudaBackend final : public Backend {
 public:
  CudaBackend(int ordinal, cudaStream_t stream, std::unique_ptr<kcu::LtGemm> gemm,
              std::string describe, std::string pci_bus_id)
      : spec_{.kind = DeviceKind::kCuda, .index = ordinal},
        stream_(stream),
        gemm_(std::move(gemm)),
        describe_(std::move(describe)),
        pci_bus_id_(std::move(pci_bus_id)) {}
  ~CudaBackend() override {
    Bind();
    cudaStreamSynchronize(stream_);
    gemm_.reset();
    cudaStreamDestroy(stream_);
  }

  const DeviceSpec& spec() const override { return spec_; }
  std::string Describe() const override { return describe_; }
  std::string pci_bus_id() const override { return pci_bus_id_; }
  bool device_memory_is_host() const override { return false; }
  kernels::DType kv_cache_type() const override { return kernels::DType::kBF16; }
  // Block-scaled FP8 stays FP8 (one byte per weight, with its F32 scales);
  // every other matrix is BF16 for the tensor cores.
  kernels::DType weight_type(kernels::DType stored) const override {
    return stored == kernels::DType::kF8E4M3 ? kernels::DType::kF8E4M3 : kernels::DType::kBF16;
  }
  kernels::cpu::CpuStream host_stream() override { return {}; }

  absl::StatusOr<Buffer> Allocate(MemoryKind kind, size_t bytes) override;
  absl::Status CopyAsync(void* dst, const void* src, size_t bytes) override {
    if (bytes == 0) return absl::OkStatus();
    Bind();
    JOULE_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, stream_));
    return absl::OkStatus();
  }
  absl::Status Zero(void* dst, size_t bytes) override {
    if (bytes == 0) return absl::OkStatus();
    Bind();
    JOULE_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(dst, 0, bytes, stream_));
    return absl::OkStatus();
  }
  absl::Status Synchronize() override {
    Bind();
    JOULE_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
    return absl::OkStatus();
  }
  absl::StatusOr<std::unique_ptr<Event>> CreateEvent() override {
    Bind();
    cudaEvent_t event = nullptr;
    JOULE_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
    return std::unique_ptr<Event>(new CudaEvent(event, stream_, spec_.index));
  }
  absl::StatusOr<std::unique_ptr<CopyStream>> CreateCopyStream() override {
    Bind();
    cudaStream_t stream = nullptr;
    JOULE_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    return std::unique_ptr<CopyStream>(new CudaCopyStream(stream, spec_.index));
  }
  absl::StatusOr<MemoryInfo> DeviceMemory() override {
    Bind();
    size_t free_bytes = 0, total_bytes = 0;
    JOULE_CUDA_RETURN_IF_ERROR(cudaMemGetInfo(&free_bytes, &total_bytes));
    return MemoryInfo{static_cast<int64_t>(free_bytes), static_cast<int64_t>(total_bytes)};
  }

  size_t GemmWorkspaceBytes(int64_t m, int64_t k) const override {
    return kcu::LtGemmWorkspaceBytes(m, k);
  }
  size_t AttentionWorkspaceBytes(int64_t tokens, int num_q_heads, int head_dim,
                                 int64_t max_context_len) const override {
    return kcu::PagedAttentionWorkspaceBytes(tokens, num_q_heads, head_dim, max_context_len);
  }

  absl::Status Gemm(const kernels::GemmParams& p) override {
    Bind();
    // cuBLASLt takes BF16 weights. F32 ones (MLA's absorbed matrices of FP8
    // checkpoints) and block-scaled FP8 ones run on the SIMT kernel, which
    // widens them in registers (FP8 times its block's scale); it rounds x to
    // BF16 as cuBLASLt's path does, so every GEMM here sees BF16 inputs.
    if (p.w_type != kernels::DType::kBF16) {
      return kcu::LaunchGemm(p, stream_, kcu::XRounding::kBf16);
    }
    if (p.batch != 1) return BatchedBf16Gemm(p);
    absl::Status lt = gemm_->Run(p, stream_);
    // A shape cuBLASLt has no algorithm for (decided on the host, the same
    // way at warm-up and at capture) runs on the SIMT kernel, x rounded alike.
    if (absl::IsUnimplemented(lt)) return kcu::LaunchGemm(p, stream_, kcu::XRounding::kBf16);
    return lt;
  }
  // A batch of BF16 products (MLA's per-head GEMMs, one per query head): with
  // few rows (decode) one SIMT launch covers every member, where a cuBLASLt
  // launch per member would cost more than its math; prefill-sized members
  // run one by one on cuBLASLt's tensor cores. The bound is a first guess: the
  // GPU bundle's engine_bench (DeepSeek-V3 shapes) is where it gets measured.
  absl::Status BatchedBf16Gemm(const kernels::GemmParams& p) {
    constexpr int64_t kSimtBatchMaxRows = 256;
    if (p.m <= kSimtBatchMaxRows) return kcu::LaunchGemm(p, stream_, kcu::XRounding::kBf16);
    if (absl::Status s = kcu::ValidateGemmBatch("Gemm", p); !s.ok()) return s;
    for (int64_t b = 0; b < p.batch; ++b) {
      if (absl::Status s = Gemm(kernels::GemmBatchMember(p, b)); !s.ok()) return s;
    }
    return absl::OkStatus();
  }
  absl::Status GroupedGemm(const kernels::GroupedGemmParams& p) override {
    Bind();
    return kcu::LaunchGroupedGemm(p, stream_);
  }
  absl::Status RmsNorm(const kernels::RmsNormParams& p) override {
    Bind();
    return kcu::LaunchRmsNorm(p, stream_);
  }
  absl::Status SiluMul(const kernels::SiluMulParams& p) override {
    Bind();
    return kcu::LaunchSiluMul(p, stream_);
  }
  absl::Status Rope(const kernels::RopeParams& p) override {
    Bind();
    return kcu::LaunchRope(p, stream_);
  }
  absl::Status Embedding(const kernels::EmbeddingParams& p) override {
    Bind();
    return kcu::LaunchEmbedding(p, stream_);
  }
  absl::Status Add(const kernels::AddParams& p) override {
    Bind();
    return kcu::LaunchAdd(p, stream_);
  }
  absl::Status GatedAdd(const kernels::GatedAddParams& p) override {
    Bind();
    return kcu::LaunchGatedAdd(p, stream_);
  }
  absl::Status KvCacheWrite(const kernels::KvCacheWriteParams& p) override {
    Bind();
    return kcu::LaunchKvCacheWrite(p, stream_);
  }
  absl::Status PagedAttention(const kernels::PagedAttentionParams& p) override {
    Bind();
    return kcu::LaunchPagedAttention(p, stream_);
  }
  absl::Status RouterTopK(const kernels::RouterTopKParams& p) override {
    Bind();
    return kcu::LaunchRouterTopK(p, stream_);
  }
  absl::Status MoeLayout(const kernels::MoeLayoutParams& p) override {
    Bind();
    return kcu::ComputeMoeLayout(p, stream_);
  }
  absl::Status ExpertLoad(const kernels::ExpertLoadParams& p) override {
    Bind();
    return kcu::AccumulateExpertLoad(p, stream_);
  }
  absl::Status Unpermute(const kernels::UnpermuteParams& p) override {
    Bind();
    return kcu::LaunchUnpermute(p, stream_);
  }
  absl::Status GatherRows(const kernels::GatherRowsParams& p) override {
    Bind();
    return kcu::LaunchGatherRows(p, stream_);
  }
  absl::Status ReduceRows(const kernels::ReduceRowsParams& p) override {
    Bind();
    return kcu::LaunchReduceRows(p, stream_);
  }
  absl::Status Sample(const kernels::SampleParams& p) override {
    Bind();
    return kcu::LaunchSample(p, stream_);
  }

  bool SupportsGraphs() const override { return true; }
  absl::Status BeginCapture() override {
    Bind();
    // Thread-local: another thread's unrelated CUDA calls cannot break it.
    JOULE_CUDA_RETURN_IF_ERROR(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
    return absl::OkStatus();
  }
  absl::StatusOr<std::unique_ptr<Graph>> EndCapture() override {
    Bind();
    cudaGraph_t graph = nullptr;
    JOULE_CUDA_RETURN_IF_ERROR(cudaStreamEndCapture(stream_, &graph));
    cudaGraphExec_t exec = nullptr;
    const cudaError_t instantiated = cudaGraphInstantiate(&exec, graph, 0);
    cudaGraphDestroy(graph);
    JOULE_CUDA_RETURN_IF_ERROR(instantiated);
    return std::unique_ptr<Graph>(new CudaGraph(exec, stream_));
  }

 private:
  // The CUDA device is per thread; the step loop is not the thread that
  // created the backend. Set every time, not cached: other code (another
  // backend's creation, events, the NCCL transport) calls cudaSetDevice
  // directly, so a cache of the bound device goes stale. The call is cheap.
  void Bind() const { cudaSetDevice(spec_.index); }

  const DeviceSpec spec_;
  cudaStream_t stream_;
  std::unique_ptr<kcu::LtGemm> gemm_;
  const std::string describe_;
  const std::string pci_bus_id_;
};

absl::StatusOr<Buffer> CudaBackend::Allocate(MemoryKind kind, size_t bytes) {
  Bind();
  const size_t n = std::max<size_t>(bytes, 1);
  void* data = nullptr;
  cudaError_t err = cudaSuccess;
  switch (kind) {
    case MemoryKind::kDevice: err = cudaMalloc(&data, n); break;
    case MemoryKind::kPinned: err = cudaHostAlloc(&data, n, cudaHostAllocDefault); break;
    case MemoryKind::kHost: data = std::malloc(n); break;
  }
  if (err != cudaSuccess && err != cudaErrorMemoryAllocation) {
    // Not a shortage: a broken context (a kernel's fault before) or a bug.
    const char* call = kind == MemoryKind::kPinned ? "cudaHostAlloc" : "cudaMalloc";
    return kcu::CudaErrorToStatus(err, call, __FILE__, __LINE__);
  }
  if (err != cudaSuccess || data == nullptr) {
    cudaGetLastError();  // an out-of-memory result is not sticky; clear it
    size_t free_bytes = 0, total_bytes = 0;
    cudaMemGetInfo(&free_bytes, &total_bytes);
    return absl::ResourceExhaustedError(absl::StrFormat(
        "cannot allocate %d bytes (%.2f GiB) of %s memory on %s: %s; the GPU has %.2f GiB free of "
        "%.2f GiB",
        bytes, bytes / double(1 << 30), std::string(MemoryKindName(kind)), spec_.ToString(),
        err != cudaSuccess ? cudaGetErrorString(err) : "malloc failed", free_bytes / double(1 << 30),
        total_bytes / double(1 << 30)));
  }
  Buffer buffer(data, bytes, kind, &Release);
  if (kind == MemoryKind::kDevice) {
    RETURN_IF_ERROR(Zero(data, n));
    // Wait for the zeroing: a caller may hand the buffer to another stream
    // (NCCL receiving into a staging buffer), where a late memset on ours
    // would wipe what arrived. Allocation is rare and never inside graph
    // capture (buffers are reserved and warmed up before it).
    RETURN_IF_ERROR(Synchronize());
  } else {
    std::memset(data, 0, n);
  }
  return buffer;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Backend>> CreateCudaBackend(int ordinal,
                                                           const BackendOptions& options) {
  const std::string name = absl::StrCat("--device cuda:", ordinal);
  const absl::Status available = kcu::CheckDeviceAvailable();
  if (!available.ok()) return absl::FailedPreconditionError(absl::StrCat(name, ": ", available.message()));
  const int count = kcu::DeviceCount();
  if (ordinal < 0 || ordinal >= count) {
    return absl::FailedPreconditionError(absl::StrCat(
        name, ": this host has ", count, " CUDA device", count == 1 ? "" : "s", " (cuda:0",
        count > 1 ? absl::StrCat(" to cuda:", count - 1) : "", ")"));
  }
  JOULE_CUDA_RETURN_IF_ERROR(cudaSetDevice(ordinal));
  cudaDeviceProp prop;
  JOULE_CUDA_RETURN_IF_ERROR(cudaGetDeviceProperties(&prop, ordinal));
  if (prop.major < 8) {
    return absl::FailedPreconditionError(absl::StrCat(
        name, ": ", prop.name, " is sm_", prop.major, prop.minor,
        "; the BF16 kernels need sm_80 or newer (this build targets sm_90)"));
  }
  char bus[32] = {};
  JOULE_CUDA_RETURN_IF_ERROR(cudaDeviceGetPCIBusId(bus, sizeof(bus), ordinal));
  cudaStream_t stream = nullptr;
  JOULE_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  absl::StatusOr<std::unique_ptr<kcu::LtGemm>> gemm =
      kcu::LtGemm::Create(options.gemm_library_workspace_bytes);
  if (!gemm.ok()) {
    cudaStreamDestroy(stream);
    return gemm.status();
  }
  const std::string bus_id = NvmlBusId(bus);
  std::string describe = absl::StrFormat(
      "cuda:%d (%s, %.1f GiB, sm_%d%d, %d SMs, PCI %s)", ordinal, prop.name,
      prop.totalGlobalMem / double(1 << 30), prop.major, prop.minor, prop.multiProcessorCount, bus_id);
  return std::unique_ptr<Backend>(
      new CudaBackend(ordinal, stream, *std::move(gemm), std::move(describe), bus_id));
}

}  // namespace joule::device
