#include "worker/ep/ep_executor.h"

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/logging.h"
#include "common/status.h"
#include "kernels/cpu/moe.h"
#include "worker/device/cpu_backend.h"

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
    data_ = AllocateHostBuffer(capacity_);
    return transport->RegisterBuffer(data_.get(), capacity_);
  }
  std::byte* data() { return data_.get(); }

 private:
  HostBuffer data_;
  size_t capacity_ = 0;
};

// The layout of one MoE layer's exchange. Dispatch computes it; combine reads
// it back in reverse, so the two cannot disagree.
//
// A token goes to each destination rank once, however many of its top_k
// experts live there (DeepEP's dedup: with top-k 8 over EP 2 that is 4x fewer
// bytes). A send row is [activations, expert id x top_k, router weight x
// top_k]: the ids and weights of the token's choices on that rank in choice
// order, the unused entries id -1. Send rows are grouped by destination, in
// token order; received rows sit at recv_offsets[p] in source-rank order.
// The receiver expands each row into one "choice" per expert it names,
// regroups the choices by expert for the grouped GEMMs, and combines:
//   BF16 payload: each received row's weighted expert outputs are summed (F32,
//     in expert order, inside the down projection) on the rank that ran them
//     and one BF16 row goes back per send row; the source adds its ranks'
//     partial sums.
//   F32 payload: one unweighted row per choice goes back and the source
//     un-permutes them in choice order, as the local executor does, so results
//     stay bit for bit the same.
struct DispatchLayout {
  int layer = -1;
  int world = 0;
  // Sender side.
  std::vector<int32_t> dest;                 // [slots] destination rank of each slot
  std::vector<int64_t> send_offsets;         // [world + 1] first send row for each destination
  std::vector<int32_t> send_to_token;        // [send rows] token of each send row
  std::vector<int64_t> send_copy_of;         // [send rows] the token's first send row, or -1
  std::vector<int64_t> send_choice_offsets;  // [send rows + 1] first choice of each send row
  std::vector<int32_t> slot_row;             // [slots] send row carrying each slot
  std::vector<int32_t> slot_to_choice;       // [slots] sender-side choice index of each slot
  std::vector<int64_t> token_row_offsets;    // [tokens + 1] send rows of each token ...
  std::vector<int32_t> token_rows;           // ... in the order its choices first reach a rank
  // counts[src * world + dst]: rows src sends to dst, identical on every rank.
  std::vector<int64_t> counts;
  // Receiver side.
  std::vector<int64_t> recv_offsets;         // [world + 1] first received row from each source
  std::vector<int64_t> row_choice_offsets;   // [recv rows + 1] first choice of each received row
  std::vector<int32_t> choice_expert;        // [choices] expert of each choice
  std::vector<float> choice_weight;          // [choices] router weight of each choice
  std::vector<int32_t> choice_row;           // [choices] received row of each choice
  std::vector<int64_t> expert_offsets;       // [num_experts + 1] choices grouped by expert
  std::vector<int32_t> grouped_to_choice;    // grouped row -> choice
  std::vector<int32_t> choice_to_grouped;    // choice -> grouped row
  std::vector<int32_t> grouped_to_row;       // grouped row -> received row
  std::vector<float> grouped_weight;         // [choices] router weight of each grouped row

  int64_t send_rows() const { return send_offsets[world]; }
  int64_t recv_rows() const { return recv_offsets[world]; }
};

