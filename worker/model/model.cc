#include "worker/model/model.h"

#include <cmath>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "kernels/cpu/attention.h"
#include "kernels/cpu/elementwise.h"
#include "kernels/cpu/moe.h"

namespace joule {

namespace kc = kernels::cpu;

absl::StatusOr<std::unique_ptr<Model>> Model::Load(const std::string& model_dir,
                                                   const Options& options) {
  ASSIGN_OR_RETURN(auto weights, ModelWeights::Load(model_dir, options.weights));
  return std::make_unique<Model>(std::move(weights), options.num_threads);
}

Model::Model(std::unique_ptr<ModelWeights> weights, int num_threads)
    : weights_(std::move(weights)),
      pool_(std::make_unique<kc::ThreadPool>(num_threads)),
      local_experts_(weights_.get(), kc::CpuStream{pool_.get()}),
      experts_(&local_experts_) {
  const ModelConfig& c = config();
  const int64_t half = c.head_dim / 2;
  rope_cos_.resize(c.max_position_embeddings * half);
  rope_sin_.resize(c.max_position_embeddings * half);
  kc::BuildRopeTable(c.rope_theta, c.head_dim, c.max_position_embeddings, rope_cos_.data(),
                     rope_sin_.data());
}

void Model::set_expert_executor(ExpertExecutor* executor) {
  experts_ = executor != nullptr ? executor : &local_experts_;
}

absl::Status Model::Validate(const ForwardBatch& b, const KvCacheView& kv) const {
  const ModelConfig& c = config();
  const int64_t T = b.num_tokens();
  const int S = b.num_seqs();
  if (b.positions.size() != b.tokens.size() || b.slots.size() != b.tokens.size()) {
    return absl::InvalidArgumentError("forward batch: tokens, positions and slots differ in length");
  }
  if (static_cast<int>(b.query_start.size()) != S + 1 || b.query_start.front() != 0 ||
      b.query_start.back() != T) {
    return absl::InvalidArgumentError("forward batch: query_start must run from 0 to the token count");
  }
  if (b.block_tables.size() != static_cast<size_t>(S) * b.max_blocks_per_seq) {
    return absl::InvalidArgumentError("forward batch: block_tables size != seqs * max_blocks_per_seq");
  }
  if (static_cast<int>(kv.k.size()) != c.num_layers || static_cast<int>(kv.v.size()) != c.num_layers) {
    return absl::InvalidArgumentError("forward batch: KV cache view has the wrong layer count");
  }
  for (int32_t t : b.tokens) {
    if (t < 0 || t >= c.vocab_size) {
      return absl::InvalidArgumentError(
          absl::StrCat("token id ", t, " is outside the vocabulary [0, ", c.vocab_size, ")"));
    }
  }
  for (int32_t p : b.positions) {
    if (p < 0 || p >= c.max_position_embeddings) {
      return absl::InvalidArgumentError(absl::StrCat("position ", p, " exceeds max_position_embeddings ",
                                                     c.max_position_embeddings));
    }
  }
  for (int s = 0; s < S; ++s) {
    const int32_t q_len = b.query_start[s + 1] - b.query_start[s];
    if (q_len < 0 || b.context_lens[s] < q_len ||
        b.context_lens[s] > static_cast<int64_t>(b.max_blocks_per_seq) * kv.block_size) {
      return absl::InvalidArgumentError(absl::StrCat("forward batch: sequence ", s,
                                                     " has inconsistent query/context lengths"));
    }
  }
  const int64_t slots = kv.num_blocks * kv.block_size;
  for (int64_t slot : b.slots) {
    if (slot < 0 || slot >= slots) {
      return absl::InvalidArgumentError(absl::StrCat("forward batch: KV slot ", slot, " out of range"));
    }
  }
  for (int32_t r : b.logit_rows) {
    if (r < 0 || r >= T) return absl::InvalidArgumentError("forward batch: logit row out of range");
  }
  return absl::OkStatus();
}

// An empty batch (no sequences, query_start = {0}) is valid: every layer
// runs over zero tokens and still calls the expert executor, which is how an
// idle expert-parallel rank joins a step (worker/ep/lockstep.h).
absl::Status Model::Forward(const ForwardBatch& b, const KvCacheView& kv, float* logits) {
  RETURN_IF_ERROR(Validate(b, kv));
  const ModelConfig& c = config();
  const int64_t T = b.num_tokens();
  const int64_t H = c.hidden_size;

  x_.resize(T * H);
  const Linear& embed = weights_->embed_tokens();
  kc::ParallelFor(stream(), T, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      float* dst = x_.data() + t * H;
      const int64_t row = b.tokens[t];
      if (embed.type == kc::WeightType::kBF16) {
        const auto* src = static_cast<const uint16_t*>(embed.w) + row * H;
        for (int64_t i = 0; i < H; ++i) dst[i] = Bf16ToF32(src[i]);
      } else {
        std::memcpy(dst, static_cast<const float*>(embed.w) + row * H, H * sizeof(float));
      }
    }
  });

  for (int layer = 0; layer < c.num_layers; ++layer) {
    RETURN_IF_ERROR(Layer(layer, b, kv));
  }

  // Final norm and lm_head only for the rows whose logits are wanted.
  const int64_t R = static_cast<int64_t>(b.logit_rows.size());
  if (R == 0) return absl::OkStatus();
  final_.resize(R * H);
  for (int64_t r = 0; r < R; ++r) {
    std::memcpy(final_.data() + r * H, x_.data() + b.logit_rows[r] * H, H * sizeof(float));
  }
  kc::LaunchRmsNorm({.x = final_.data(), .weight = weights_->final_norm().data(),
                     .out = final_.data(), .rows = R, .cols = H, .eps = c.rms_norm_eps},
                    stream());
  const Linear& head = weights_->lm_head();
  kc::LaunchGemm({.x = final_.data(), .m = R, .k = H, .w = head.w, .w_type = head.type,
                  .n = c.vocab_size, .y = logits},
                 stream());
  return absl::OkStatus();
}

