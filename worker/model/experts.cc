#include "worker/model/experts.h"

#include <algorithm>
#include <cstddef>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "kernels/cpu/elementwise.h"
#include "kernels/cpu/moe.h"

namespace joule {

namespace kc = kernels::cpu;

void RunMlp(const MlpWeights& mlp, const float* x, int64_t rows, float* out,
            std::vector<float>* scratch, kc::CpuStream stream) {
  const int64_t H = mlp.gate.in_features;
  const int64_t I = mlp.gate.out_features;
  scratch->resize(static_cast<size_t>(2 * rows * I));
  float* gate = scratch->data();
  float* up = gate + rows * I;
  kc::GemmParams g{.x = x, .m = rows, .k = H, .w = mlp.gate.w, .w_type = mlp.gate.type,
                   .n = I, .y = gate};
  kc::LaunchGemm(g, stream);
  g.w = mlp.up.w;
  g.w_type = mlp.up.type;
  g.y = up;
  kc::LaunchGemm(g, stream);
  kc::LaunchSiluMul({.gate = gate, .up = up, .out = gate, .n = rows * I}, stream);
  kc::LaunchGemm({.x = gate, .m = rows, .k = I, .w = mlp.down.w, .w_type = mlp.down.type,
                  .n = H, .y = out},
                 stream);
}

namespace {

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

void RunDownInChunks(const FusedCombine& combine, const float* gate, const int64_t* offsets, int E,
                     int64_t I, int64_t H, const void* const* down_w, kc::WeightType type,
                     GroupedExpertBuffers* buffers, kc::CpuStream stream) {
  const int64_t rows = offsets[E];
  const int64_t chunk = SinkChunkColumns(rows, I, H, combine.out_rows);
  const size_t elem = type == kc::WeightType::kBF16 ? 2 : 4;
  buffers->chunk_w.assign(E, nullptr);
  buffers->chunk_y.resize(static_cast<size_t>(combine.out_rows * chunk));
  float* y = buffers->chunk_y.data();
  for (int64_t c0 = 0; c0 < H; c0 += chunk) {
    const int64_t cols = std::min(chunk, H - c0);
    // Output columns are rows of the [H, I] weights: the chunk's start at row c0.
    for (int e = 0; e < E; ++e) {
      buffers->chunk_w[e] = down_w[e] == nullptr
                                ? nullptr
                                : static_cast<const std::byte*>(down_w[e]) + c0 * I * elem;
    }
    std::fill(y, y + combine.out_rows * cols, 0.0f);
    kc::LaunchGroupedGemm({.num_groups = E, .x = gate, .row_offsets = offsets, .k = I, .n = cols,
                           .w = buffers->chunk_w.data(), .w_type = type, .y = y,
                           .y_rows = combine.rows, .row_scale = combine.weights},
                          stream);
    combine.sink(c0, cols, y);
  }
}

}  // namespace

absl::Status RunGroupedExperts(const LayerWeights& weights, int layer, const GroupedInput& x,
                               const int64_t* offsets, int num_experts, float* out,
                               GroupedExpertBuffers* buffers, kc::CpuStream stream,
                               const FusedCombine* combine) {
  const int E = num_experts;
  auto& w = buffers->w;
  w.assign(3 * E, nullptr);
  const MlpWeights* any = nullptr;  // every expert of a layer has the same shape and dtype
  for (int e = 0; e < E; ++e) {
    const int64_t n = offsets[e + 1] - offsets[e];
    if (n == 0) continue;
    const MlpWeights& m = weights.experts[e];
    if (!m.loaded) {
      return absl::FailedPreconditionError(absl::StrCat(
          "layer ", layer, ": ", n, " tokens routed to expert ", e, " which this rank does not hold"));
    }
    w[e] = m.gate.w;
    w[E + e] = m.up.w;
    w[2 * E + e] = m.down.w;
    any = &m;
  }
  if (any == nullptr) return absl::OkStatus();
  const int64_t rows = offsets[E];
  const int64_t H = any->gate.in_features;
  const int64_t I = any->gate.out_features;
  const kc::WeightType type = any->gate.type;
  buffers->gate.resize(rows * I);
  buffers->up.resize(rows * I);
  float* gate = buffers->gate.data();
  float* up = buffers->up.data();
  kc::GroupedGemmParams gg{.num_groups = E, .x = x.x, .row_offsets = offsets, .k = H, .n = I,
                           .w = w.data(), .w_type = type, .y = gate, .x_type = x.type,
                           .ldx = x.stride, .x_rows = x.rows};
  kc::LaunchGroupedGemm(gg, stream);
  gg.w = w.data() + E;
  gg.y = up;
  kc::LaunchGroupedGemm(gg, stream);
  kc::LaunchSiluMul({.gate = gate, .up = up, .out = gate, .n = rows * I}, stream);
  if (combine != nullptr && combine->sink) {
    RunDownInChunks(*combine, gate, offsets, E, I, H, w.data() + 2 * E, type, buffers, stream);
    return absl::OkStatus();
  }
  kc::LaunchGroupedGemm({.num_groups = E, .x = gate, .row_offsets = offsets, .k = I, .n = H,
                         .w = w.data() + 2 * E, .w_type = type, .y = out,
                         .y_rows = combine != nullptr ? combine->rows : nullptr,
                         .row_scale = combine != nullptr ? combine->weights : nullptr},
                        stream);
  return absl::OkStatus();
}

absl::Status LocalExpertExecutor::Run(int layer, const float* x, int64_t tokens,
                                      const int32_t* expert_ids, const float* weights, float* out) {
  const ModelConfig& c = weights_->config();
  const LayerWeights& L = weights_->layers()[layer];
  const int E = c.num_experts;
  const int K = c.num_experts_per_tok;
  const int64_t H = c.hidden_size;
  if (tokens == 0) return absl::OkStatus();
  if (expert_load_.empty()) expert_load_.assign(c.num_layers, std::vector<int64_t>(E, 0));

  const int64_t rows = tokens * K;
  offsets_.resize(E + 1);
  permuted_to_slot_.resize(rows);
  slot_to_permuted_.resize(rows);
  kc::ComputeMoeLayout({.expert_ids = expert_ids, .tokens = tokens, .top_k = K, .num_experts = E,
                        .expert_offsets = offsets_.data(),
                        .permuted_to_slot = permuted_to_slot_.data(),
                        .slot_to_permuted = slot_to_permuted_.data()});
  for (int e = 0; e < E; ++e) expert_load_[layer][e] += offsets_[e + 1] - offsets_[e];

  // The experts read each token's row of x in place, once per choice: no
  // permuted copy (slot = token * K + choice).
  permuted_token_.resize(rows);
  for (int64_t g = 0; g < rows; ++g) permuted_token_[g] = permuted_to_slot_[g] / K;
  down_.resize(rows * H);
  RETURN_IF_ERROR(RunGroupedExperts(L, layer, {.x = x, .rows = permuted_token_.data()},
                                    offsets_.data(), E, down_.data(), &buffers_, stream_));
  kc::LaunchUnpermute({.expert_out = down_.data(), .slot_to_permuted = slot_to_permuted_.data(),
                       .weights = weights, .tokens = tokens, .top_k = K, .hidden = H, .out = out,
                       .accumulate = true},
                      stream_);
  return absl::OkStatus();
}

}  // namespace joule
