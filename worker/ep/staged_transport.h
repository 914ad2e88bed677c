// StagedTransport: host-memory collectives over a device-memory transport.
//
// NCCL moves device memory only, but most of a worker's collectives pass host
// buffers: the lockstep token counts, the control round, the expert-parallel
// count exchange and barriers. This transport owns a device transport (NCCL)
// and stages each call through device buffers of a device::Backend: the host
// input is copied in, the inner collective runs on device memory, the result
// is copied back. Callers that already hold device buffers (expert rows) use
// device_transport() directly.
//
// The staging buffers grow geometrically and are kept, so calls of sizes seen
// before allocate nothing. All-to-all-v first all-gathers every rank's counts
// (one small extra collective): a device transport cannot detect counts that
// disagree pairwise (NCCL would hang or overrun), so this one does, as the
// Transport contract asks: the ranks of a mismatched pair get InvalidArgument
// naming each other, that pair moves nothing, every other pair completes and
// the group stays usable. A call may therefore wait up to twice the timeout.
//
// Copies run on a copy stream of the backend (Backend::CreateCopyStream),
// which each call synchronizes: a collective waits for its own copies, not
// for the kernels queued on the model's stream (with two-batch overlap, the
// other micro-batch's). Call from the thread that owns the backend (the step
// loop), never during a graph capture. The backend must outlive the
// transport. MapSharedWindows is Unimplemented: rows between GPUs use CUDA
// IPC windows, not this class.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "worker/device/backend.h"
#include "worker/ep/transport.h"

namespace joule::ep {

class StagedTransport final : public Transport {
 public:
  // `inner` moves device memory of `backend` (not owned).
  StagedTransport(std::unique_ptr<Transport> inner, device::Backend* backend);
  ~StagedTransport() override;

  int rank() const override { return inner_->rank(); }
  int world_size() const override { return inner_->world_size(); }
  MemoryKind memory_kind() const override { return MemoryKind::kHost; }
  std::string name() const override { return inner_->name() + "+staged"; }

  absl::Status AllGather(const void* in, size_t bytes, void* out) override;
  absl::Status AllToAllV(const void* send, const size_t* send_counts, const size_t* send_offsets,
                         void* recv, const size_t* recv_counts,
                         const size_t* recv_offsets) override;
  absl::StatusOr<std::unique_ptr<SharedWindows>> MapSharedWindows(size_t bytes) override;
  // Forwards to the inner transport (thread-safe as it is).
  void Interrupt(const std::string& reason) override { inner_->Interrupt(reason); }

  // The device-memory transport underneath, for callers with device buffers.
  // Owned by this one; its collectives and this one's share the group's
  // lockstep sequence.
  Transport* device_transport() const { return inner_.get(); }

  // Staging allocations made so far, and the device bytes they now hold.
  int64_t staging_allocations() const { return allocations_; }
  size_t staging_bytes() const { return gather_.bytes() + send_.bytes() + recv_.bytes(); }

 private:
  // `buffer` holds at least `bytes` afterwards (doubling; contents not kept).
  absl::Status Reserve(device::Buffer& buffer, size_t bytes);
  // Copies runs of chunks between host and device memory on the copy stream
  // and waits for them (see .cc); nothing without chunks.
  struct Chunk {
    size_t host_offset;
    size_t device_offset;
    size_t bytes;
  };
  absl::Status Stage(std::span<const Chunk> chunks, const void* src_base, void* dst_base,
                     bool to_device);
  // OK unless broken; makes the copy stream on first use.
  absl::Status Ready();
  // Marks the transport broken by a local staging failure (peers time out).
  absl::Status Broken(absl::Status status);

  std::unique_ptr<Transport> inner_;
  device::Backend* const backend_;
  std::unique_ptr<device::CopyStream> copies_;  // every staging copy
  absl::Status broken_;  // a staging copy failed: every later call fails fast
  int64_t allocations_ = 0;
  device::Buffer gather_;  // all-gathers, in place
  device::Buffer send_;    // all-to-all-v, packed by destination
  device::Buffer recv_;    // all-to-all-v, packed by source
  // Host scratch reused by every all-to-all-v.
  std::vector<uint64_t> my_counts_;   // this rank's send counts, then recv counts
  std::vector<uint64_t> all_counts_;  // every rank's, by rank
  std::vector<size_t> send_counts_, send_offsets_, recv_counts_, recv_offsets_;
  std::vector<Chunk> send_chunks_, recv_chunks_;
};

}  // namespace joule::ep