absl::Status Model::Layer(int layer, const ForwardBatch& b, const KvCacheView& kv) {
  const ModelConfig& c = config();
  const LayerWeights& L = weights_->layers()[layer];
  const int64_t T = b.num_tokens();
  const int64_t H = c.hidden_size;
  const int D = c.head_dim;
  const int Hq = c.num_attention_heads;
  const int Hk = c.num_key_value_heads;
  auto s = stream();

  // --- attention ---
  h_.resize(T * H);
  kc::LaunchRmsNorm({.x = x_.data(), .weight = L.input_norm.data(), .out = h_.data(), .rows = T,
                     .cols = H, .eps = c.rms_norm_eps},
                    s);
  q_.resize(T * Hq * D);
  k_.resize(T * Hk * D);
  v_.resize(T * Hk * D);
  auto project = [&](const Linear& l, float* out) {
    kc::LaunchGemm({.x = h_.data(), .m = T, .k = H, .w = l.w, .w_type = l.type,
                    .n = l.out_features, .bias = l.bias.empty() ? nullptr : l.bias.data(),
                    .y = out},
                   s);
  };
  project(L.q_proj, q_.data());
  project(L.k_proj, k_.data());
  project(L.v_proj, v_.data());
  if (c.qk_norm) {
    kc::LaunchRmsNorm({.x = q_.data(), .weight = L.q_norm.data(), .out = q_.data(),
                       .rows = T * Hq, .cols = D, .eps = c.rms_norm_eps},
                      s);
    kc::LaunchRmsNorm({.x = k_.data(), .weight = L.k_norm.data(), .out = k_.data(),
                       .rows = T * Hk, .cols = D, .eps = c.rms_norm_eps},
                      s);
  }
  kc::LaunchRope({.q = q_.data(), .k = k_.data(), .positions = b.positions.data(), .tokens = T,
                  .num_q_heads = Hq, .num_kv_heads = Hk, .head_dim = D, .cos = rope_cos_.data(),
                  .sin = rope_sin_.data()},
                 s);
  kc::LaunchKvCacheWrite({.k = k_.data(), .v = v_.data(), .slots = b.slots.data(), .tokens = T,
                          .num_kv_heads = Hk, .head_dim = D, .k_cache = kv.k[layer],
                          .v_cache = kv.v[layer]},
                         s);
  attn_.resize(T * Hq * D);
  kc::LaunchPagedAttention(
      {.q = q_.data(), .out = attn_.data(), .num_q_heads = Hq, .num_kv_heads = Hk, .head_dim = D,
       .scale = 1.0f / std::sqrt(static_cast<float>(D)), .k_cache = kv.k[layer],
       .v_cache = kv.v[layer], .block_size = kv.block_size, .num_seqs = b.num_seqs(),
       .query_start = b.query_start.data(), .context_lens = b.context_lens.data(),
       .block_tables = b.block_tables.data(), .max_blocks_per_seq = b.max_blocks_per_seq,
       .sliding_window = c.sliding_window},
      s);
  // Residual add fused into the output projection.
  kc::LaunchGemm({.x = attn_.data(), .m = T, .k = Hq * D, .w = L.o_proj.w, .w_type = L.o_proj.type,
                  .n = H, .y = x_.data(), .accumulate = true},
                 s);

  // --- MLP / MoE ---
  kc::LaunchRmsNorm({.x = x_.data(), .weight = L.post_attention_norm.data(), .out = h_.data(),
                     .rows = T, .cols = H, .eps = c.rms_norm_eps},
                    s);
  mlp_out_.resize(T * H);
  if (!L.is_moe) {
    RunMlp(L.dense, h_.data(), T, mlp_out_.data(), &scratch_, s);
    for (int64_t i = 0; i < T * H; ++i) x_[i] += mlp_out_[i];
    return absl::OkStatus();
  }

  const int E = c.num_experts;
  const int K = c.num_experts_per_tok;
  router_logits_.resize(T * E);
  topk_ids_.resize(T * K);
  topk_w_.resize(T * K);
  if (T > 0) {
    kc::LaunchGemm({.x = h_.data(), .m = T, .k = H, .w = L.router.w, .w_type = L.router.type,
                    .n = E, .y = router_logits_.data()},
                   s);
    kc::LaunchRouterTopK({.logits = router_logits_.data(), .tokens = T, .num_experts = E,
                          .top_k = K, .renormalize = c.norm_topk_prob,
                          .expert_ids = topk_ids_.data(), .weights = topk_w_.data()},
                         s);
  }
  std::fill(mlp_out_.begin(), mlp_out_.end(), 0.0f);
  RETURN_IF_ERROR(Annotate(experts_->Run(layer, h_.data(), T, topk_ids_.data(), topk_w_.data(),
                                         mlp_out_.data()),
                           absl::StrCat("layer ", layer, " experts")));
  if (L.shared_expert.loaded) {
    // Qwen2-MoE: out += sigmoid(x . w_gate) * shared_expert(x).
    std::vector<float>& shared = final_;  // free until the end of Forward
    shared.resize(T * H);
    RunMlp(L.shared_expert, h_.data(), T, shared.data(), &scratch_, s);
    gate_logit_.resize(T);
    kc::LaunchGemm({.x = h_.data(), .m = T, .k = H, .w = L.shared_expert_gate.w,
                    .w_type = L.shared_expert_gate.type, .n = 1, .y = gate_logit_.data()},
                   s);
    for (int64_t t = 0; t < T; ++t) {
      const float g = 1.0f / (1.0f + std::exp(-gate_logit_[t]));
      for (int64_t i = 0; i < H; ++i) mlp_out_[t * H + i] += g * shared[t * H + i];
    }
  }
  for (int64_t i = 0; i < T * H; ++i) x_[i] += mlp_out_[i];
  return absl::OkStatus();
}

}  // namespace joule
