#include "worker/ep/ep_executor.h"

#include <algorithm>
#include <array>
#include <chrono>
#include <cstddef>
#include <cstring>
#include <span>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/logging.h"
#include "common/status.h"
#include "kernels/cpu/moe.h"
#include "worker/device/cpu_backend.h"
#include "worker/ep/device_stages.h"
#include "worker/ep/exchange_windows.h"

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

// An OverlapSetting for messages.
std::string OverlapName(int64_t setting) {
  if (setting == 0) return "never (two-batch overlap off)";
  return absl::StrCat("from ", setting - 1, " rows on (two-batch overlap on)");
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
  std::unique_ptr<CombineStrategy> combine;  // how outputs go back (per payload type)

  // One micro-batch of a layer: its layout and count exchange and, on a
  // device, its stages. Two with options.two_batch_overlap; the host path
  // runs them one after the other in lanes[0].
  struct Lane {
    DispatchLayout layout;
    std::vector<int64_t> count_row, count_all;
    std::vector<int32_t> rank_token, rank_row;  // [world] per-token scratch of the layout
    std::unique_ptr<DeviceStages> device;
    bool moving = false;  // rows move in this layer (every rank agrees)
  };
  std::array<Lane, 2> lanes;
  int micro_batches = 1;  // the most per layer: 2 with two-batch overlap
  // Rows that moved (over all ranks) in this layer so far, and in the last
  // layer that completed: every rank saw the same count matrices, so the
  // split decided from them is the same on every rank. A new placement
  // forgets them on every rank (a rank that reloads experts gets a new
  // executor, the others SetPlacement). `split`: this layer's micro-batches.
  int64_t layer_rows = 0, last_layer_rows = 0;
  int split = 1;
  int layer = -1;  // the layer running
  ExchangeBytes bytes;
  // Dispatch sends from `dispatch_send` into `dispatch_recv`; combine sends
  // back from `dispatch_recv` into `dispatch_send`. Rows for this rank itself
  // are written straight into the other buffer.
  ExchangeBuffer dispatch_send, dispatch_recv;
  // With shared windows (ranks on one host, BF16) the exchanges become
  // writes into peers' memory, a barrier after each.
  std::unique_ptr<ExchangeWindows> windows;
  std::vector<std::byte*> send_row;  // [send rows] where each dispatch row is written
  GroupedExpertBuffers expert_buffers;
  // A GPU worker's stages (options.device): rows in device memory.
  bool on_device = false;
  std::unique_ptr<DeviceExperts> placed;  // its experts, when not the model's
  std::vector<ExpertsView> device_experts;  // [layer]
  std::vector<int32_t> host_ids;            // the router's choices, copied to the host
  std::vector<float> host_weights;

  mutable absl::Mutex mu;
  Stats stats ABSL_GUARDED_BY(mu);
  std::vector<std::vector<int64_t>> load ABSL_GUARDED_BY(mu);

  size_t PayloadBytes() const { return combine->PayloadBytes(weights->config().hidden_size); }
  // Activations, then top_k expert ids and top_k router weights.
  size_t DispatchStride() const {
    return PayloadBytes() + 2 * weights->config().num_experts_per_tok * sizeof(int32_t);
  }
  absl::Status CheckPlacement(const Placement& p) const;
  absl::Status SetUpDevice(const ExpertParallelDevice& d);
  // Device: the router's choices to the host (the layout is built there).
  absl::Status CopyChoicesToHost(int64_t tokens, const int32_t* expert_ids, const float* weights);

  absl::Status Run(int layer, const float* x, int64_t tokens, const int32_t* expert_ids,
                   const float* weights, float* out);
  // Micro-batches for the next layer (two-batch overlap above its row threshold).
  int MicroBatchesNow() const {
    return micro_batches == 2 && last_layer_rows >= options.two_batch_min_rows ? 2 : 1;
  }
  // What the count exchange compares: two-batch overlap off (0), or on from
  // `two_batch_min_rows` rows (1 + that).
  int64_t OverlapSetting() const {
    return micro_batches == 2 ? 1 + options.two_batch_min_rows : 0;
  }
  // Tokens [first, first + tokens) of a layer's call.
  struct MicroBatch {
    int64_t first = 0;
    int64_t tokens = 0;
  };
  absl::Status RunOnHost(const absl::Status& local, MicroBatch b, const float* x,
                         const int32_t* expert_ids, const float* router_w, float* out);
  absl::Status RunOnDevice(const absl::Status& local, std::span<const MicroBatch> batches,
                           const float* x, const int32_t* host_ids, const float* host_w,
                           const float* router_w, float* out);
  // The stages of Run.
  absl::Status CheckRouting(int layer, int64_t tokens, const int32_t* expert_ids) const;
  // The layout of `slots` choices and the count exchange; false when no row
  // moves on any rank.
  absl::StatusOr<bool> LayOut(Lane& lane, const absl::Status& local, MicroBatch b,
                              const int32_t* expert_ids);
  absl::StatusOr<int64_t> ExchangeCounts(Lane& lane, const absl::Status& local,
                                         const int32_t* expert_ids, int64_t slots);
  absl::StatusOr<Exchange> Dispatch(const float* x, const int32_t* expert_ids,
                                    const float* router_weights, int64_t slots,
                                    uint64_t* peer_bytes);
  absl::Status RunExperts(const Exchange& exchange);
  absl::StatusOr<uint64_t> Combine(const Exchange& exchange);
  std::string Context(const char* stage) const {
    return absl::StrCat("expert-parallel ", stage, " of layer ", layer);
  }
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
  impl_->backend = std::make_unique<device::CpuBackend>(stream);
  impl_->expert_tables.resize(weights->layers().size());
  for (size_t l = 0; l < weights->layers().size(); ++l) {
    impl_->experts.push_back(ViewExperts(weights->layers()[l], &impl_->expert_tables[l]));
  }
  impl_->options = options;
  impl_->combine = MakeCombineStrategy(options.payload);
  impl_->micro_batches = options.two_batch_overlap ? 2 : 1;
  for (Impl::Lane& lane : impl_->lanes) {
    lane.layout.world = transport->world_size();
    lane.layout.me = transport->rank();
  }
  impl_->windows = std::make_unique<ExchangeWindows>(
      [transport](size_t bytes) { return transport->MapSharedWindows(bytes); },
      options.shared_windows && options.payload == PayloadType::kBF16, transport->rank());
  impl_->placement_status = impl_->CheckPlacement(placement);
  impl_->fingerprint = PlacementFingerprint(placement);
  impl_->placement = std::move(placement);
  if (options.device.backend != nullptr && !options.device.backend->device_memory_is_host()) {
    absl::Status device = impl_->SetUpDevice(options.device);
    if (!device.ok() && impl_->placement_status.ok()) impl_->placement_status = device;
  }
  const ModelConfig& c = weights->config();
  absl::MutexLock lock(&impl_->mu);
  impl_->load.assign(c.num_layers, std::vector<int64_t>(c.num_experts, 0));
}

