#include "worker/device/fake_device_backend.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "kernels/cuda/attention_checks.h"
#include "kernels/cuda/gemm_checks.h"

namespace joule::device {

class FakeGraph final : public Graph {
 public:
  FakeGraph(std::vector<std::function<absl::Status()>> ops, FakeDeviceBackend* backend)
      : ops_(std::make_shared<const std::vector<std::function<absl::Status()>>>(std::move(ops))),
        backend_(backend) {}
  absl::Status Launch() override { return backend_->LaunchRecorded(ops_); }

 private:
  // Shared with queued replays, which may outlive the graph.
  std::shared_ptr<const std::vector<std::function<absl::Status()>>> ops_;
  FakeDeviceBackend* backend_;
};

// The point in the stream at Record: the ops queued so far.
class FakeEvent final : public Event {
 public:
  explicit FakeEvent(FakeDeviceBackend* backend) : backend_(backend) {}
  absl::Status Record() override {
    seq_ = backend_->Enqueued();
    return absl::OkStatus();
  }
  absl::Status Wait() override { return backend_->Wait(seq_); }

 private:
  FakeDeviceBackend* backend_;
  int64_t seq_ = 0;
};

// The asynchronous fake's copy stream. Copies between the backend's own
// memory run only at Synchronize (a legal schedule for a stream, and the one
// that makes a missing wait show deterministically); from pageable host
// memory the source is taken at the call, into it the call copies at once
// after the copies queued before, as cudaMemcpyAsync does. Nothing here
// waits for the backend's stream: the caller orders the two.
class FakeCopyStream final : public CopyStream {
 public:
  explicit FakeCopyStream(FakeDeviceBackend* backend) : backend_(backend) {}
  absl::Status CopyAsync(void* dst, const void* src, size_t bytes) override {
    if (bytes == 0) return absl::OkStatus();
    if (!backend_->Owns(dst, bytes)) {
      RunQueued();
      std::memmove(dst, src, bytes);
    } else if (!backend_->Owns(src, bytes)) {
      const auto* from = static_cast<const std::byte*>(src);
      queued_.push_back({dst, nullptr, bytes, std::vector<std::byte>(from, from + bytes)});
    } else {
      queued_.push_back({dst, src, bytes, {}});
    }
    return absl::OkStatus();
  }
  // A fault injected into the device surfaces here as at the backend's waits.
  absl::Status Synchronize() override {
    RunQueued();
    return backend_->CountWait();
  }

 private:
  struct Copy {
    void* dst;
    const void* src;  // null: `taken` holds the source
    size_t bytes;
    std::vector<std::byte> taken;
  };
  void RunQueued() {
    for (Copy& c : queued_) std::memmove(c.dst, c.src != nullptr ? c.src : c.taken.data(), c.bytes);
    queued_.clear();
  }

  FakeDeviceBackend* backend_;
  std::vector<Copy> queued_;
};

namespace {

// Which asynchronous fake owns each live allocation, so freeing one can wait
// for that backend's stream (Buffer's release takes no context).
absl::Mutex registry_mu;
std::map<void*, FakeDeviceBackend*>& Registry() {
  static auto* registry = new std::map<void*, FakeDeviceBackend*>;
  return *registry;
}

// Tokens before the trailing ones whose every choice is expert -1 (padding,
// which a padded batch always puts last).
int64_t RealTokens(const int32_t* expert_ids, int64_t tokens, int top_k) {
  int64_t real = tokens;
  while (real > 0 &&
         std::all_of(expert_ids + (real - 1) * top_k, expert_ids + real * top_k,
                     [](int32_t e) { return e < 0; })) {
    --real;
  }
  return real;
}

}  // namespace

FakeDeviceBackend::FakeDeviceBackend(int num_threads, bool asynchronous)
    : cpu_(num_threads), asynchronous_(asynchronous) {
  if (asynchronous_) thread_ = std::thread([this] { RunQueue(); });
}

FakeDeviceBackend::~FakeDeviceBackend() {
  if (!asynchronous_) return;
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
    cv_.SignalAll();
  }
  thread_.join();  // runs what is queued first
  absl::MutexLock lock(&registry_mu);
  for (auto& [data, backend] : Registry()) {
    if (backend == this) backend = nullptr;
  }
}

