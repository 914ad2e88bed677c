#include "worker/ep/nccl_transport.h"

#include <atomic>

#include <cuda_runtime_api.h>
#include <nccl.h>
#include <sched.h>

#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "kernels/cuda/cuda_check.h"

namespace joule::ep {
namespace {

// Teardown (finalize) of a healthy communicator waits at most this long
// before it aborts instead.
constexpr absl::Duration kFinalizeBudget = absl::Seconds(5);

class NcclTransportImpl final : public NcclTransport {
 public:
  NcclTransportImpl(int rank, int world_size, const TransportOptions& options, int device)
      : rank_(rank), world_size_(world_size), options_(options), device_(device) {}

  ~NcclTransportImpl() override {
    (void)cudaSetDevice(device_);
    if (comm_ != nullptr) {
      bool finalized = false;
      if (broken_.ok()) {
        const ncclResult_t r = ncclCommFinalize(comm_);  // flushes what was issued
        finalized = (r == ncclSuccess || r == ncclInProgress) &&
                    WaitComm(absl::Now() + kFinalizeBudget, "finalize").ok();
      }
      if (finalized) {
        (void)ncclCommDestroy(comm_);
      } else {
        (void)ncclCommAbort(comm_);
      }
      comm_ = nullptr;
    }
    if (stream_ != nullptr) (void)cudaStreamDestroy(stream_);
  }

  absl::Status Init(const ncclUniqueId& id) {
    JOULE_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
    JOULE_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;  // every call returns at once; we poll with a deadline
    const absl::Time deadline = absl::Now() + options_.timeout;
    const ncclResult_t r = ncclCommInitRankConfig(&comm_, world_size_, id, rank_, &config);
    if (r != ncclSuccess && r != ncclInProgress) {
      if (comm_ != nullptr) (void)ncclCommAbort(comm_);
      comm_ = nullptr;
      return kernels::cuda::NcclErrorToStatus(r, "ncclCommInitRankConfig", __FILE__, __LINE__);
    }
    if (absl::Status s = WaitComm(deadline, "joining the communicator"); !s.ok()) return Fail(s);
    return absl::OkStatus();
  }

  int rank() const override { return rank_; }
  int world_size() const override { return world_size_; }

  absl::Status AllGather(const void* in, size_t bytes, void* out) override {
    if (absl::Status s = Ready(); !s.ok()) return s;
    const absl::Time deadline = absl::Now() + options_.timeout;
    if (bytes == 0) return absl::OkStatus();  // nothing moves; NCCL needs no call
    const ncclResult_t r = ncclAllGather(in, out, bytes, ncclUint8, comm_, stream_);
    if (absl::Status s = Issued(r, "ncclAllGather", deadline); !s.ok()) return Fail(s);
    return Complete("all-gather", deadline);
  }

  absl::Status AllToAllV(const void* send, const size_t* send_counts, const size_t* send_offsets,
                         void* recv, const size_t* recv_counts, const size_t* recv_offsets) override {
    if (absl::Status s = Ready(); !s.ok()) return s;
    const absl::Time deadline = absl::Now() + options_.timeout;
    if (send_counts[rank_] != recv_counts[rank_]) {
      return absl::InvalidArgumentError(
          absl::StrCat("all-to-all-v: rank ", rank_, " sends ", send_counts[rank_],
                       " bytes to itself but expects ", recv_counts[rank_]));
    }
    const char* src = static_cast<const char*>(send);
    char* dst = static_cast<char*>(recv);
    if (send_counts[rank_] > 0) {
      JOULE_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dst + recv_offsets[rank_],
                                                 src + send_offsets[rank_], send_counts[rank_],
                                                 cudaMemcpyDeviceToDevice, stream_));
    }
    bool any = false;
    for (int p = 0; p < world_size_; ++p) {
      any |= p != rank_ && (send_counts[p] > 0 || recv_counts[p] > 0);
    }
    if (any) {
      // One group: NCCL schedules all pairs together, so no ordering of
      // sends and receives can deadlock.
      ncclResult_t r = ncclGroupStart();
      for (int i = 1; i < world_size_ && r == ncclSuccess; ++i) {
        const int to = (rank_ + i) % world_size_;
        const int from = (rank_ + world_size_ - i) % world_size_;
        if (send_counts[to] > 0) {
          r = ncclSend(src + send_offsets[to], send_counts[to], ncclUint8, to, comm_, stream_);
        }
        if (r == ncclSuccess && recv_counts[from] > 0) {
          r = ncclRecv(dst + recv_offsets[from], recv_counts[from], ncclUint8, from, comm_,
                       stream_);
        }
      }
      const ncclResult_t end = ncclGroupEnd();
      if (r == ncclSuccess || r == ncclInProgress) r = end;
      if (absl::Status s = Issued(r, "ncclSend/ncclRecv group", deadline); !s.ok()) return Fail(s);
    }
    return Complete("all-to-all-v", deadline);
  }

  void Interrupt(const std::string& reason) override {
    {
      absl::MutexLock lock(&interrupt_mu_);
      if (interrupt_reason_.empty()) interrupt_reason_ = reason;
    }
    interrupted_.store(true, std::memory_order_release);
  }

 private:
  absl::Status Interrupted() {
    absl::MutexLock lock(&interrupt_mu_);
    return absl::AbortedError(
        absl::StrCat("nccl transport: rank ", rank_, " interrupted: ", interrupt_reason_));
  }

  absl::Status Ready() {
    if (interrupted_.load(std::memory_order_acquire)) return Fail(Interrupted());
    if (!broken_.ok()) {
      return absl::FailedPreconditionError(
          absl::StrCat("nccl transport: broken by an earlier error: ", broken_.message()));
    }
    JOULE_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
    return absl::OkStatus();
  }

