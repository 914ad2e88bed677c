// How the experts' outputs go back to each token's rank and are added up
// there: one strategy per payload type, chosen once per executor (vLLM's
// weight-and-reduce step as an object, not a branch in every stage).
//   BF16 (halves the bytes): the rank that ran a token's experts sums their
//     weighted outputs (F32, in expert order, inside the down projection) and
//     sends one BF16 row back per received row; the source adds its ranks'
//     partial sums.
//   F32: one unweighted row per expert choice goes back and the source
//     un-permutes them in choice order, as the local executor does, so
//     results stay bit for bit the single-process engine's.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/cpu/thread_pool.h"
#include "worker/device/backend.h"
#include "worker/ep/dispatch_layout.h"
#include "worker/ep/transport.h"
#include "worker/model/experts.h"

namespace joule::ep {

enum class PayloadType { kF32, kBF16 };

// One layer's exchange as dispatch left it.
struct Exchange {
  DispatchLayout* layout = nullptr;
  int64_t hidden = 0;
  // Through shared windows (ranks on one host): rows are written straight
  // into peers' memory and a barrier stands in for each all-to-all.
  bool direct = false;
  const std::byte* received = nullptr;  // the dispatch rows this rank received
  size_t dispatch_stride = 0;           // bytes between them
  // All-to-all path: dispatch sends from `a` into `b`, combine from `b` back
  // into `a`; rows for this rank itself skip the transport.
  ExchangeBuffer* a = nullptr;
  ExchangeBuffer* b = nullptr;
  SharedWindows* win_a = nullptr;  // shared-window path: combine rows land here
  Transport* transport = nullptr;
  kernels::cpu::CpuStream stream;
};

class CombineStrategy {
 public:
  virtual ~CombineStrategy() = default;
  // The element type of the rows dispatch sends and combine returns.
  virtual kernels::RowType payload_type() const = 0;
  size_t PayloadBytes(int64_t hidden) const {
    return static_cast<size_t>(hidden) * kernels::ElementBytes(payload_type());
  }
  // Bytes of `a` the returning rows need on the all-to-all path.
  virtual size_t ReturnBytes(const DispatchLayout& layout, int64_t hidden) const = 0;
  // Runs this rank's experts over the received rows (`rows`, grouped by
  // expert), leaving their outputs where combine sends them from.
  virtual absl::Status RunExperts(const Exchange& x, const GroupedInput& rows,
                                  device::Backend& backend, const ExpertsView& experts,
                                  GroupedExpertBuffers* buffers) = 0;
  // The combine exchange's byte counts; gathers the rows it sends where they
  // are not in place yet. Returns the bytes sent to peers.
  virtual absl::StatusOr<uint64_t> PrepareReturn(const Exchange& x, ExchangeBytes* bytes) = 0;
  // Adds the returned rows into out [tokens, hidden].
  virtual void Reduce(const Exchange& x, const std::byte* returned, const float* router_weights,
                      int64_t tokens, int top_k, float* out) = 0;
};

std::unique_ptr<CombineStrategy> MakeCombineStrategy(PayloadType payload);

}  // namespace joule::ep