absl::Status FakeDeviceBackend::Launch(Op op) {
  if (capturing_) {
    recording_.push_back(std::move(op));
    ++recorded_total_;
    return absl::OkStatus();
  }
  ++launches_;
  if (!asynchronous_) return op();
  absl::MutexLock lock(&mu_);
  queue_.push_back(std::move(op));
  ++enqueued_;
  cv_.SignalAll();
  return absl::OkStatus();
}

absl::Status FakeDeviceBackend::LaunchRecorded(std::shared_ptr<const std::vector<Op>> ops) {
  if (!asynchronous_) {
    for (const Op& op : *ops) {
      ++launches_;
      RETURN_IF_ERROR(op());
    }
    return absl::OkStatus();
  }
  launches_ += static_cast<int64_t>(ops->size()) - 1;  // Launch counts one
  return Launch([ops] {
    for (const Op& op : *ops) RETURN_IF_ERROR(op());
    return absl::OkStatus();
  });
}

void FakeDeviceBackend::RunQueue() {
  for (;;) {
    Op op;
    {
      absl::MutexLock lock(&mu_);
      while (queue_.empty() && !stopping_) cv_.Wait(&mu_);
      if (queue_.empty()) return;
      op = std::move(queue_.front());
      queue_.pop_front();
    }
    absl::Status status = op();
    absl::MutexLock lock(&mu_);
    if (!status.ok() && sticky_.ok()) sticky_ = status;
    ++completed_;
    cv_.SignalAll();
  }
}

int64_t FakeDeviceBackend::Enqueued() {
  absl::MutexLock lock(&mu_);
  return enqueued_;
}

absl::Status FakeDeviceBackend::WaitFor(int64_t seq) {
  absl::MutexLock lock(&mu_);
  while (completed_ < seq) cv_.Wait(&mu_);
  return sticky_;
}

absl::Status FakeDeviceBackend::Wait(int64_t seq) {
  absl::Status done = WaitFor(seq);  // nothing to wait for when synchronous
  absl::Status fault = CountWait();
  return done.ok() ? fault : done;
}

absl::Status FakeDeviceBackend::CountWait() {
  if (syncs_to_fault_ > 0 && --syncs_to_fault_ == 0) syncs_to_fault_ = -1;
  return syncs_to_fault_ < 0 ? fault_ : absl::OkStatus();
}

absl::Status FakeDeviceBackend::Synchronize() { return Wait(Enqueued()); }

absl::StatusOr<std::unique_ptr<Event>> FakeDeviceBackend::CreateEvent() {
  return std::unique_ptr<Event>(new FakeEvent(this));
}

absl::Status FakeDeviceBackend::HoldStream(absl::Notification* release) {
  if (!asynchronous_) {
    return absl::FailedPreconditionError("HoldStream: a synchronous fake would hold the caller");
  }
  return Launch([release] {
    release->WaitForNotification();
    return absl::OkStatus();
  });
}

absl::StatusOr<std::unique_ptr<CopyStream>> FakeDeviceBackend::CreateCopyStream() {
  if (!asynchronous_) return Backend::CreateCopyStream();  // everything runs to completion
  return std::unique_ptr<CopyStream>(new FakeCopyStream(this));
}

bool FakeDeviceBackend::Owns(const void* p, size_t bytes) {
  const auto start = reinterpret_cast<uintptr_t>(p);
  absl::MutexLock lock(&mu_);
  auto it = owned_.upper_bound(start);
  if (it == owned_.begin()) return false;
  --it;
  return start + bytes <= it->first + it->second;
}

void FakeDeviceBackend::FreeAfterDrain(void* data, MemoryKind) {
  {
    absl::MutexLock lock(&registry_mu);
    auto it = Registry().find(data);
    if (it != Registry().end()) {
      if (FakeDeviceBackend* backend = it->second) {
        backend->WaitFor(backend->Enqueued()).IgnoreError();  // as cudaFree waits
        absl::MutexLock owned(&backend->mu_);
        backend->owned_.erase(reinterpret_cast<uintptr_t>(data));
      }
      Registry().erase(it);
    }
  }
  std::free(data);
}

