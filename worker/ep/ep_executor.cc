#include "worker/ep/ep_executor.h"

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/status.h"
#include "kernels/cpu/moe.h"

namespace joule::ep {
namespace {

namespace kc = kernels::cpu;

// Stable across processes (unlike absl::Hash), so ranks in different
// processes can compare their placements in the count exchange.
uint64_t PlacementFingerprint(const Placement& p) {
  uint64_t h = 1469598103934665603ull;
  auto mix = [&h](int64_t v) {
    for (int i = 0; i < 8; ++i) {
      h = (h ^ ((static_cast<uint64_t>(v) >> (8 * i)) & 0xff)) * 1099511628211ull;
    }
  };
  mix(p.num_ranks);
  mix(p.num_layers);
  mix(p.num_experts);
  for (const auto& layer : p.replicas) {
    mix(-1);  // layer separator
    for (const auto& ranks : layer) {
      mix(-2 - static_cast<int64_t>(ranks.size()));
      for (int32_t r : ranks) mix(r);
    }
  }
  return h;
}

double SecondsSince(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// A byte buffer handed to the transport. Grows geometrically and registers
// each new allocation (a hint for zero-copy transports), so steady-state
// steps neither allocate nor re-register.
class ExchangeBuffer {
 public:
  absl::Status Reserve(size_t bytes, Transport* transport) {
    if (bytes <= capacity_) return absl::OkStatus();
    capacity_ = std::max(bytes, 2 * capacity_);
    data_.reset(new std::byte[capacity_]);
    return transport->RegisterBuffer(data_.get(), capacity_);
  }
  std::byte* data() { return data_.get(); }

 private:
  std::unique_ptr<std::byte[]> data_;
  size_t capacity_ = 0;
};

// The layout of one MoE layer's exchange. Dispatch computes it; combine reads
// it back in reverse, so the two cannot disagree. Rows sent to rank d are the
// (token, choice) slots routed there, in slot order; rows received from rank p
// sit at recv_offsets[p] in source-rank order and are regrouped by expert for
// the grouped GEMMs.
struct DispatchLayout {
  int layer = -1;
  int world = 0;
  // Sender side: slots (token * top_k + choice) grouped by destination rank.
  std::vector<int32_t> dest;          // [slots] destination rank of each slot
  std::vector<int64_t> send_offsets;  // [world + 1] first row for each destination
  std::vector<int32_t> send_to_slot;  // [slots] send row -> slot
  std::vector<int32_t> slot_to_send;  // [slots] slot -> send row
  // counts[src * world + dst]: rows src sends to dst, identical on every rank.
  std::vector<int64_t> counts;
  // Receiver side.
  std::vector<int64_t> recv_offsets;     // [world + 1] first received row from each source
  std::vector<int32_t> recv_expert;      // [recv rows] expert of each received row
  std::vector<int64_t> expert_offsets;   // [num_experts + 1] received rows grouped by expert
  std::vector<int32_t> grouped_to_recv;  // grouped row -> received row
  std::vector<int32_t> recv_to_grouped;  // received row -> grouped row

  int64_t send_rows() const { return send_offsets[world]; }
  int64_t recv_rows() const { return recv_offsets[world]; }
};

}  // namespace

struct ExpertParallelExecutor::Impl {
  const ModelWeights* weights;
  Transport* transport;
  Placement placement;
  uint64_t fingerprint = 0;
  // Not OK when the placement given to the constructor was refused; every
  // Run then fails (on every rank, through the count exchange).
  absl::Status placement_status;
  kc::CpuStream stream;
  ExpertParallelOptions options;

  DispatchLayout layout;
  std::vector<int64_t> count_row, count_all;
  std::vector<size_t> send_bytes, send_byte_offsets, recv_bytes, recv_byte_offsets;
  // Dispatch sends from `a` into `b`; combine sends from `b` (expert outputs,
  // in received order) back into `a`.
  ExchangeBuffer a, b;
  std::vector<float> grouped, down;
  GroupedExpertBuffers expert_buffers;

