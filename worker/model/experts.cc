#include "worker/model/experts.h"

#include <algorithm>
#include <cstddef>

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace joule {



absl::Status RunMlp(device::Backend& backend, const MlpView& mlp, const float* x, int64_t rows,
                    float* out, float* scratch, void* gemm_workspace) {
  const int64_t I = mlp.gate.out_features;
  float* gate = scratch;
  float* up = gate + rows * I;
  RETURN_IF_ERROR(backend.Gemm(LinearGemm(mlp.gate, x, rows, gate, gemm_workspace)));
  RETURN_IF_ERROR(backend.Gemm(LinearGemm(mlp.up, x, rows, up, gemm_workspace)));
  RETURN_IF_ERROR(backend.SiluMul({.gate = gate, .up = up, .out = gate, .n = rows * I}));
  return backend.Gemm(LinearGemm(mlp.down, gate, rows, out, gemm_workspace));
}

size_t GroupedExpertBytes(const ExpertsView& experts, int64_t rows) {
  return static_cast<size_t>(2 * rows * experts.intermediate) * sizeof(float);
}

namespace {

// At least `bytes` in `buffer`, grown geometrically (a reservation made up
// front keeps this from allocating on the hot path).
absl::Status EnsureBytes(device::Backend& backend, device::Buffer* buffer, size_t bytes) {
  if (buffer->bytes() >= bytes) return absl::OkStatus();
  ASSIGN_OR_RETURN(*buffer, backend.Allocate(device::MemoryKind::kDevice,
                                             std::max(bytes, 2 * buffer->bytes())));
  return absl::OkStatus();
}

// Every expert with rows must be held. Only where offsets are host-visible.
absl::Status CheckHeld(const ExpertsView& experts, int layer, const int64_t* offsets) {
  for (int e = 0; e < experts.num_experts; ++e) {
    const int64_t n = offsets[e + 1] - offsets[e];
    if (n > 0 && experts.gate[e] == nullptr) {
      return absl::FailedPreconditionError(absl::StrCat(
          "layer ", layer, ": ", n, " tokens routed to expert ", e, " which this rank does not hold"));
    }
  }
  return absl::OkStatus();
}

// Columns per chunk of FusedCombine::sink: a chunk of the output about the
// size of L2 (2 MiB on the Xeons we measured; 512 KiB chunks or 64 columns
// ran up to 25 % slower at 1024-4096 tokens per rank), at least 128 columns
// (narrower tiles cost more than the cache saves), and wide enough that
// re-reading the down projection's input once per chunk (rows x I floats)
// costs less than the output traffic a chunk saves; a multiple of 64 columns
// (the short-k form's widest step). Real models' wide I make that one chunk.
int64_t SinkChunkColumns(int64_t rows, int64_t I, int64_t H, int64_t out_rows) {
  constexpr int64_t kChunkBytes = 2 << 20;
  constexpr int64_t kMinColumns = 128;
  const int64_t r = std::max<int64_t>(1, out_rows);
  const int64_t cols = std::max({(rows * I + r - 1) / r, kChunkBytes / (r * 4), kMinColumns});
  return std::min(H, (cols + 63) / 64 * 64);
}

absl::Status RunDownInChunks(device::Backend& backend, const FusedCombine& combine,
                             const float* gate, const int64_t* offsets, const ExpertsView& experts,
                             GroupedExpertBuffers* buffers) {
  const int E = experts.num_experts;
  const int64_t I = experts.intermediate;
  const int64_t H = experts.hidden;
  const int64_t rows = offsets[E];
  const int64_t chunk = SinkChunkColumns(rows, I, H, combine.out_rows);
  const size_t elem = kernels::ElementBytes(experts.type);
  buffers->chunk_w.assign(E, nullptr);
  buffers->chunk_y.resize(static_cast<size_t>(combine.out_rows * chunk));
  float* y = buffers->chunk_y.data();
  for (int64_t c0 = 0; c0 < H; c0 += chunk) {
    const int64_t cols = std::min(chunk, H - c0);
    // Output columns are rows of the [H, I] weights: the chunk's start at row c0.
    for (int e = 0; e < E; ++e) {
      buffers->chunk_w[e] = experts.down[e] == nullptr
                                ? nullptr
                                : static_cast<const std::byte*>(experts.down[e]) + c0 * I * elem;
    }
    std::fill(y, y + combine.out_rows * cols, 0.0f);
    kernels::WeightBlocks blocks = experts.blocks;
    blocks.first_row = c0;  // FP8: the chunk's rows keep their blocks' scales
    RETURN_IF_ERROR(backend.GroupedGemm({.num_groups = E, .x = gate, .row_offsets = offsets,
                                         .k = I, .n = cols, .w = buffers->chunk_w.data(),
                                         .w_type = experts.type, .y = y, .y_rows = combine.rows,
                                         .row_scale = combine.weights, .max_rows = rows,
                                         .w_scale_inv = experts.down_scale_inv,
                                         .w_blocks = blocks}));
    combine.sink(c0, cols, y);
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status RunGroupedExperts(device::Backend& backend, const ExpertsView& experts, int layer,
                               const GroupedInput& x, const int64_t* offsets, int64_t max_rows,
                               float* out, GroupedExpertBuffers* buffers,
                               const FusedCombine* combine) {
  const int E = experts.num_experts;
  const bool host = backend.device_memory_is_host();
  int64_t rows = max_rows;
  if (host) {
    RETURN_IF_ERROR(CheckHeld(experts, layer, offsets));
    rows = offsets[E];
  }
  if (rows == 0 || experts.held == 0) return absl::OkStatus();
  const int64_t H = experts.hidden;
  const int64_t I = experts.intermediate;
  RETURN_IF_ERROR(EnsureBytes(backend, &buffers->gate_up, GroupedExpertBytes(experts, rows)));
  float* gate = buffers->gate_up.as<float>();
  float* up = gate + rows * I;
  kernels::GroupedGemmParams gg{.num_groups = E, .x = x.x, .row_offsets = offsets, .k = H, .n = I,
                                .w = experts.gate, .w_type = experts.type, .y = gate,
                                .x_type = x.type, .ldx = x.stride, .x_rows = x.rows,
                                .max_rows = rows, .w_scale_inv = experts.gate_scale_inv,
                                .w_blocks = experts.blocks};
  RETURN_IF_ERROR(backend.GroupedGemm(gg));
  gg.w = experts.up;
  gg.w_scale_inv = experts.up_scale_inv;
  gg.y = up;
  RETURN_IF_ERROR(backend.GroupedGemm(gg));
  RETURN_IF_ERROR(backend.SiluMul({.gate = gate, .up = up, .out = gate, .n = rows * I}));
  if (combine != nullptr && combine->sink) {
    if (!host) return absl::UnimplementedError("FusedCombine::sink runs on the CPU only");
    return RunDownInChunks(backend, *combine, gate, offsets, experts, buffers);
  }
  return backend.GroupedGemm({.num_groups = E, .x = gate, .row_offsets = offsets, .k = I, .n = H,
                              .w = experts.down, .w_type = experts.type, .y = out,
                              .y_rows = combine != nullptr ? combine->rows : nullptr,
                              .row_scale = combine != nullptr ? combine->weights : nullptr,
                              .max_rows = rows, .w_scale_inv = experts.down_scale_inv,
                              .w_blocks = experts.blocks});
}

LocalExpertExecutor::LocalExpertExecutor(device::Backend* backend, const DeviceWeights* weights,
                                         const ModelConfig& config)
    : backend_(backend), weights_(weights), config_(config) {}

absl::Status LocalExpertExecutor::Reserve(int64_t max_tokens) {
  const int E = config_.num_experts;
  const int64_t L = config_.num_layers;
  if (load_.empty() && E > 0) {
    ASSIGN_OR_RETURN(load_, backend_->Allocate(device::MemoryKind::kDevice,
                                               static_cast<size_t>(L * E) * sizeof(int64_t)));
  }
  if (max_tokens <= reserved_tokens_) return absl::OkStatus();
  const int64_t rows = max_tokens * config_.num_experts_per_tok;
  device::WorkspaceLayout layout;
  const size_t offsets = layout.Reserve((E + 1) * sizeof(int64_t));
  const size_t index = layout.Reserve(3 * rows * sizeof(int32_t));
  const size_t down = layout.Reserve(rows * config_.hidden_size * sizeof(float));
  ASSIGN_OR_RETURN(workspace_, backend_->Allocate(device::MemoryKind::kDevice, layout.bytes()));
  auto* base = workspace_.as<std::byte>();
  offsets_ = reinterpret_cast<int64_t*>(base + offsets);
  permuted_to_slot_ = reinterpret_cast<int32_t*>(base + index);
  slot_to_permuted_ = permuted_to_slot_ + rows;
  permuted_token_ = slot_to_permuted_ + rows;
  down_ = reinterpret_cast<float*>(base + down);
  for (const LayerView& layer : weights_->layers()) {
    if (!layer.is_moe) continue;
    const size_t gate_up = GroupedExpertBytes(layer.experts, rows);
    if (buffers_.gate_up.bytes() < gate_up) {
      ASSIGN_OR_RETURN(buffers_.gate_up, backend_->Allocate(device::MemoryKind::kDevice, gate_up));
    }
  }
  reserved_tokens_ = max_tokens;
  return absl::OkStatus();
}

absl::Status LocalExpertExecutor::Run(int layer, const float* x, int64_t tokens,
                                      const int32_t* expert_ids, const float* weights, float* out) {
  if (tokens == 0) return absl::OkStatus();
  RETURN_IF_ERROR(Reserve(tokens));
  const LayerView& L = weights_->layers()[layer];
  const int E = config_.num_experts;
  const int K = config_.num_experts_per_tok;
  RETURN_IF_ERROR(backend_->MoeLayout({.expert_ids = expert_ids, .tokens = tokens, .top_k = K,
                                       .num_experts = E, .expert_offsets = offsets_,
                                       .permuted_to_slot = permuted_to_slot_,
                                       .slot_to_permuted = slot_to_permuted_,
                                       .permuted_to_token = permuted_token_}));
  RETURN_IF_ERROR(backend_->ExpertLoad({.expert_offsets = offsets_, .num_experts = E,
                                        .load = load_.as<int64_t>() + int64_t{layer} * E}));
  // The experts read each token's row of x in place, once per choice: no
  // permuted copy (slot = token * K + choice).
  RETURN_IF_ERROR(RunGroupedExperts(*backend_, L.experts, layer,
                                    {.x = x, .rows = permuted_token_}, offsets_, tokens * K, down_,
                                    &buffers_));
  return backend_->Unpermute({.expert_out = down_, .slot_to_permuted = slot_to_permuted_,
                              .weights = weights, .tokens = tokens, .top_k = K,
                              .hidden = config_.hidden_size, .out = out, .accumulate = true});
}

absl::StatusOr<std::vector<std::vector<int64_t>>> LocalExpertExecutor::ExpertLoad() {
  const int E = config_.num_experts;
  std::vector<std::vector<int64_t>> load(config_.num_layers, std::vector<int64_t>(E, 0));
  if (load_.empty()) return load;
  std::vector<int64_t> flat(static_cast<size_t>(config_.num_layers) * E);
  RETURN_IF_ERROR(backend_->CopyAsync(flat.data(), load_.data(), flat.size() * sizeof(int64_t)));
  RETURN_IF_ERROR(backend_->Synchronize());
  for (int l = 0; l < config_.num_layers; ++l) {
    std::copy(flat.begin() + l * E, flat.begin() + (l + 1) * E, load[l].begin());
  }
  return load;
}

absl::StatusOr<std::vector<std::vector<int64_t>>> LocalExpertExecutor::TakeExpertLoad() {
  ASSIGN_OR_RETURN(std::vector<std::vector<int64_t>> total, ExpertLoad());
  std::vector<std::vector<int64_t>> delta = total;
  if (taken_.size() == total.size()) {
    for (size_t l = 0; l < total.size(); ++l) {
      for (size_t e = 0; e < total[l].size(); ++e) delta[l][e] -= taken_[l][e];
    }
  }
  taken_ = std::move(total);
  return delta;
}

}  // namespace joule