absl::StatusOr<Buffer> FakeDeviceBackend::Allocate(MemoryKind kind, size_t bytes) {
  if (capturing_) return absl::FailedPreconditionError("Allocate during a graph capture");
  if (!asynchronous_ || kind == MemoryKind::kHost) return cpu_.Allocate(kind, bytes);
  constexpr size_t kAlign = 64;
  const size_t rounded = (std::max<size_t>(bytes, 1) + kAlign - 1) / kAlign * kAlign;
  void* data = std::aligned_alloc(kAlign, rounded);
  if (data == nullptr) {
    return absl::ResourceExhaustedError(absl::StrCat("cannot allocate ", bytes, " bytes"));
  }
  std::memset(data, 0, rounded);
  {
    absl::MutexLock lock(&mu_);
    owned_[reinterpret_cast<uintptr_t>(data)] = rounded;
  }
  absl::MutexLock lock(&registry_mu);
  Registry()[data] = this;
  return Buffer(data, bytes, kind, &FreeAfterDrain);
}

absl::Status FakeDeviceBackend::CopyAsync(void* dst, const void* src, size_t bytes) {
  if (!asynchronous_ || bytes == 0 || capturing_) {
    return Launch([=, this] { return cpu_.CopyAsync(dst, src, bytes); });
  }
  if (!Owns(dst, bytes)) {  // into pageable host memory: the call waits and copies
    RETURN_IF_ERROR(WaitFor(Enqueued()));
    std::memmove(dst, src, bytes);
    return absl::OkStatus();
  }
  if (!Owns(src, bytes)) {  // from pageable host memory: the source is taken now
    auto taken = std::make_shared<std::vector<std::byte>>(
        static_cast<const std::byte*>(src), static_cast<const std::byte*>(src) + bytes);
    return Launch([dst, taken] {
      std::memcpy(dst, taken->data(), taken->size());
      return absl::OkStatus();
    });
  }
  return Launch([=] {
    std::memmove(dst, src, bytes);
    return absl::OkStatus();
  });
}

absl::Status FakeDeviceBackend::Zero(void* dst, size_t bytes) {
  return Launch([=, this] { return cpu_.Zero(dst, bytes); });
}

