#include "worker/ep/staged_transport.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace joule::ep {
namespace {

// The smallest staging buffer: small collectives (counts, barriers) all fit.
constexpr size_t kMinStagingBytes = 4096;

}  // namespace

StagedTransport::StagedTransport(std::unique_ptr<Transport> inner, device::Backend* backend)
    : inner_(std::move(inner)), backend_(backend) {}

// The staging buffers go back to the backend before the inner transport goes.
StagedTransport::~StagedTransport() = default;

absl::Status StagedTransport::Reserve(device::Buffer& buffer, size_t bytes) {
  if (!buffer.empty() && buffer.bytes() >= bytes) return absl::OkStatus();
  const size_t grown = std::max({bytes, 2 * buffer.bytes(), kMinStagingBytes});
  buffer.Reset();  // freed first: the old and the new one never coexist
  ASSIGN_OR_RETURN(buffer, backend_->Allocate(device::MemoryKind::kDevice, grown));
  ++allocations_;
  // A hint only (a transport that maps buffers for zero-copy); errors do not matter.
  (void)inner_->RegisterBuffer(buffer.data(), buffer.bytes());
  return absl::OkStatus();
}

absl::Status StagedTransport::Ready() {
  if (!broken_.ok()) {
    return absl::FailedPreconditionError(
        absl::StrCat("staged transport: broken by an earlier error: ", broken_.message()));
  }
  if (copies_ == nullptr) {
    absl::StatusOr<std::unique_ptr<device::CopyStream>> copies = backend_->CreateCopyStream();
    if (!copies.ok()) return Broken(copies.status());
    copies_ = *std::move(copies);
  }
  return absl::OkStatus();
}

absl::Status StagedTransport::Broken(absl::Status status) {
  status = Annotate(status, absl::StrCat("staged transport: rank ", rank(), ": staging"));
  if (broken_.ok()) broken_ = status;
  return status;
}

// Chunks that follow each other on both sides become one copy (the usual
// case: callers pack their chunks back to back). A failed copy or wait
// breaks the transport.
absl::Status StagedTransport::Stage(std::span<const Chunk> chunks, const void* src_base,
                                    void* dst_base, bool to_device) {
  if (chunks.empty()) return absl::OkStatus();
  const auto* src_bytes = static_cast<const std::byte*>(src_base);
  auto* dst_bytes = static_cast<std::byte*>(dst_base);
  size_t i = 0;
  while (i < chunks.size()) {
    Chunk run = chunks[i++];
    while (i < chunks.size() && chunks[i].host_offset == run.host_offset + run.bytes &&
           chunks[i].device_offset == run.device_offset + run.bytes) {
      run.bytes += chunks[i++].bytes;
    }
    const size_t src = to_device ? run.host_offset : run.device_offset;
    const size_t dst = to_device ? run.device_offset : run.host_offset;
    if (absl::Status s = copies_->CopyAsync(dst_bytes + dst, src_bytes + src, run.bytes); !s.ok()) {
      return Broken(s);
    }
  }
  if (absl::Status s = copies_->Synchronize(); !s.ok()) return Broken(s);
  return absl::OkStatus();
}

absl::Status StagedTransport::AllGather(const void* in, size_t bytes, void* out) {
  RETURN_IF_ERROR(Ready());
  const int world = world_size();
  if (absl::Status s = Reserve(gather_, world * bytes); !s.ok()) return Broken(s);
  std::byte* gathered = gather_.as<std::byte>();
  std::byte* mine = gathered + rank() * bytes;
  const Chunk mine_chunk{.host_offset = 0, .device_offset = 0, .bytes = bytes};
  const Chunk all_chunk{.host_offset = 0, .device_offset = 0, .bytes = world * bytes};
  const size_t n = bytes > 0 ? 1 : 0;  // nothing to stage for an empty gather
  RETURN_IF_ERROR(Stage({&mine_chunk, n}, in, mine, /*to_device=*/true));
  // In place: NCCL and the other transports take in == out + rank * bytes.
  RETURN_IF_ERROR(inner_->AllGather(mine, bytes, gathered));
  return Stage({&all_chunk, n}, gathered, out, /*to_device=*/false);
}