ExpertParallelExecutor::~ExpertParallelExecutor() = default;

absl::Status ExpertParallelExecutor::Impl::SetUpDevice(const ExpertParallelDevice& d) {
  const ModelConfig& c = weights->config();
  for (int b = 0; b < micro_batches; ++b) {
    lanes[b].device = std::make_unique<DeviceStages>(
        DeviceStagesOptions{.backend = d.backend, .control = transport,
                            .row_transport = d.row_transport, .payload = options.payload,
                            .shared_windows = options.shared_windows},
        c.hidden_size, c.num_experts_per_tok);
  }
  on_device = true;
  if (d.resident != nullptr && d.resident_host == weights) {
    device_experts.resize(c.num_layers);
    for (int l = 0; l < c.num_layers; ++l) device_experts[l] = d.resident->layers()[l].experts;
  } else {
    // Reloaded experts: the worker's store keeps what earlier placements put
    // on the device; without one, a store of this executor's own.
    std::shared_ptr<DeviceExpertStore> store = d.experts;
    if (store == nullptr) store = std::make_shared<DeviceExpertStore>(*d.backend, d.resident, d.resident_host);
    ASSIGN_OR_RETURN(placed, store->Place(*weights));
    device_experts = placed->layers();
    JOULE_LOG(Info) << "rank " << transport->rank() << ": experts on the device, "
                    << placed->uploaded_bytes() << " bytes uploaded for this placement";
  }
  JOULE_LOG(Info) << "rank " << transport->rank() << ": expert parallelism on "
                  << d.backend->spec().ToString() << ", rows through "
                  << RowPathName(lanes[0].device->row_path())
                  << (micro_batches == 2 ? ", two micro-batches per MoE layer" : "")
                  << (micro_batches == 2 && options.two_batch_min_rows > 0
                          ? absl::StrCat(" after one that moved >= ", options.two_batch_min_rows,
                                         " rows")
                          : "");
  return absl::OkStatus();
}

