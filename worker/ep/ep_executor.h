// Expert parallelism: routed experts run on the ranks that hold them.
//
// Per MoE layer, in stages: the dispatch layout (a replica for every (token,
// expert) pair, one row per token and destination rank however many of its
// experts live there; dispatch_layout.h), the count exchange, dispatch (pack
// and all-to-all-v, or writes into peers' shared windows), the local experts
// grouped, combine (the outputs back) and the reduce into the token's output
// (combine.h: one strategy per payload type). The layout computed for
// dispatch is the handle combine consumes, so the two can never disagree.
#pragma once

#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "common/placement.h"
#include "kernels/cpu/thread_pool.h"
#include "worker/ep/combine.h"
#include "worker/ep/transport.h"
#include "worker/model/device_expert_store.h"
#include "worker/model/device_weights.h"
#include "worker/model/experts.h"
#include "worker/model/weights.h"

namespace joule::ep {

// Payload precision of dispatched activations and combined expert outputs.
// kF32 reproduces the local executor bit for bit; kBF16 halves the bytes and
// rounds both (round-to-nearest-even), so results then differ from a
// single-process run by BF16 rounding. With kBF16 the rank that ran a token's
// experts also sums their weighted outputs before combine (one row back per
// token instead of one per expert); the rounding is of that sum.
// A GPU worker's executor (absent: the host path on the CPU threads of the
// executor's stream): rows stay in the backend's device memory and the
// experts run there (device_stages.h says how rows move).
struct ExpertParallelDevice {
  device::Backend* backend = nullptr;  // not host memory (a GPU; the fake device)
  // The model's weights on the device, and the host weights they mirror: the
  // executor uses their experts when it is given those host weights, and
  // uploads the experts it holds itself otherwise (a reloaded placement).
  const DeviceWeights* resident = nullptr;
  const ModelWeights* resident_host = nullptr;
  // Where executors over other weights (a reloaded placement) get their
  // experts: one store per worker keeps the copies a new placement shares
  // with the last. Null: each such executor uploads its own.
  std::shared_ptr<DeviceExpertStore> experts;
  Transport* row_transport = nullptr;  // device memory (NCCL), or null
};

struct ExpertParallelOptions {
  PayloadType payload = PayloadType::kBF16;
  // BF16 only: when the transport maps shared windows (ranks on one host),
  // write dispatch and combine rows straight into peers' memory, a barrier in
  // place of each all-to-all; otherwise, or when it cannot, all-to-all-v.
  // Every rank must agree (the count exchange refuses a mix).
  bool shared_windows = true;
  // Two-batch overlap: each MoE layer's tokens run as two micro-batches
  // whose phases interleave on the device, so one's host waits (exchanges,
  // barriers) overlap the other's kernels. On the host path the two run one
  // after the other (same results, no overlap). Every rank must agree (the
  // count exchange refuses a mix).
  bool two_batch_overlap = false;
  // With two_batch_overlap: a layer splits only when the previous MoE layer
  // moved at least this many rows over all ranks (every rank saw the same
  // count matrix, so all decide alike without a message); 0: every layer.
  int64_t two_batch_min_rows = 0;
  ExpertParallelDevice device;
};

class ExpertParallelExecutor : public ExpertExecutor {
 public:
  // weights must hold (at least) every expert the placement gives this rank;
  // the transport carries the host-memory collectives (counts, barriers);
  // if not (or the placement is invalid), every Run fails with that error on
  // this rank and Aborted on its peers. Neither weights nor transport is owned.
  ExpertParallelExecutor(const ModelWeights* weights, Transport* transport, Placement placement,
                         kernels::cpu::CpuStream stream, ExpertParallelOptions options = {});
  ~ExpertParallelExecutor() override;

  // Collective: every rank calls it for the same layers in the same order,
  // also with tokens == 0. Pointers are the model backend's memory (device
  // memory with options.device). A transport error comes back annotated with the
  // layer; a rank that fails before the exchange makes its peers fail too.
  absl::Status Run(int layer, const float* x, int64_t tokens, const int32_t* expert_ids,
                   const float* weights, float* out) override;

  // Why every Run fails on this rank (a placement it cannot serve, a device
  // that could not be set up); OK otherwise.
  absl::Status status() const;

  // Applies a new placement; call between steps only, on every rank.
  // FailedPrecondition if this rank does not hold weights the placement needs.
  absl::Status SetPlacement(Placement placement);
  const Placement& placement() const;

  // Tokens this rank routed to each expert since the last call, [layer][expert]
  // (what workers report for EPLB), and resets the counts.
  std::vector<std::vector<int64_t>> TakeExpertLoad();

  // Cumulative since construction. Bytes are payload bytes this rank sent to
  // other ranks (rows for itself are written in place and not counted); dispatch
  // seconds cover layout, count exchange, packing and the dispatch
  // all-to-all, combine seconds the combine all-to-all (or barrier) and the
  // un-permute, with kF32 also packing the expert outputs. Expert compute is
  // in neither, and with kBF16 neither is the combine's packing: each
  // token's weighted sum is summed and rounded into the row that goes back
  // inside the experts' down projection.
  struct Stats {
    uint64_t dispatch_bytes = 0;
    uint64_t combine_bytes = 0;
    double dispatch_seconds = 0;
    double combine_seconds = 0;
    uint64_t two_batch_layers = 0;  // layer calls run as two micro-batches
  };
  Stats stats() const;

  // Collective, on every rank of a group that goes on: frees the shared
  // windows so no rank frees memory a peer still has mapped (CUDA IPC calls
  // that undefined). The executor must not run again after it. The
  // destructor alone suffices where the group broke or at exit.
  absl::Status ReleaseWindows();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace joule::ep