absl::Status StagedTransport::AllToAllV(const void* send, const size_t* send_counts,
                                        const size_t* send_offsets, void* recv,
                                        const size_t* recv_counts, const size_t* recv_offsets) {
  RETURN_IF_ERROR(Ready());
  const int world = world_size();
  const int me = rank();
  // Every rank's send and receive counts, so that each rank sees every pair.
  my_counts_.assign(2 * world, 0);
  for (int p = 0; p < world; ++p) {
    my_counts_[p] = send_counts[p];
    my_counts_[world + p] = recv_counts[p];
  }
  all_counts_.resize(2 * world * world);
  RETURN_IF_ERROR(Annotate(AllGather(my_counts_.data(), my_counts_.size() * sizeof(uint64_t),
                                     all_counts_.data()),
                           "all-to-all-v: exchanging counts"));
  auto sends = [&](int src, int dst) { return all_counts_[src * 2 * world + dst]; };
  auto expects = [&](int dst, int src) { return all_counts_[dst * 2 * world + world + src]; };

  // A pair whose counts disagree moves nothing; the others are packed back
  // to back in the staging buffers.
  std::string mismatch;
  auto report = [&](int src, int dst) {
    absl::StrAppend(&mismatch, mismatch.empty() ? "" : "; ", "rank ", src, " sends ",
                    sends(src, dst), " bytes to ",
                    src == dst ? "itself but expects " : absl::StrCat("rank ", dst, ", which expects "),
                    expects(dst, src));
  };
  send_counts_.assign(world, 0);
  send_offsets_.assign(world, 0);
  recv_counts_.assign(world, 0);
  recv_offsets_.assign(world, 0);
  send_chunks_.clear();
  recv_chunks_.clear();
  size_t send_total = 0, recv_total = 0;
  for (int p = 0; p < world; ++p) {
    const bool send_agrees = sends(me, p) == expects(p, me);
    if (!send_agrees) report(me, p);
    send_counts_[p] = send_agrees ? send_counts[p] : 0;
    send_offsets_[p] = send_total;
    if (send_counts_[p] > 0) send_chunks_.push_back({send_offsets[p], send_total, send_counts_[p]});
    send_total += send_counts_[p];

    const bool recv_agrees = sends(p, me) == expects(me, p);
    if (!recv_agrees && p != me) report(p, me);  // the pair with itself is reported once
    recv_counts_[p] = recv_agrees ? recv_counts[p] : 0;
    recv_offsets_[p] = recv_total;
    if (recv_counts_[p] > 0) recv_chunks_.push_back({recv_offsets[p], recv_total, recv_counts_[p]});
    recv_total += recv_counts_[p];
  }

  if (absl::Status s = Reserve(send_, send_total); !s.ok()) return Broken(s);
  if (absl::Status s = Reserve(recv_, recv_total); !s.ok()) return Broken(s);
  RETURN_IF_ERROR(Stage(send_chunks_, send, send_.data(), /*to_device=*/true));
  RETURN_IF_ERROR(inner_->AllToAllV(send_.data(), send_counts_.data(), send_offsets_.data(),
                                    recv_.data(), recv_counts_.data(), recv_offsets_.data()));
  // Chunk by chunk: the caller's bytes between chunks stay untouched.
  RETURN_IF_ERROR(Stage(recv_chunks_, recv_.data(), recv, /*to_device=*/false));
  if (!mismatch.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "all-to-all-v: counts disagree (", mismatch,
        "); those pairs moved nothing: exchange counts first (Transport::AllToAllV)"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<SharedWindows>> StagedTransport::MapSharedWindows(size_t) {
  return absl::UnimplementedError(
      absl::StrCat(name(), " transport: no shared windows (host collectives are staged through "
                           "device memory; rows between GPUs use CUDA IPC windows)"));
}

}  // namespace joule::ep