// Rows [0, n) written by fn(begin, end, dst) in up to three ranges: this
// rank's own rows [self_begin, self_end) land at self_dst (row self_begin
// first) — straight where the receiving side reads them, so they skip the
// transport and its copy — the others at peer + row * stride.
template <typename Fn>
void WriteRowsSplitSelf(int64_t n, int64_t self_begin, int64_t self_end, std::byte* peer,
                        size_t stride, std::byte* self_dst, Fn fn) {
  if (self_begin > 0) fn(0, self_begin, peer);
  if (self_end > self_begin) fn(self_begin, self_end, self_dst);
  if (n > self_end) fn(self_end, n, peer + self_end * stride);
}

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
  // The experts run through the execution seam on this rank's CPU threads
  // (GPU expert parallelism is "GPU workers, part 2").
  std::unique_ptr<device::CpuBackend> backend;
  std::vector<std::vector<const void*>> expert_tables;  // [layer] pointers of the held experts
  std::vector<ExpertsView> experts;                     // [layer]
  ExpertParallelOptions options;

  DispatchLayout layout;
  std::vector<int64_t> count_row, count_all;
  std::vector<int32_t> rank_token, rank_row;  // [world] per-token scratch of the layout
  std::vector<size_t> send_bytes, send_byte_offsets, recv_bytes, recv_byte_offsets;
  // Dispatch sends from `a` into `b`; combine sends from `b` (expert outputs,
  // in received order) back into `a`. Rows for this rank itself are written
  // straight into the other buffer.
  ExchangeBuffer a, b;
  // With shared windows (ranks on one host, BF16) the exchanges become
  // writes into peers' memory: dispatch rows into each destination's
  // `win_b`, combine rows into each source's `win_a`, a barrier after each.
  std::unique_ptr<SharedWindows> win_a, win_b;
  bool windows_off = false;  // the transport cannot map them (or options say no)
  std::vector<std::byte*> row_ptr;  // [send rows] where each dispatch row is written
  std::vector<float> down;                  // F32: expert outputs, one row per choice
  std::vector<std::byte*> combine_row;      // BF16: [received rows] where each combine row goes
  std::vector<std::byte*> chunk_row;        // BF16: the same, at one column chunk
  GroupedExpertBuffers expert_buffers;

  mutable absl::Mutex mu;
  Stats stats ABSL_GUARDED_BY(mu);
  std::vector<std::vector<int64_t>> load ABSL_GUARDED_BY(mu);

  size_t PayloadBytes(int64_t hidden) const {
    return static_cast<size_t>(hidden) * (options.payload == PayloadType::kBF16 ? 2 : 4);
  }
  absl::Status CheckPlacement(const Placement& p) const;
  // Windows of at least a_bytes / b_bytes on every rank (grown together:
  // every rank passes the same sizes); false once they are off. Collective.
  absl::StatusOr<bool> EnsureWindows(size_t a_bytes, size_t b_bytes);
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

absl::StatusOr<bool> ExpertParallelExecutor::Impl::EnsureWindows(size_t a_bytes, size_t b_bytes) {
  if (windows_off) return false;
  for (auto [win, need] : {std::pair{&win_a, a_bytes}, std::pair{&win_b, b_bytes}}) {
    if (*win != nullptr && (*win)->bytes() >= need) continue;
    const size_t grown = std::max(need, *win == nullptr ? size_t{0} : 2 * (*win)->bytes());
    win->reset();
    absl::StatusOr<std::unique_ptr<SharedWindows>> mapped = transport->MapSharedWindows(grown);
    if (absl::IsUnimplemented(mapped.status())) {  // the same answer on every rank
      JOULE_LOG(Info) << "rank " << transport->rank()
                      << ": expert-parallel dispatch/combine through all-to-all-v ("
                      << mapped.status().message() << ")";
      windows_off = true;
      win_a.reset();
      win_b.reset();
      return false;
    }
    if (!mapped.ok()) return mapped.status();
    if (win_a == nullptr && win_b == nullptr) {
      JOULE_LOG(Info) << "rank " << transport->rank()
                      << ": expert-parallel dispatch/combine write into peers' shared windows";
    }
    *win = *std::move(mapped);
  }
  return true;
}