absl::Status ExpertParallelExecutor::Impl::CopyChoicesToHost(int64_t tokens,
                                                             const int32_t* expert_ids,
                                                             const float* weights) {
  const int64_t slots = std::max<int64_t>(tokens, 0) * this->weights->config().num_experts_per_tok;
  host_ids.resize(slots);
  host_weights.resize(slots);
  if (slots == 0) return absl::OkStatus();
  device::Backend& backend = *options.device.backend;
  RETURN_IF_ERROR(backend.CopyAsync(host_ids.data(), expert_ids, slots * sizeof(int32_t)));
  RETURN_IF_ERROR(backend.CopyAsync(host_weights.data(), weights, slots * sizeof(float)));
  return backend.Synchronize();
}

absl::Status ExpertParallelExecutor::SetPlacement(Placement placement) {
  RETURN_IF_ERROR(Annotate(impl_->CheckPlacement(placement), "set placement"));
  impl_->fingerprint = PlacementFingerprint(placement);
  impl_->placement = std::move(placement);
  impl_->placement_status = absl::OkStatus();
  impl_->last_layer_rows = 0;  // as a new executor starts: every rank decides alike
  return absl::OkStatus();
}

const Placement& ExpertParallelExecutor::placement() const { return impl_->placement; }

absl::Status ExpertParallelExecutor::status() const { return impl_->placement_status; }

std::vector<std::vector<int64_t>> ExpertParallelExecutor::TakeExpertLoad() {
  absl::MutexLock lock(&impl_->mu);
  std::vector<std::vector<int64_t>> out = impl_->load;
  for (auto& layer : impl_->load) std::fill(layer.begin(), layer.end(), 0);
  return out;
}