  mutable absl::Mutex mu;
  Stats stats ABSL_GUARDED_BY(mu);
  std::vector<std::vector<int64_t>> load ABSL_GUARDED_BY(mu);

  size_t PayloadBytes(int64_t hidden) const {
    return static_cast<size_t>(hidden) * (options.payload == PayloadType::kBF16 ? 2 : 4);
  }
  absl::Status CheckPlacement(const Placement& p) const;
  absl::Status Run(int layer, const float* x, int64_t tokens, const int32_t* expert_ids,
                   const float* weights, float* out);
};

absl::Status ExpertParallelExecutor::Impl::CheckPlacement(const Placement& p) const {
  const ModelConfig& c = weights->config();
  RETURN_IF_ERROR(p.Validate());
  if (p.num_ranks != transport->world_size()) {
    return absl::InvalidArgumentError(absl::StrCat("placement is for ", p.num_ranks,
                                                   " ranks but the transport has ",
                                                   transport->world_size()));
  }
  if (p.num_layers != c.num_layers || p.num_experts != c.num_experts) {
    return absl::InvalidArgumentError(absl::StrCat(
        "placement has ", p.num_layers, " layers of ", p.num_experts, " experts; the model has ",
        c.num_layers, " layers of ", c.num_experts));
  }
  const int me = transport->rank();
  for (int l = 0; l < c.num_layers; ++l) {
    const LayerWeights& L = weights->layers()[l];
    if (!L.is_moe) continue;
    if (p.replicas[l].empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("placement lists no experts for layer ", l, ", a MoE layer"));
    }
    for (int e = 0; e < c.num_experts; ++e) {
      if (p.Holds(me, l, e) && !L.experts[e].loaded) {
        return absl::FailedPreconditionError(absl::StrCat(
            "placement puts layer ", l, " expert ", e, " on rank ", me,
            ", which has not loaded its weights"));
      }
    }
  }
  return absl::OkStatus();
}

ExpertParallelExecutor::ExpertParallelExecutor(const ModelWeights* weights, Transport* transport,
                                               Placement placement, kc::CpuStream stream,
                                               ExpertParallelOptions options)
    : impl_(std::make_unique<Impl>()) {
  impl_->weights = weights;
  impl_->transport = transport;
  impl_->stream = stream;
  impl_->options = options;
  impl_->placement_status = impl_->CheckPlacement(placement);
  impl_->fingerprint = PlacementFingerprint(placement);
  impl_->placement = std::move(placement);
  const ModelConfig& c = weights->config();
  absl::MutexLock lock(&impl_->mu);
  impl_->load.assign(c.num_layers, std::vector<int64_t>(c.num_experts, 0));
}

ExpertParallelExecutor::~ExpertParallelExecutor() = default;

absl::Status ExpertParallelExecutor::SetPlacement(Placement placement) {
  RETURN_IF_ERROR(Annotate(impl_->CheckPlacement(placement), "set placement"));
  impl_->fingerprint = PlacementFingerprint(placement);
  impl_->placement = std::move(placement);
  impl_->placement_status = absl::OkStatus();
  return absl::OkStatus();
}

const Placement& ExpertParallelExecutor::placement() const { return impl_->placement; }

std::vector<std::vector<int64_t>> ExpertParallelExecutor::TakeExpertLoad() {
  absl::MutexLock lock(&impl_->mu);
  std::vector<std::vector<int64_t>> out = impl_->load;
  for (auto& layer : impl_->load) std::fill(layer.begin(), layer.end(), 0);
  return out;
}

ExpertParallelExecutor::Stats ExpertParallelExecutor::stats() const {
  absl::MutexLock lock(&impl_->mu);
  return impl_->stats;
}

absl::Status ExpertParallelExecutor::Run(int layer, const float* x, int64_t tokens,
                                         const int32_t* expert_ids, const float* weights,
                                         float* out) {
  return impl_->Run(layer, x, tokens, expert_ids, weights, out);
}

absl::Status ExpertParallelExecutor::Impl::Run(int layer, const float* x, int64_t tokens,
                                               const int32_t* expert_ids, const float* router_w,
                                               float* out) {
  const ModelConfig& c = weights->config();
  const int W = transport->world_size();
  const int me = transport->rank();
  const int E = c.num_experts;
  const int K = c.num_experts_per_tok;
  const int64_t H = c.hidden_size;
  const bool bf16 = options.payload == PayloadType::kBF16;
  const size_t payload = PayloadBytes(H);
  const size_t dispatch_stride = payload + sizeof(int32_t);  // activations, then the expert id
  auto context = [layer](const char* phase) {
    return absl::StrCat("expert-parallel ", phase, " of layer ", layer);
  };
  const auto t_start = std::chrono::steady_clock::now();

  // Errors found here are not returned before the count exchange: this rank
  // still joins it with a failure flag, so its peers stop at once instead of
  // waiting for it until the transport times out.
  absl::Status local = placement_status;
  if (local.ok() && (layer < 0 || layer >= c.num_layers || !weights->layers()[layer].is_moe)) {
    local = absl::InvalidArgumentError(
        absl::StrCat("layer ", layer, " is not a MoE layer of the model"));
  }
  if (local.ok() && tokens < 0) {
    local = absl::InvalidArgumentError(absl::StrCat("negative token count ", tokens));
  }
  int64_t slots = local.ok() ? tokens * K : 0;
  for (int64_t s = 0; s < slots && local.ok(); ++s) {
    if (expert_ids[s] < 0 || expert_ids[s] >= E) {
      local = absl::InvalidArgumentError(absl::StrCat("token ", s / K, " is routed to expert ",
                                                      expert_ids[s], ", outside [0, ", E, ")"));
    }
  }
  if (!local.ok()) slots = 0;  // send nothing; only the failure flag goes out

  // (a) Sender layout: a replica for every slot, then slots grouped by destination.
  DispatchLayout& L = layout;
  L.layer = layer;
  L.world = W;
  L.dest.resize(slots);
  L.send_offsets.assign(W + 1, 0);
  L.send_to_slot.resize(slots);
  L.slot_to_send.resize(slots);
  for (int64_t s = 0; s < slots; ++s) {
    L.dest[s] = ChooseReplica(placement, layer, expert_ids[s], s / K, me);
  }
  kc::ComputeMoeLayout({.expert_ids = L.dest.data(), .tokens = slots, .top_k = 1, .num_experts = W,
                        .expert_offsets = L.send_offsets.data(),
                        .permuted_to_slot = L.send_to_slot.data(),
                        .slot_to_permuted = L.slot_to_send.data()});

  // (b) Count exchange: each rank's row is [rows to every rank, placement
  // fingerprint, failure flag]; together they form the world x world count
  // matrix every rank needs to size its receives.
  const int row_len = W + 2;
  count_row.assign(row_len, 0);
  for (int d = 0; d < W; ++d) count_row[d] = L.send_offsets[d + 1] - L.send_offsets[d];
  count_row[W] = static_cast<int64_t>(fingerprint);
  count_row[W + 1] = local.ok() ? 0 : 1;
  count_all.resize(static_cast<size_t>(W) * row_len);
  RETURN_IF_ERROR(Annotate(transport->AllGather(count_row.data(), row_len * sizeof(int64_t),
                                                count_all.data()),
                           context("count exchange")));
  if (!local.ok()) return Annotate(local, context("dispatch"));
  for (int p = 0; p < W; ++p) {
    if (count_all[p * row_len + W + 1] != 0) {
      return absl::AbortedError(absl::StrCat(context("dispatch"), ": rank ", p,
                                             " failed this layer (its own error says why)"));
    }
  }
  for (int p = 0; p < W; ++p) {
    if (count_all[p * row_len + W] != static_cast<int64_t>(fingerprint)) {
      return absl::FailedPreconditionError(absl::StrCat(
          context("dispatch"), ": rank ", p, " routes by a different placement than rank ", me,
          " (a new placement must be applied on every rank between the same steps)"));
    }
  }
  L.counts.resize(static_cast<size_t>(W) * W);
  int64_t global_rows = 0;
  for (int p = 0; p < W; ++p) {
    for (int d = 0; d < W; ++d) {
      L.counts[p * W + d] = count_all[p * row_len + d];
      global_rows += L.counts[p * W + d];
    }
  }
  L.recv_offsets.assign(W + 1, 0);
  for (int p = 0; p < W; ++p) L.recv_offsets[p + 1] = L.recv_offsets[p] + L.counts[p * W + me];
  {
    absl::MutexLock lock(&mu);
    std::vector<int64_t>& layer_load = load[layer];
    for (int64_t s = 0; s < slots; ++s) ++layer_load[expert_ids[s]];
  }
  // Every rank sees the same matrix, so all skip the payload exchanges together.
  if (global_rows == 0) {
    absl::MutexLock lock(&mu);
    stats.dispatch_seconds += SecondsSince(t_start);
    return absl::OkStatus();
  }

  // (c) Dispatch: pack [activations, expert id] rows by destination and exchange them.
  const int64_t send_rows = L.send_rows();
  const int64_t recv_rows = L.recv_rows();
  // Each buffer carries dispatch rows one way and (smaller) combine rows back.
  RETURN_IF_ERROR(Annotate(a.Reserve(send_rows * dispatch_stride, transport), context("buffers")));
  RETURN_IF_ERROR(Annotate(b.Reserve(recv_rows * dispatch_stride, transport), context("buffers")));
  const kc::RowType wire = bf16 ? kc::RowType::kBF16 : kc::RowType::kF32;
  kc::LaunchGatherRows({.in = x, .in_type = kc::RowType::kF32, .in_stride_bytes = H * 4,
                        .index = L.send_to_slot.data(), .index_divisor = K, .out = a.data(),
                        .out_type = wire, .out_stride_bytes = static_cast<int64_t>(dispatch_stride),
                        .rows = send_rows, .hidden = H},
                       stream);
  for (int64_t r = 0; r < send_rows; ++r) {
    std::memcpy(a.data() + r * dispatch_stride + payload, &expert_ids[L.send_to_slot[r]],
                sizeof(int32_t));
  }
  send_bytes.resize(W);
  send_byte_offsets.resize(W);
  recv_bytes.resize(W);
  recv_byte_offsets.resize(W);
  uint64_t dispatch_peer_bytes = 0;
  for (int p = 0; p < W; ++p) {
    send_bytes[p] = (L.send_offsets[p + 1] - L.send_offsets[p]) * dispatch_stride;
    send_byte_offsets[p] = L.send_offsets[p] * dispatch_stride;
    recv_bytes[p] = (L.recv_offsets[p + 1] - L.recv_offsets[p]) * dispatch_stride;
    recv_byte_offsets[p] = L.recv_offsets[p] * dispatch_stride;
    if (p != me) dispatch_peer_bytes += send_bytes[p];
  }
  RETURN_IF_ERROR(Annotate(
      transport->AllToAllV(a.data(), send_bytes.data(), send_byte_offsets.data(), b.data(),
                           recv_bytes.data(), recv_byte_offsets.data()),
      context("dispatch")));
  const double dispatch_seconds = SecondsSince(t_start);

  // (d) Received rows grouped by expert (stable: source rank, then the
  // source's slot order), then the grouped SwiGLU exactly as the local executor runs it.
  L.recv_expert.resize(recv_rows);
  for (int64_t r = 0; r < recv_rows; ++r) {
    std::memcpy(&L.recv_expert[r], b.data() + r * dispatch_stride + payload, sizeof(int32_t));
  }
  const LayerWeights& LW = weights->layers()[layer];
  for (int64_t r = 0; r < recv_rows; ++r) {
    const int32_t e = L.recv_expert[r];
    if (e < 0 || e >= E || !LW.experts[e].loaded) {
      // Unreachable while placements agree (checked above) and SetPlacement
      // checked the weights; peers then time out in combine.
      return absl::InternalError(absl::StrCat(context("dispatch"), ": received a row for expert ", e,
                                              " which rank ", me, " does not hold"));
    }
  }
  L.expert_offsets.resize(E + 1);
  L.grouped_to_recv.resize(recv_rows);
  L.recv_to_grouped.resize(recv_rows);
  kc::ComputeMoeLayout({.expert_ids = L.recv_expert.data(), .tokens = recv_rows, .top_k = 1,
                        .num_experts = E, .expert_offsets = L.expert_offsets.data(),
                        .permuted_to_slot = L.grouped_to_recv.data(),
                        .slot_to_permuted = L.recv_to_grouped.data()});
  grouped.resize(recv_rows * H);
  kc::LaunchGatherRows({.in = b.data(), .in_type = wire,
                        .in_stride_bytes = static_cast<int64_t>(dispatch_stride),
                        .index = L.grouped_to_recv.data(), .out = grouped.data(),
                        .out_type = kc::RowType::kF32, .out_stride_bytes = H * 4,
                        .rows = recv_rows, .hidden = H},
                       stream);
  down.resize(recv_rows * H);
  RETURN_IF_ERROR(Annotate(RunGroupedExperts(LW, layer, grouped.data(), L.expert_offsets.data(), E,
                                             down.data(), &expert_buffers, stream),
                           context("experts")));

  // (e) Combine: outputs go back in received order, the dispatch layout reversed.
  const auto t_combine = std::chrono::steady_clock::now();
  kc::LaunchGatherRows({.in = down.data(), .in_type = kc::RowType::kF32, .in_stride_bytes = H * 4,
                        .index = L.recv_to_grouped.data(), .out = b.data(), .out_type = wire,
                        .out_stride_bytes = static_cast<int64_t>(payload), .rows = recv_rows,
                        .hidden = H},
                       stream);
  uint64_t combine_peer_bytes = 0;
  for (int p = 0; p < W; ++p) {
    send_bytes[p] = (L.recv_offsets[p + 1] - L.recv_offsets[p]) * payload;
    send_byte_offsets[p] = L.recv_offsets[p] * payload;
    recv_bytes[p] = (L.send_offsets[p + 1] - L.send_offsets[p]) * payload;
    recv_byte_offsets[p] = L.send_offsets[p] * payload;
    if (p != me) combine_peer_bytes += send_bytes[p];
  }
  RETURN_IF_ERROR(Annotate(
      transport->AllToAllV(b.data(), send_bytes.data(), send_byte_offsets.data(), a.data(),
                           recv_bytes.data(), recv_byte_offsets.data()),
      context("combine")));

  // (f) Weighted un-permute with the same kernel as the local executor: each
  // token's top_k contributions are added in choice order, so the result does
  // not depend on where the experts ran.
  // BF16 rows are widened inside the un-permute, with no intermediate copy.
  kc::UnpermuteParams unpermute{.slot_to_permuted = L.slot_to_send.data(), .weights = router_w,
                                .tokens = tokens, .top_k = K, .hidden = H, .out = out,
                                .accumulate = true};
  if (bf16) {
    unpermute.expert_out_bf16 = reinterpret_cast<const uint16_t*>(a.data());
  } else {
    unpermute.expert_out = reinterpret_cast<const float*>(a.data());
  }
  kc::LaunchUnpermute(unpermute, stream);

  absl::MutexLock lock(&mu);
  stats.dispatch_bytes += dispatch_peer_bytes;
  stats.combine_bytes += combine_peer_bytes;
  stats.dispatch_seconds += dispatch_seconds;
  stats.combine_seconds += SecondsSince(t_combine);
  return absl::OkStatus();
}

}  // namespace joule::ep