  // An error the communicator reports asynchronously. Remote and system
  // errors are what a dead or unreachable peer looks like.
  absl::Status AsyncError(ncclResult_t r, absl::string_view what) {
    std::string detail = ncclGetErrorString(r);
    if (comm_ != nullptr) {
      if (const char* last = ncclGetLastError(comm_); last != nullptr && *last != '\0') {
        absl::StrAppend(&detail, " (", last, ")");
      }
    }
    const std::string msg = absl::StrCat("nccl transport: rank ", rank_, " ", what, ": ", detail);
    if (r == ncclRemoteError || r == ncclSystemError) return absl::UnavailableError(msg);
    return absl::InternalError(msg);
  }

  // Polls the communicator until its pending call (init, enqueue, finalize)
  // finished.
  absl::Status WaitComm(absl::Time deadline, absl::string_view what) {
    for (int polls = 0;; ++polls) {
      ncclResult_t state = ncclSuccess;
      const ncclResult_t r = ncclCommGetAsyncError(comm_, &state);
      if (r != ncclSuccess) return AsyncError(r, what);
      if (state == ncclSuccess) return absl::OkStatus();
      if (state != ncclInProgress) return AsyncError(state, what);
      if (interrupted_.load(std::memory_order_acquire)) return Interrupted();
      if (absl::Now() >= deadline) return TimedOut(what);
      if (polls > 64) sched_yield();
    }
  }

  // The result of an enqueueing call on a nonblocking communicator.
  absl::Status Issued(ncclResult_t r, absl::string_view call, absl::Time deadline) {
    if (r == ncclInProgress) return WaitComm(deadline, call);
    if (r != ncclSuccess) return AsyncError(r, call);
    return absl::OkStatus();
  }

  // Waits until the stream drained, watching the communicator for peer errors.
  absl::Status Complete(absl::string_view what, absl::Time deadline) {
    for (int polls = 0;; ++polls) {
      const cudaError_t e = cudaStreamQuery(stream_);
      if (e == cudaSuccess) return absl::OkStatus();
      if (e != cudaErrorNotReady) {
        return Fail(kernels::cuda::CudaErrorToStatus(e, "cudaStreamQuery", __FILE__, __LINE__));
      }
      // Cleared in case the runtime also recorded "not ready" as this
      // thread's last error (the CUDA guide says it does not; PyTorch clears
      // it all the same): the next launch check would report it as its own.
      (void)cudaGetLastError();
      ncclResult_t state = ncclSuccess;
      const ncclResult_t r = ncclCommGetAsyncError(comm_, &state);
      if (r != ncclSuccess) return Fail(AsyncError(r, what));
      if (state != ncclSuccess && state != ncclInProgress) return Fail(AsyncError(state, what));
      if (interrupted_.load(std::memory_order_acquire)) return Fail(Interrupted());
      if (absl::Now() >= deadline) return Fail(TimedOut(what));
      if (polls > 64) sched_yield();
    }
  }

  absl::Status TimedOut(absl::string_view what) {
    return absl::DeadlineExceededError(absl::StrCat("nccl transport: rank ", rank_, " ", what,
                                                    " did not complete within ",
                                                    absl::FormatDuration(options_.timeout),
                                                    "; communicator aborted"));
  }

  // Aborts the communicator (which also unblocks its kernels on the stream);
  // the transport is broken from here on.
  absl::Status Fail(absl::Status status) {
    if (broken_.ok()) broken_ = status;
    if (comm_ != nullptr) {
      (void)ncclCommAbort(comm_);
      comm_ = nullptr;
    }
    return status;
  }

  const int rank_;
  const int world_size_;
  const TransportOptions options_;
  const int device_;
  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
  absl::Status broken_;  // first error; non-OK means broken
  std::atomic<bool> interrupted_{false};  // Interrupt(): the waits below give up
  absl::Mutex interrupt_mu_;
  std::string interrupt_reason_ ABSL_GUARDED_BY(interrupt_mu_);
};

}  // namespace

NcclTransport::~NcclTransport() = default;

absl::StatusOr<std::string> NcclTransport::MakeUniqueId() {
  ncclUniqueId id;
  JOULE_NCCL_RETURN_IF_ERROR(ncclGetUniqueId(&id));
  return std::string(id.internal, sizeof(id.internal));
}

absl::StatusOr<std::unique_ptr<NcclTransport>> NcclTransport::Create(
    int rank, int world_size, const std::string& unique_id, const TransportOptions& options,
    int device) {
  if (world_size < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("nccl transport: world_size ", world_size, " must be at least 1"));
  }
  if (rank < 0 || rank >= world_size) {
    return absl::InvalidArgumentError(absl::StrCat("nccl transport: rank ", rank,
                                                   " is outside [0, ", world_size, ")"));
  }
  ncclUniqueId id;
  if (unique_id.size() != sizeof(id.internal)) {
    return absl::InvalidArgumentError(absl::StrCat("nccl transport: unique_id has ",
                                                   unique_id.size(), " bytes, expected ",
                                                   sizeof(id.internal)));
  }
  if (options.timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("nccl transport: timeout must be positive");
  }
  std::memcpy(id.internal, unique_id.data(), sizeof(id.internal));
  if (device < 0) JOULE_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  auto transport = std::make_unique<NcclTransportImpl>(rank, world_size, options, device);
  if (absl::Status s = transport->Init(id); !s.ok()) return s;
  return transport;
}

}  // namespace joule::ep
