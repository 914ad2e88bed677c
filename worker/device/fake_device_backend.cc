#include "worker/device/fake_device_backend.h"

#include <algorithm>
#include <cstring>

#include "common/status.h"

namespace joule::device {
namespace {

class FakeGraph final : public Graph {
 public:
  FakeGraph(std::vector<std::function<absl::Status()>> ops, int64_t* launches)
      : ops_(std::move(ops)), launches_(launches) {}
  absl::Status Launch() override {
    for (const auto& op : ops_) {
      ++*launches_;
      RETURN_IF_ERROR(op());
    }
    return absl::OkStatus();
  }

 private:
  std::vector<std::function<absl::Status()>> ops_;
  int64_t* launches_;
};

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

absl::Status FakeDeviceBackend::Launch(Op op) {
  if (capturing_) {
    recording_.push_back(std::move(op));
    ++recorded_total_;
    return absl::OkStatus();
  }
  ++launches_;
  return op();
}

absl::Status FakeDeviceBackend::Synchronize() {
  if (syncs_to_fault_ > 0 && --syncs_to_fault_ == 0) syncs_to_fault_ = -1;
  return syncs_to_fault_ < 0 ? fault_ : absl::OkStatus();
}

absl::StatusOr<Buffer> FakeDeviceBackend::Allocate(MemoryKind kind, size_t bytes) {
  if (capturing_) return absl::FailedPreconditionError("Allocate during a graph capture");
  return cpu_.Allocate(kind, bytes);
}

absl::Status FakeDeviceBackend::CopyAsync(void* dst, const void* src, size_t bytes) {
  return Launch([=] { return cpu_.CopyAsync(dst, src, bytes); });
}

absl::Status FakeDeviceBackend::Zero(void* dst, size_t bytes) {
  return Launch([=] { return cpu_.Zero(dst, bytes); });
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
  return std::unique_ptr<Graph>(new FakeGraph(std::move(recording_), &launches_));
}

absl::Status FakeDeviceBackend::Gemm(const kernels::GemmParams& p) {
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

// As on the GPU: a sequence with no context (padding) gets zeros.
absl::Status FakeDeviceBackend::PagedAttention(const kernels::PagedAttentionParams& p) {
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