absl::Status ExpertParallelExecutor::ReleaseWindows() {
  for (Impl::Lane& lane : impl_->lanes) {
    if (lane.device != nullptr) RETURN_IF_ERROR(lane.device->ReleaseWindows());
  }
  return impl_->windows->ReleaseAll();
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

// Errors found here are not returned before the count exchange: this rank
// still joins it with a failure flag, so its peers stop at once instead of
// waiting for it until the transport times out.
absl::Status ExpertParallelExecutor::Impl::CheckRouting(int layer, int64_t tokens,
                                                        const int32_t* expert_ids) const {
  const ModelConfig& c = weights->config();
  RETURN_IF_ERROR(placement_status);
  if (layer < 0 || layer >= c.num_layers || !weights->layers()[layer].is_moe) {
    return absl::InvalidArgumentError(absl::StrCat("layer ", layer, " is not a MoE layer of the model"));
  }
  if (tokens < 0) return absl::InvalidArgumentError(absl::StrCat("negative token count ", tokens));
  const int K = c.num_experts_per_tok;
  for (int64_t s = 0; s < tokens * K; ++s) {
    if (expert_ids[s] < 0 || expert_ids[s] >= c.num_experts) {
      return absl::InvalidArgumentError(absl::StrCat("token ", s / K, " is routed to expert ",
                                                     expert_ids[s], ", outside [0, ",
                                                     c.num_experts, ")"));
    }
  }
  return absl::OkStatus();
}

absl::Status ExpertParallelExecutor::Impl::Run(int layer_index, const float* x, int64_t tokens,
                                               const int32_t* expert_ids, const float* router_w,
                                               float* out) {
  layer = layer_index;
  absl::Status local = absl::OkStatus();
  const int32_t* ids = expert_ids;
  const float* ids_weights = router_w;
  if (on_device) {  // the layout is built on the host
    local = Annotate(CopyChoicesToHost(tokens, expert_ids, router_w), "router choices to the host");
    ids = host_ids.data();
    ids_weights = host_weights.data();
  }
  if (local.ok()) local = CheckRouting(layer, tokens, ids);
  const int64_t valid = local.ok() ? tokens : 0;  // on failure only the flag goes out
  split = MicroBatchesNow();
  std::array<MicroBatch, 2> batches;
  batches[0].tokens = split == 2 ? (valid + 1) / 2 : valid;
  batches[1] = {.first = batches[0].tokens, .tokens = valid - batches[0].tokens};
  const std::span<const MicroBatch> run(batches.data(), split);
  layer_rows = 0;
  if (on_device) {
    RETURN_IF_ERROR(RunOnDevice(local, run, x, ids, ids_weights, router_w, out));
  } else {
    for (const MicroBatch& b : run) RETURN_IF_ERROR(RunOnHost(local, b, x, ids, router_w, out));
  }
  last_layer_rows = layer_rows;
  if (split == 2) {
    absl::MutexLock lock(&mu);
    ++stats.two_batch_layers;
  }
  return absl::OkStatus();
}

absl::StatusOr<bool> ExpertParallelExecutor::Impl::LayOut(Lane& lane, const absl::Status& local,
                                                          MicroBatch b,
                                                          const int32_t* expert_ids) {
  const int K = weights->config().num_experts_per_tok;
  const int64_t slots = b.tokens * K;
  // A replica for every slot, one send row per (token, rank).
  BuildSendLayout(placement, layer, expert_ids, slots, K, &lane.layout, &lane.rank_token,
                  &lane.rank_row, b.first);
  ASSIGN_OR_RETURN(const int64_t moving, ExchangeCounts(lane, local, expert_ids, slots));
  // Every rank sees the same matrix: all skip the payload exchanges together.
  lane.moving = moving > 0;
  return lane.moving;
}

absl::Status ExpertParallelExecutor::Impl::RunOnHost(const absl::Status& local, MicroBatch b,
                                                     const float* x, const int32_t* expert_ids,
                                                     const float* router_w, float* out) {
  const auto t_start = std::chrono::steady_clock::now();
  const int K = weights->config().num_experts_per_tok;
  const int64_t H = weights->config().hidden_size;
  x += b.first * H;
  out += b.first * H;
  expert_ids += b.first * K;
  router_w += b.first * K;
  const int64_t slots = b.tokens * K;
  ASSIGN_OR_RETURN(const bool moving, LayOut(lanes[0], local, b, expert_ids));
  if (!moving) {
    absl::MutexLock lock(&mu);
    stats.dispatch_seconds += SecondsSince(t_start);
    return absl::OkStatus();
  }
  // Dispatch, this rank's experts over what it received, combine, and the
  // reduce into out.
  uint64_t dispatch_bytes = 0;
  ASSIGN_OR_RETURN(const Exchange exchange,
                   Dispatch(x, expert_ids, router_w, slots, &dispatch_bytes));
  const double dispatch_seconds = SecondsSince(t_start);
  RETURN_IF_ERROR(RunExperts(exchange));
  const auto t_combine = std::chrono::steady_clock::now();
  ASSIGN_OR_RETURN(const uint64_t combine_bytes, Combine(exchange));
  const std::byte* returned =
      exchange.direct ? windows->combine()->at(lanes[0].layout.me) : dispatch_send.data();
  combine->Reduce(exchange, returned, router_w, b.tokens, K, out);

  absl::MutexLock lock(&mu);
  stats.dispatch_bytes += dispatch_bytes;
  stats.combine_bytes += combine_bytes;
  stats.dispatch_seconds += dispatch_seconds;
  stats.combine_seconds += SecondsSince(t_combine);
  return absl::OkStatus();
}

// Each micro-batch's layout, count exchange and pack in turn (the next one's
// host work runs while the previous one's pack does); then each one's
// dispatch and experts (its dispatch waits while the previous one's experts
// run); then each one's combine (waiting while the next one's experts run).
// Every rank runs the same phases in the same order.
absl::Status ExpertParallelExecutor::Impl::RunOnDevice(const absl::Status& local,
                                                       std::span<const MicroBatch> batches,
                                                       const float* x, const int32_t* host_ids,
                                                       const float* host_w,
                                                       const float* router_w, float* out) {
  const int K = weights->config().num_experts_per_tok;
  const int64_t H = weights->config().hidden_size;
  double layout_seconds = 0;
  for (size_t i = 0; i < batches.size(); ++i) {
    const MicroBatch& b = batches[i];
    const auto t_start = std::chrono::steady_clock::now();
    ASSIGN_OR_RETURN(const bool moving, LayOut(lanes[i], local, b, host_ids + b.first * K));
    layout_seconds += SecondsSince(t_start);
    if (!moving) continue;
    RETURN_IF_ERROR(Annotate(
        lanes[i].device->Begin({.layout = &lanes[i].layout, .held = &experts[layer],
                                .experts = &device_experts[layer], .x = x + b.first * H,
                                .host_ids = host_ids + b.first * K,
                                .host_weights = host_w + b.first * K,
                                .device_weights = router_w + b.first * K, .tokens = b.tokens,
                                .out = out + b.first * H}),
        Context("exchange")));
  }
  for (size_t i = 0; i < batches.size(); ++i) {
    if (!lanes[i].moving) continue;
    RETURN_IF_ERROR(Annotate(lanes[i].device->Dispatch(), Context("exchange")));
    RETURN_IF_ERROR(Annotate(lanes[i].device->Experts(), Context("exchange")));
  }
  StageTraffic sum{.dispatch_seconds = layout_seconds};
  for (size_t i = 0; i < batches.size(); ++i) {
    if (!lanes[i].moving) continue;
    absl::StatusOr<StageTraffic> t = lanes[i].device->Combine();
    if (!t.ok()) return Annotate(t.status(), Context("exchange"));
    sum.dispatch_bytes += t->dispatch_bytes;
    sum.combine_bytes += t->combine_bytes;
    sum.dispatch_seconds += t->dispatch_seconds;
    sum.combine_seconds += t->combine_seconds;
  }
  absl::MutexLock lock(&mu);
  stats.dispatch_bytes += sum.dispatch_bytes;
  stats.combine_bytes += sum.combine_bytes;
  stats.dispatch_seconds += sum.dispatch_seconds;
  stats.combine_seconds += sum.combine_seconds;
  return absl::OkStatus();
}

// Each rank's row is [rows to every rank, placement fingerprint, failure
// flag, two-batch overlap setting, this layer's micro-batches, shared
// windows wanted]; together
// they form the world x world count matrix every rank needs to size its
// receives. Returns the rows that move in all.
absl::StatusOr<int64_t> ExpertParallelExecutor::Impl::ExchangeCounts(Lane& lane,
                                                                     const absl::Status& local,
                                                                     const int32_t* expert_ids,
                                                                     int64_t slots) {
  DispatchLayout& L = lane.layout;
  const int W = L.world;
  const int row_len = W + 5;
  std::vector<int64_t>& row = lane.count_row;
  std::vector<int64_t>& all = lane.count_all;
  row.assign(row_len, 0);
  for (int d = 0; d < W; ++d) row[d] = L.send_offsets[d + 1] - L.send_offsets[d];
  row[W] = static_cast<int64_t>(fingerprint);
  row[W + 1] = local.ok() ? 0 : 1;
  row[W + 2] = OverlapSetting();
  row[W + 3] = split;
  row[W + 4] = options.shared_windows ? 1 : 0;
  all.resize(static_cast<size_t>(W) * row_len);
  RETURN_IF_ERROR(Annotate(transport->AllGather(row.data(), row_len * sizeof(int64_t), all.data()),
                           Context("count exchange")));
  if (!local.ok()) return Annotate(local, Context("dispatch"));
  for (int p = 0; p < W; ++p) {
    if (all[p * row_len + W + 1] != 0) {
      return absl::AbortedError(absl::StrCat(Context("dispatch"), ": rank ", p,
                                             " failed this layer (its own error says why)"));
    }
  }
  for (int p = 0; p < W; ++p) {
    if (all[p * row_len + W] != static_cast<int64_t>(fingerprint)) {
      return absl::FailedPreconditionError(absl::StrCat(
          Context("dispatch"), ": rank ", p, " routes by a different placement than rank ", L.me,
          " (a new placement must be applied on every rank between the same steps)"));
    }
    if (all[p * row_len + W + 2] != OverlapSetting()) {
      return absl::FailedPreconditionError(absl::StrCat(
          Context("dispatch"), ": rank ", p, " splits MoE layers into micro-batches ",
          OverlapName(all[p * row_len + W + 2]), ", rank ", L.me, " ",
          OverlapName(OverlapSetting()),
          " (two-batch overlap and its minimum rows must be alike on every rank)"));
    }
    if (all[p * row_len + W + 4] != row[W + 4]) {  // else mapping would wait for the others
      const auto how = [](int64_t windows) {
        return windows != 0 ? "into shared windows" : "through the all-to-all-v";
      };
      return absl::FailedPreconditionError(absl::StrCat(
          Context("dispatch"), ": rank ", p, " moves rows ", how(all[p * row_len + W + 4]),
          ", rank ", L.me, " ", how(row[W + 4]), " (--shared-windows must be alike on every rank)"));
    }
    if (all[p * row_len + W + 3] != split) {  // a bug, not a setting: fail rather than mix
      return absl::InternalError(absl::StrCat(
          Context("dispatch"), ": rank ", p, " runs this layer as ", all[p * row_len + W + 3],
          " micro-batch(es), rank ", L.me, " as ", split));
    }
  }
  const int64_t moving = SetCounts(all, row_len, &L);
  layer_rows += moving;
  absl::MutexLock lock(&mu);
  std::vector<int64_t>& layer_load = load[L.layer];
  for (int64_t s = 0; s < slots; ++s) ++layer_load[expert_ids[s]];
  return moving;
}

// Packs [activations, expert ids, router weights] rows by destination and
// exchanges them; this rank's own rows go straight where it reads them.
absl::StatusOr<Exchange> ExpertParallelExecutor::Impl::Dispatch(const float* x,
                                                                const int32_t* expert_ids,
                                                                const float* router_w,
                                                                int64_t slots,
                                                                uint64_t* peer_bytes) {
  const DispatchLayout& L = lanes[0].layout;
  const int W = L.world;
  const int me = L.me;
  const int K = weights->config().num_experts_per_tok;
  const int64_t H = weights->config().hidden_size;
  const size_t payload = PayloadBytes();
  const size_t stride = DispatchStride();
  const int64_t send_rows = L.send_rows();
  // Windows are sized for the rank that needs the most (all ranks agree).
  size_t combine_bytes = 0, dispatch_bytes = 0;
  for (int r = 0; r < W; ++r) {
    combine_bytes = std::max<size_t>(combine_bytes, L.RowsBefore(r, W) * payload);
    dispatch_bytes = std::max<size_t>(dispatch_bytes, L.RowsFrom(r, W) * stride);
  }
  absl::StatusOr<bool> direct = windows->Ensure(combine_bytes, dispatch_bytes);
  if (!direct.ok()) return Annotate(direct.status(), Context("shared windows"));
  Exchange ex{.layout = &lanes[0].layout, .hidden = H, .direct = *direct, .dispatch_stride = stride,
              .a = &dispatch_send, .b = &dispatch_recv, .win_a = windows->combine(),
              .transport = transport, .stream = stream};
  if (!ex.direct) {
    // `dispatch_send` also receives the combine's returning rows.
    const size_t send_bytes = std::max(send_rows * stride, combine->ReturnBytes(L, H));
    RETURN_IF_ERROR(Annotate(dispatch_send.Reserve(send_bytes, transport), Context("buffers")));
    RETURN_IF_ERROR(Annotate(dispatch_recv.Reserve(L.recv_rows() * stride, transport),
                             Context("buffers")));
  }
  ex.received = ex.direct ? windows->dispatch()->at(me) : dispatch_recv.data();
  // Where each send row goes: the destination's window, or `dispatch_send`
  // (this rank's own rows straight into `dispatch_recv`) for the all-to-all.
  PlaceSendRows(L, stride, ex.direct ? windows->dispatch() : nullptr, dispatch_send.data(),
                dispatch_recv.data(), &send_row);
  // A token going to several ranks is converted (BF16: rounded) once, into
  // its first row, and copied from there into the others.
  kc::LaunchGatherRows({.in = x, .in_type = kc::RowType::kF32, .in_stride_bytes = H * 4,
                        .index = L.send_to_token.data(), .out_type = combine->payload_type(),
                        .rows = send_rows, .hidden = H, .out_rows = send_row.data(),
                        .copy_of = L.send_copy_of.data()},
                       stream);
  WriteRowChoices(L, expert_ids, router_w, slots, K, send_row.data(), payload);
  *peer_bytes = RowExchangeBytes(L, stride, /*back=*/false, &bytes);
  RETURN_IF_ERROR(Annotate(
      ex.direct ? transport->Barrier()  // every rank's rows are in place once all have written
                : transport->AllToAllV(dispatch_send.data(), bytes.send.data(),
                                       bytes.send_offsets.data(), dispatch_recv.data(),
                                       bytes.recv.data(), bytes.recv_offsets.data()),
      Context("dispatch")));
  return ex;
}

// Every received row becomes one choice per expert it names, grouped by
// expert, then the grouped SwiGLU exactly as the local executor runs it. The
// gate/up projections read the received rows where they landed (a BF16 row
// widens in registers), one row per expert choice through grouped_to_row: no
// F32 copy per choice. Nothing overwrites them before combine: peers' next
// dispatch waits for this rank at combine's barrier or all-to-all.
absl::Status ExpertParallelExecutor::Impl::RunExperts(const Exchange& ex) {
  DispatchLayout& layout = lanes[0].layout;
  const ExpertsView& held = experts[layer];
  RETURN_IF_ERROR(Annotate(GroupReceivedChoices(ex.received, ex.dispatch_stride, PayloadBytes(),
                                                weights->config().num_experts_per_tok, held,
                                                &layout),
                           Context("dispatch")));
  const kernels::RowType wire = combine->payload_type();
  const GroupedInput rows{
      .x = ex.received, .type = wire,
      .stride = static_cast<int64_t>(ex.dispatch_stride / kernels::ElementBytes(wire)),
      .rows = layout.grouped_to_row.data()};
  return Annotate(combine->RunExperts(ex, rows, *backend, held, &expert_buffers),
                  Context("experts"));
}

// The outputs go back in received order, the dispatch layout reversed.
absl::StatusOr<uint64_t> ExpertParallelExecutor::Impl::Combine(const Exchange& ex) {
  absl::StatusOr<uint64_t> peer_bytes = combine->PrepareReturn(ex, &bytes);
  if (!peer_bytes.ok()) return Annotate(peer_bytes.status(), Context("combine"));
  RETURN_IF_ERROR(Annotate(
      ex.direct ? transport->Barrier()
                : transport->AllToAllV(dispatch_recv.data(), bytes.send.data(),
                                       bytes.send_offsets.data(), dispatch_send.data(),
                                       bytes.recv.data(), bytes.recv_offsets.data()),
      Context("combine")));
  return *peer_bytes;
}

}  // namespace joule::ep
