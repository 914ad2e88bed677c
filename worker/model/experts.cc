#include "worker/model/experts.h"

#include "absl/strings/str_cat.h"
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

absl::Status LocalExpertExecutor::Run(int layer, const float* x, int64_t tokens,
                                      const int32_t* expert_ids, const float* weights, float* out) {
  const ModelConfig& c = weights_->config();
  const LayerWeights& L = weights_->layers()[layer];
  const int E = c.num_experts;
  const int K = c.num_experts_per_tok;
  const int64_t H = c.hidden_size;
  const int64_t I = c.moe_intermediate_size;
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
  w_ptrs_.assign(3 * E, nullptr);
  kc::WeightType type = kc::WeightType::kBF16;
  for (int e = 0; e < E; ++e) {
    const int64_t n = offsets_[e + 1] - offsets_[e];
    expert_load_[layer][e] += n;
    if (n == 0) continue;
    const MlpWeights& m = L.experts[e];
    if (!m.loaded) {
      return absl::FailedPreconditionError(absl::StrCat(
          "layer ", layer, ": ", n, " tokens routed to expert ", e, " which this rank does not hold"));
    }
    w_ptrs_[e] = m.gate.w;
    w_ptrs_[E + e] = m.up.w;
    w_ptrs_[2 * E + e] = m.down.w;
    type = m.gate.type;
  }

  permuted_.resize(rows * H);
  gate_.resize(rows * I);
  up_.resize(rows * I);
  down_.resize(rows * H);
  kc::LaunchPermute({.x = x, .hidden = H, .rows = rows,
                     .permuted_to_slot = permuted_to_slot_.data(), .top_k = K,
                     .out = permuted_.data()},
                    stream_);
  kc::GroupedGemmParams gg{.num_groups = E, .x = permuted_.data(), .row_offsets = offsets_.data(),
                           .k = H, .n = I, .w = w_ptrs_.data(), .w_type = type, .y = gate_.data()};
  kc::LaunchGroupedGemm(gg, stream_);
  gg.w = w_ptrs_.data() + E;
  gg.y = up_.data();
  kc::LaunchGroupedGemm(gg, stream_);
  kc::LaunchSiluMul({.gate = gate_.data(), .up = up_.data(), .out = gate_.data(), .n = rows * I},
                    stream_);
  kc::LaunchGroupedGemm({.num_groups = E, .x = gate_.data(), .row_offsets = offsets_.data(),
                         .k = I, .n = H, .w = w_ptrs_.data() + 2 * E, .w_type = type,
                         .y = down_.data()},
                        stream_);
  kc::LaunchUnpermute({.expert_out = down_.data(), .slot_to_permuted = slot_to_permuted_.data(),
                       .weights = weights, .tokens = tokens, .top_k = K, .hidden = H, .out = out,
                       .accumulate = true},
                      stream_);
  return absl::OkStatus();
}

}  // namespace joule