absl::Status FakeDeviceBackend::BeginCapture() {
  if (capturing_) return absl::FailedPreconditionError("a capture is already open");
  capturing_ = true;
  recording_.clear();
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Graph>> FakeDeviceBackend::EndCapture() {
  if (!capturing_) return absl::FailedPreconditionError("no capture is open");
  capturing_ = false;
  return std::unique_ptr<Graph>(new FakeGraph(std::move(recording_), this));
}

absl::Status FakeDeviceBackend::Gemm(const kernels::GemmParams& p) {
  RETURN_IF_ERROR(kernels::cuda::ValidateGemmBatch("Gemm", p));  // at launch, as on the GPU
  return Launch([=, this] { return cpu_.Gemm(p); });
}
absl::Status FakeDeviceBackend::GroupedGemm(const kernels::GroupedGemmParams& p) {
  return Launch([=, this] { return cpu_.GroupedGemm(p); });
}
absl::Status FakeDeviceBackend::RmsNorm(const kernels::RmsNormParams& p) {
  return Launch([=, this] { return cpu_.RmsNorm(p); });
}
absl::Status FakeDeviceBackend::SiluMul(const kernels::SiluMulParams& p) {
  return Launch([=, this] { return cpu_.SiluMul(p); });
}
absl::Status FakeDeviceBackend::Rope(const kernels::RopeParams& p) {
  return Launch([=, this] { return cpu_.Rope(p); });
}
absl::Status FakeDeviceBackend::Embedding(const kernels::EmbeddingParams& p) {
  return Launch([=, this] { return cpu_.Embedding(p); });
}
absl::Status FakeDeviceBackend::Add(const kernels::AddParams& p) {
  return Launch([=, this] { return cpu_.Add(p); });
}
absl::Status FakeDeviceBackend::GatedAdd(const kernels::GatedAddParams& p) {
  return Launch([=, this] { return cpu_.GatedAdd(p); });
}
absl::Status FakeDeviceBackend::KvCacheWrite(const kernels::KvCacheWriteParams& p) {
  return Launch([=, this] { return cpu_.KvCacheWrite(p); });
}
absl::Status FakeDeviceBackend::ExpertLoad(const kernels::ExpertLoadParams& p) {
  return Launch([=, this] { return cpu_.ExpertLoad(p); });
}
absl::Status FakeDeviceBackend::GatherRows(const kernels::GatherRowsParams& p) {
  return Launch([=, this] { return cpu_.GatherRows(p); });
}
absl::Status FakeDeviceBackend::ReduceRows(const kernels::ReduceRowsParams& p) {
  return Launch([=, this] { return cpu_.ReduceRows(p); });
}
absl::Status FakeDeviceBackend::Sample(const kernels::SampleParams& p) {
  return Launch([=, this] { return cpu_.Sample(p); });
}

// As on the GPU: what its launch refuses is refused here, and a sequence with
// no context (padding) gets zeros.
absl::Status FakeDeviceBackend::PagedAttention(const kernels::PagedAttentionParams& p) {
  RETURN_IF_ERROR(kernels::cuda::ValidatePagedAttention(p));
  return Launch([=, this] {
    RETURN_IF_ERROR(cpu_.PagedAttention(p));
    const int64_t row = int64_t{p.num_q_heads} * p.head_dim;
    for (int s = 0; s < p.num_seqs; ++s) {
      if (p.context_lens[s] != 0) continue;
      for (int32_t t = p.query_start[s]; t < p.query_start[s + 1]; ++t) {
        std::fill(p.out + t * row, p.out + (t + 1) * row, 0.0f);
      }
    }
    return absl::OkStatus();
  });
}

// valid_tokens is read when the launch runs: tokens past it get expert -1.
absl::Status FakeDeviceBackend::RouterTopK(const kernels::RouterTopKParams& p) {
  return Launch([=, this] {
    kernels::RouterTopKParams all = p;
    all.valid_tokens = nullptr;
    RETURN_IF_ERROR(cpu_.RouterTopK(all));
    if (p.valid_tokens == nullptr) return absl::OkStatus();
    for (int64_t t = *p.valid_tokens; t < p.tokens; ++t) {
      std::fill(p.expert_ids + t * p.top_k, p.expert_ids + (t + 1) * p.top_k, -1);
      std::fill(p.weights + t * p.top_k, p.weights + (t + 1) * p.top_k, 0.0f);
    }
    return absl::OkStatus();
  });
}

// Slots of expert -1 (padding) are left out: slot_to_permuted -1.
absl::Status FakeDeviceBackend::MoeLayout(const kernels::MoeLayoutParams& p) {
  return Launch([=, this] {
    kernels::MoeLayoutParams real = p;
    real.tokens = RealTokens(p.expert_ids, p.tokens, p.top_k);
    RETURN_IF_ERROR(cpu_.MoeLayout(real));
    std::fill(p.slot_to_permuted + real.tokens * p.top_k, p.slot_to_permuted + p.tokens * p.top_k, -1);
    return absl::OkStatus();
  });
}

// Slots left out of the layout add nothing.
absl::Status FakeDeviceBackend::Unpermute(const kernels::UnpermuteParams& p) {
  return Launch([=, this] {
    kernels::UnpermuteParams real = p;
    while (real.tokens > 0 && p.slot_to_permuted[(real.tokens - 1) * p.top_k] < 0) --real.tokens;
    RETURN_IF_ERROR(cpu_.Unpermute(real));
    if (!p.accumulate) {
      std::fill(p.out + real.tokens * p.hidden, p.out + p.tokens * p.hidden, 0.0f);
    }
    return absl::OkStatus();
  });
}

}  // namespace joule::device