ExpertParallelExecutor::ExpertParallelExecutor(const ModelWeights* weights, Transport* transport,
                                               Placement placement, kc::CpuStream stream,
                                               ExpertParallelOptions options)
    : impl_(std::make_unique<Impl>()) {
  impl_->weights = weights;
  impl_->transport = transport;
  impl_->stream = stream;
  impl_->backend = std::make_unique<device::CpuBackend>(stream);
  impl_->expert_tables.resize(weights->layers().size());
  for (size_t l = 0; l < weights->layers().size(); ++l) {
    impl_->experts.push_back(ViewExperts(weights->layers()[l], &impl_->expert_tables[l]));
  }
  impl_->options = options;
  impl_->windows_off = !options.shared_windows || options.payload != PayloadType::kBF16;
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
  // Activations, then top_k expert ids and top_k router weights.
  const size_t dispatch_stride = payload + 2 * K * sizeof(int32_t);
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

  // (a) Sender layout: a replica for every slot, then one send row per
  // (token, destination rank), grouped by destination.
  DispatchLayout& L = layout;
  L.layer = layer;
  L.world = W;
  L.dest.resize(slots);
  for (int64_t s = 0; s < slots; ++s) {
    L.dest[s] = ChooseReplica(placement, layer, expert_ids[s], s / K, me);
  }
  const int64_t send_tokens = slots / K;
  L.send_offsets.assign(W + 1, 0);
  rank_token.assign(W, -1);
  for (int64_t s = 0; s < slots; ++s) {
    const int32_t d = L.dest[s];
    if (rank_token[d] != s / K) {
      rank_token[d] = static_cast<int32_t>(s / K);
      ++L.send_offsets[d + 1];
    }
  }
  for (int d = 0; d < W; ++d) L.send_offsets[d + 1] += L.send_offsets[d];
  const int64_t send_rows = L.send_offsets[W];
  L.send_to_token.resize(send_rows);
  L.send_copy_of.resize(send_rows);
  L.send_choice_offsets.assign(send_rows + 1, 0);
  L.slot_row.resize(slots);
  L.slot_to_choice.resize(slots);
  L.token_row_offsets.resize(send_tokens + 1);
  L.token_rows.resize(send_rows);
  rank_token.assign(W, -1);
  rank_row.assign(L.send_offsets.begin(), L.send_offsets.end() - 1);  // next free row per rank
  int64_t token_row = 0;
  for (int64_t t = 0; t < send_tokens; ++t) {
    L.token_row_offsets[t] = token_row;
    for (int k = 0; k < K; ++k) {
      const int64_t s = t * K + k;
      const int32_t d = L.dest[s];
      if (rank_token[d] != t) {
        rank_token[d] = static_cast<int32_t>(t);
        const int32_t row = rank_row[d]++;
        L.send_to_token[row] = static_cast<int32_t>(t);
        const int64_t first = L.token_row_offsets[t];
        L.send_copy_of[row] = token_row == first ? -1 : L.token_rows[first];
        L.token_rows[token_row++] = row;
      }
      const int32_t row = rank_row[d] - 1;  // this token's row for d, taken above or earlier
      L.slot_row[s] = row;
      L.slot_to_choice[s] = static_cast<int32_t>(L.send_choice_offsets[row + 1]++);  // index in row
    }
  }
  L.token_row_offsets[send_tokens] = token_row;
  for (int64_t r = 0; r < send_rows; ++r) L.send_choice_offsets[r + 1] += L.send_choice_offsets[r];
  for (int64_t s = 0; s < slots; ++s) L.slot_to_choice[s] += L.send_choice_offsets[L.slot_row[s]];

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

  // (c) Dispatch: pack [activations, expert ids, router weights] rows by
  // destination and exchange them; this rank's own rows go straight into `b`.
  const int64_t recv_rows = L.recv_rows();
  const int64_t send_choices = L.send_choice_offsets[send_rows];
  const size_t f32_row = static_cast<size_t>(H) * sizeof(float);
  // Rank p's rows for rank d sit at row RowsBefore(p, d) of its send layout;
  // rank d receives them at row RowsFrom(d, p) (sources in rank order).
  auto rows_before = [&](int p, int d) {
    int64_t r = 0;
    for (int q = 0; q < d; ++q) r += L.counts[p * W + q];
    return r;
  };
  auto rows_from = [&](int d, int p) {
    int64_t r = 0;
    for (int q = 0; q < p; ++q) r += L.counts[q * W + d];
    return r;
  };
  // Windows are sized for the rank that needs the most (all ranks agree).
  size_t win_a_bytes = 0, win_b_bytes = 0;
  for (int r = 0; r < W; ++r) {
    win_a_bytes = std::max<size_t>(win_a_bytes, rows_before(r, W) * payload);
    win_b_bytes = std::max<size_t>(win_b_bytes, rows_from(r, W) * dispatch_stride);
  }
  absl::StatusOr<bool> windows = EnsureWindows(win_a_bytes, win_b_bytes);
  if (!windows.ok()) return Annotate(windows.status(), context("shared windows"));
  const bool direct = *windows;
  if (!direct) {
    // `a` also receives the combine rows: one per send row (BF16), one per choice (F32).
    const size_t a_bytes = std::max(send_rows * dispatch_stride,
                                    bf16 ? send_rows * payload : send_choices * f32_row);
    RETURN_IF_ERROR(Annotate(a.Reserve(a_bytes, transport), context("buffers")));
    RETURN_IF_ERROR(Annotate(b.Reserve(recv_rows * dispatch_stride, transport), context("buffers")));
  }
  std::byte* const recv_base = direct ? win_b->at(me) : b.data();
  const kc::RowType wire = bf16 ? kc::RowType::kBF16 : kc::RowType::kF32;
  const int64_t self_send = L.send_offsets[me];
  // Where each send row goes: the destination's window, or `a` (this rank's
  // own rows straight into `b`) for the all-to-all.
  row_ptr.resize(send_rows);
  for (int d = 0; d < W; ++d) {
    std::byte* base = direct ? win_b->at(d) + rows_from(d, me) * dispatch_stride
                      : d == me ? b.data() + L.recv_offsets[me] * dispatch_stride
                                : a.data() + L.send_offsets[d] * dispatch_stride;
    for (int64_t r = L.send_offsets[d]; r < L.send_offsets[d + 1]; ++r) {
      row_ptr[r] = base + (r - L.send_offsets[d]) * dispatch_stride;
    }
  }
  // A token going to several ranks is converted (BF16: rounded) once, into
  // its first row, and copied from there into the others.
  kc::LaunchGatherRows({.in = x, .in_type = kc::RowType::kF32, .in_stride_bytes = H * 4,
                        .index = L.send_to_token.data(), .out_type = wire,
                        .rows = send_rows, .hidden = H, .out_rows = row_ptr.data(),
                        .copy_of = L.send_copy_of.data()},
                       stream);
  constexpr int32_t kUnused = -1;
  for (int64_t r = 0; r < send_rows; ++r) {
    std::byte* ids = row_ptr[r] + payload;
    for (int j = 0; j < K; ++j) std::memcpy(ids + j * sizeof(int32_t), &kUnused, sizeof(int32_t));
  }
  for (int64_t s = 0; s < slots; ++s) {
    const int64_t row = L.slot_row[s];
    const int64_t j = L.slot_to_choice[s] - L.send_choice_offsets[row];
    std::byte* meta = row_ptr[row] + payload;
    std::memcpy(meta + j * sizeof(int32_t), &expert_ids[s], sizeof(int32_t));
    std::memcpy(meta + (K + j) * sizeof(int32_t), &router_w[s], sizeof(float));
  }
  send_bytes.resize(W);
  send_byte_offsets.resize(W);
  recv_bytes.resize(W);
  recv_byte_offsets.resize(W);
  uint64_t dispatch_peer_bytes = 0;
  for (int p = 0; p < W; ++p) {
    const bool peer = p != me;  // rows for this rank itself are already in place
    send_bytes[p] = peer ? (L.send_offsets[p + 1] - L.send_offsets[p]) * dispatch_stride : 0;
    send_byte_offsets[p] = L.send_offsets[p] * dispatch_stride;
    recv_bytes[p] = peer ? (L.recv_offsets[p + 1] - L.recv_offsets[p]) * dispatch_stride : 0;
    recv_byte_offsets[p] = L.recv_offsets[p] * dispatch_stride;
    dispatch_peer_bytes += send_bytes[p];
  }
  RETURN_IF_ERROR(Annotate(
      direct ? transport->Barrier()  // every rank's rows are in place once all have written
             : transport->AllToAllV(a.data(), send_bytes.data(), send_byte_offsets.data(),
                                    b.data(), recv_bytes.data(), recv_byte_offsets.data()),
      context("dispatch")));
  const double dispatch_seconds = SecondsSince(t_start);

  // (d) Every received row becomes one choice per expert it names; choices
  // are grouped by expert (stable: source rank, then the source's token and
  // choice order), then the grouped SwiGLU exactly as the local executor runs it.
  const LayerWeights& LW = weights->layers()[layer];
  L.row_choice_offsets.resize(recv_rows + 1);
  L.choice_expert.clear();
  L.choice_weight.clear();
  L.choice_row.clear();
  for (int64_t r = 0; r < recv_rows; ++r) {
    L.row_choice_offsets[r] = static_cast<int64_t>(L.choice_expert.size());
    const std::byte* meta = recv_base + r * dispatch_stride + payload;
    for (int j = 0; j < K; ++j) {
      int32_t e;
      std::memcpy(&e, meta + j * sizeof(int32_t), sizeof(int32_t));
      if (e == -1) break;
      if (e < 0 || e >= E || !LW.experts[e].loaded) {
        // Unreachable while placements agree (checked above) and SetPlacement
        // checked the weights; peers then time out in combine.
        return absl::InternalError(absl::StrCat(context("dispatch"),
                                                ": received a row for expert ", e, " which rank ",
                                                me, " does not hold"));
      }
      float w;
      std::memcpy(&w, meta + (K + j) * sizeof(int32_t), sizeof(float));
      L.choice_expert.push_back(e);
      L.choice_weight.push_back(w);
      L.choice_row.push_back(static_cast<int32_t>(r));
    }
  }
  const int64_t recv_choices = static_cast<int64_t>(L.choice_expert.size());
  L.row_choice_offsets[recv_rows] = recv_choices;
  L.expert_offsets.resize(E + 1);
  L.grouped_to_choice.resize(recv_choices);
  L.choice_to_grouped.resize(recv_choices);
  kc::ComputeMoeLayout({.expert_ids = L.choice_expert.data(), .tokens = recv_choices, .top_k = 1,
                        .num_experts = E, .expert_offsets = L.expert_offsets.data(),
                        .permuted_to_slot = L.grouped_to_choice.data(),
                        .slot_to_permuted = L.choice_to_grouped.data()});
  L.grouped_to_row.resize(recv_choices);
  for (int64_t g = 0; g < recv_choices; ++g) {
    L.grouped_to_row[g] = L.choice_row[L.grouped_to_choice[g]];
  }
  // BF16: each received row's weighted sum is fused into the down
  // projection, which runs in column chunks; every finished chunk is rounded
  // straight into the row that goes back (a peer's window, or the combine
  // send buffer) while it is in cache, so the F32 sums never reach memory.
  const int64_t self_recv_row = L.recv_offsets[me], self_recv_end = L.recv_offsets[me + 1];
  FusedCombine fused;
  if (bf16) {
    L.grouped_weight.resize(recv_choices);
    for (int64_t g = 0; g < recv_choices; ++g) {
      L.grouped_weight[g] = L.choice_weight[L.grouped_to_choice[g]];
    }
    // Where received row r's combine row goes: rank p's rows straight into
    // its window where its own combine reads them (row RowsBefore(p, me) on);
    // otherwise as the all-to-all sends them, from `b` in received order, but
    // this rank's own rows straight into `a`. `b` already holds recv_rows
    // dispatch rows, longer than combine rows, and the gate/up projections
    // are done with the received rows before the first chunk lands on them.
    combine_row.resize(recv_rows);
    auto place = [&](int64_t begin, int64_t end, std::byte* dst) {
      for (int64_t r = begin; r < end; ++r) combine_row[r] = dst + (r - begin) * payload;
    };
    if (direct) {
      for (int p = 0; p < W; ++p) {
        place(L.recv_offsets[p], L.recv_offsets[p + 1],
              win_a->at(p) + rows_before(p, me) * payload);
      }
    } else {
      WriteRowsSplitSelf(recv_rows, self_recv_row, self_recv_end, b.data(), payload,
                         a.data() + self_send * payload, place);
    }
    fused = {.rows = L.grouped_to_row.data(), .weights = L.grouped_weight.data(),
             .out_rows = recv_rows,
             .sink = [&](int64_t col0, int64_t cols, const float* y) {
               chunk_row.resize(recv_rows);
               for (int64_t r = 0; r < recv_rows; ++r) {
                 chunk_row[r] = combine_row[r] + col0 * sizeof(uint16_t);
               }
               kc::LaunchGatherRows({.in = y, .in_type = kc::RowType::kF32,
                                     .in_stride_bytes = cols * 4,
                                     .out_type = kc::RowType::kBF16, .rows = recv_rows,
                                     .hidden = cols, .out_rows = chunk_row.data()},
                                    stream);
             }};
  } else {
    down.resize(recv_choices * H);
  }
  // The gate/up projections read the received rows where they landed (a
  // BF16 row widens in registers), one row per expert choice through
  // grouped_to_row: no F32 copy per choice. Nothing overwrites them before
  // combine: peers' next dispatch waits for this rank at combine's barrier
  // or all-to-all.
  const GroupedInput grouped{
      .x = recv_base,
      .type = wire,
      .stride = static_cast<int64_t>(dispatch_stride / (bf16 ? sizeof(uint16_t) : sizeof(float))),
      .rows = L.grouped_to_row.data()};
  RETURN_IF_ERROR(Annotate(RunGroupedExperts(*backend, experts[layer], layer, grouped,
                                             L.expert_offsets.data(), L.expert_offsets[E],
                                             bf16 ? nullptr : down.data(), &expert_buffers,
                                             bf16 ? &fused : nullptr),
                           context("experts")));

  // (e) Combine: outputs go back in received order, the dispatch layout
  // reversed. BF16 rows are in place already (above); F32 rows are gathered
  // here, rows for this rank itself straight into `a`.
  const auto t_combine = std::chrono::steady_clock::now();
  uint64_t combine_peer_bytes = 0;
  if (bf16) {
    for (int p = 0; p < W; ++p) {
      const bool peer = p != me;
      send_bytes[p] = peer ? (L.recv_offsets[p + 1] - L.recv_offsets[p]) * payload : 0;
      send_byte_offsets[p] = L.recv_offsets[p] * payload;
      recv_bytes[p] = peer ? (L.send_offsets[p + 1] - L.send_offsets[p]) * payload : 0;
      recv_byte_offsets[p] = L.send_offsets[p] * payload;
      combine_peer_bytes += send_bytes[p];
    }
  } else {
    // One unweighted row per choice, in choice order. `b` is free again (the
    // experts are done with its rows), so it may grow here.
    RETURN_IF_ERROR(Annotate(b.Reserve(recv_choices * f32_row, transport), context("buffers")));
    const int64_t self_choice = L.row_choice_offsets[self_recv_row];
    const int64_t self_choice_end = L.row_choice_offsets[self_recv_end];
    WriteRowsSplitSelf(recv_choices, self_choice, self_choice_end, b.data(), f32_row,
                       a.data() + L.send_choice_offsets[self_send] * f32_row,
                       [&](int64_t begin, int64_t end, std::byte* dst) {
                         kc::LaunchGatherRows(
                             {.in = down.data(), .in_type = kc::RowType::kF32,
                              .in_stride_bytes = H * 4,
                              .index = L.choice_to_grouped.data() + begin, .out = dst,
                              .out_type = kc::RowType::kF32, .out_stride_bytes = H * 4,
                              .rows = end - begin, .hidden = H},
                             stream);
                       });
    for (int p = 0; p < W; ++p) {
      const bool peer = p != me;
      const int64_t from = L.row_choice_offsets[L.recv_offsets[p]];
      const int64_t to = L.send_choice_offsets[L.send_offsets[p]];
      send_bytes[p] = peer ? (L.row_choice_offsets[L.recv_offsets[p + 1]] - from) * f32_row : 0;
      send_byte_offsets[p] = from * f32_row;
      recv_bytes[p] = peer ? (L.send_choice_offsets[L.send_offsets[p + 1]] - to) * f32_row : 0;
      recv_byte_offsets[p] = to * f32_row;
      combine_peer_bytes += send_bytes[p];
    }
  }
  RETURN_IF_ERROR(Annotate(
      direct ? transport->Barrier()
             : transport->AllToAllV(b.data(), send_bytes.data(), send_byte_offsets.data(),
                                    a.data(), recv_bytes.data(), recv_byte_offsets.data()),
      context("combine")));
  const std::byte* const combined = direct ? win_a->at(me) : a.data();

  // (f) Into `out`. BF16: each token adds its ranks' partial sums (widened,
  // no intermediate copy). F32: the weighted un-permute of the local
  // executor, each token's top_k contributions added in choice order, so the
  // result does not depend on where the experts ran.
  if (bf16) {
    kc::LaunchReduceRows({.in = combined, .in_type = kc::RowType::kBF16,
                          .in_stride_bytes = static_cast<int64_t>(payload),
                          .offsets = L.token_row_offsets.data(), .index = L.token_rows.data(),
                          .out = out, .out_type = kc::RowType::kF32, .out_stride_bytes = H * 4,
                          .accumulate = true, .rows = tokens, .hidden = H},
                         stream);
  } else {
    kc::LaunchUnpermute({.expert_out = reinterpret_cast<const float*>(combined),
                         .slot_to_permuted = L.slot_to_choice.data(), .weights = router_w,
                         .tokens = tokens, .top_k = K, .hidden = H, .out = out,
                         .accumulate = true},
                        stream);
  }

  absl::MutexLock lock(&mu);
  stats.dispatch_bytes += dispatch_peer_bytes;
  stats.combine_bytes += combine_peer_bytes;
  stats.dispatch_seconds += dispatch_seconds;
  stats.combine_seconds += SecondsSince(t_combine);
  return absl::OkStatus();
}

}  // namespace joule::ep
