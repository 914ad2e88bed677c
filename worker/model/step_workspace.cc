#include "worker/model/step_workspace.h"

#include <algorithm>
#include <cstring>

#include "common/status.h"
#include "worker/model/mla.h"

namespace joule {

StepShape StepShape::Max(const StepShape& s) const {
  return {std::max(tokens, s.tokens), std::max(seqs, s.seqs),
          std::max(blocks_per_seq, s.blocks_per_seq), std::max(logit_rows, s.logit_rows),
          std::max(max_context_len, s.max_context_len)};
}

namespace {

// The widest intermediate of the dense MLP layers and the shared expert.
int64_t DenseIntermediate(const ModelConfig& c) {
  int64_t widest = c.shared_expert_intermediate_size;
  for (int l = 0; l < c.num_layers; ++l) {
    if (!c.IsMoeLayer(l)) widest = std::max(widest, c.intermediate_size);
  }
  return widest;
}

// Row widths of the attention buffers (0: the model has no such buffer).
struct AttentionWidths {
  int64_t q = 0, k = 0, attn = 0, q_lora = 0, kv_latent = 0, q_latent = 0, attn_latent = 0;
  int attention_head_dim = 0;  // the head_dim PagedAttention runs at
};

AttentionWidths WidthsOf(const ModelConfig& c) {
  const int64_t Hq = c.num_attention_heads;
  if (!c.UsesMla()) {
    const int64_t qd = Hq * c.head_dim;
    return {.q = qd, .k = int64_t{c.num_key_value_heads} * c.head_dim, .attn = qd,
            .attention_head_dim = c.head_dim};
  }
  const MlaConfig& mla = c.mla;
  const int64_t row = MlaCacheRow(mla);
  return {.q = Hq * mla.qk_head_dim(), .attn = Hq * mla.v_head_dim, .q_lora = mla.q_lora_rank,
          .kv_latent = row, .q_latent = Hq * row, .attn_latent = Hq * mla.kv_lora_rank,
          .attention_head_dim = static_cast<int>(row)};
}

}  // namespace

StepMetadata StepWorkspace::Carve(std::byte* base) const {
  return {.tokens = reinterpret_cast<int32_t*>(base + tokens_),
          .positions = reinterpret_cast<int32_t*>(base + positions_),
          .slots = reinterpret_cast<int64_t*>(base + slots_),
          .query_start = reinterpret_cast<int32_t*>(base + query_start_),
          .context_lens = reinterpret_cast<int32_t*>(base + context_lens_),
          .block_tables = reinterpret_cast<int32_t*>(base + block_tables_),
          .logit_rows = reinterpret_cast<int32_t*>(base + logit_rows_),
          .temperature = reinterpret_cast<float*>(base + temperature_),
          .uniform = reinterpret_cast<double*>(base + uniform_),
          .valid_tokens = reinterpret_cast<int64_t*>(base + valid_tokens_)};
}

absl::Status StepWorkspace::Allocate(device::Backend& backend, const ModelConfig& c,
                                     const StepShape& shape) {
  const int64_t T = std::max<int64_t>(1, shape.tokens);
  const int64_t S = std::max<int64_t>(1, shape.seqs);
  const int64_t R = std::max<int64_t>(1, shape.logit_rows);
  const int64_t H = c.hidden_size;
  const AttentionWidths w = WidthsOf(c);
  const int64_t dense = DenseIntermediate(c);
  const int64_t E = std::max(c.num_experts, 1);
  const int64_t K = std::max(c.num_experts_per_tok, 1);
  const bool host = backend.device_memory_is_host();

  device::WorkspaceLayout layout;
  tokens_ = layout.Reserve(T * sizeof(int32_t));
  positions_ = layout.Reserve(T * sizeof(int32_t));
  slots_ = layout.Reserve(T * sizeof(int64_t));
  query_start_ = layout.Reserve((S + 1) * sizeof(int32_t));
  context_lens_ = layout.Reserve(S * sizeof(int32_t));
  logit_rows_ = layout.Reserve(R * sizeof(int32_t));
  temperature_ = layout.Reserve(R * sizeof(float));
  uniform_ = layout.Reserve(R * sizeof(double));
  valid_tokens_ = layout.Reserve(sizeof(int64_t));
  // Last, so a step copies only the rows of its block tables it uses.
  block_tables_ = layout.Reserve(S * std::max<int64_t>(1, shape.blocks_per_seq) * sizeof(int32_t));
  metadata_bytes_ = layout.bytes();
  auto floats = [&](int64_t n) { return layout.Reserve(static_cast<size_t>(n) * sizeof(float)); };
  const size_t x = floats(T * H), h = floats(T * H), q = floats(T * w.q), k = floats(T * w.k),
               v = floats(T * w.k), attn = floats(T * w.attn), q_lora = floats(T * w.q_lora),
               kv_latent = floats(T * w.kv_latent), q_latent = floats(T * w.q_latent),
               attn_latent = floats(T * w.attn_latent), mlp_out = floats(T * H),
               shared = floats(T * H), scratch = floats(2 * T * dense),
               router = floats(T * E), ids = floats(T * K), weights = floats(T * K),
               gate = floats(T), final = floats(R * H),
               logits = host ? 0 : floats(R * c.vocab_size), tokens = floats(R);
  const size_t gemm = layout.Reserve(
      backend.GemmWorkspaceBytes(std::max(T, R), std::max({H, w.q, w.attn, w.attn_latent, dense})));
  // A step with fewer tokens may split its keys into more parts (decode), so
  // the attention workspace is the largest any step up to T tokens asks for.
  size_t attention_bytes = 0;
  for (int64_t t = 1; t <= T; ++t) {
    attention_bytes = std::max(attention_bytes, backend.AttentionWorkspaceBytes(
        t, c.num_attention_heads, w.attention_head_dim, shape.max_context_len));
  }
  const size_t attention = layout.Reserve(attention_bytes);

  device_.Reset();
  staging_.Reset();
  ASSIGN_OR_RETURN(device_, backend.Allocate(device::MemoryKind::kDevice, layout.bytes()));
  if (!host) {
    ASSIGN_OR_RETURN(staging_, backend.Allocate(device::MemoryKind::kPinned, metadata_bytes_));
  }
  auto* base = device_.as<std::byte>();
  auto f = [base](size_t offset) { return reinterpret_cast<float*>(base + offset); };
  device_meta_ = Carve(base);
  staging_meta_ = host ? device_meta_ : Carve(staging_.as<std::byte>());
  act_ = {.x = f(x), .h = f(h), .q = f(q), .k = f(k), .v = f(v), .attn = f(attn),
          .q_lora = f(q_lora), .kv_latent = f(kv_latent), .q_latent = f(q_latent),
          .attn_latent = f(attn_latent), .mlp_out = f(mlp_out), .shared = f(shared), .mlp_scratch = f(scratch),
          .router_logits = f(router), .topk_ids = reinterpret_cast<int32_t*>(base + ids),
          .topk_weights = f(weights), .gate_logit = f(gate), .final = f(final),
          .logits = host ? nullptr : f(logits),
          .tokens = reinterpret_cast<int32_t*>(base + tokens), .gemm_workspace = base + gemm,
          .attention_workspace = base + attention};
  shape_ = shape;
  return absl::OkStatus();
}

absl::Status StepWorkspace::Stage(device::Backend& backend, const ForwardBatch& b,
                                  const StepShape& step, const StepSampling* sampling) {
  const StepMetadata& m = staging_meta_;
  const int64_t T = b.num_tokens();
  const int S = b.num_seqs();
  const int64_t R = static_cast<int64_t>(b.logit_rows.size());
  std::copy(b.tokens.begin(), b.tokens.end(), m.tokens);
  std::copy(b.positions.begin(), b.positions.end(), m.positions);
  std::copy(b.slots.begin(), b.slots.end(), m.slots);
  std::copy(b.query_start.begin(), b.query_start.end(), m.query_start);
  std::copy(b.context_lens.begin(), b.context_lens.end(), m.context_lens);
  std::copy(b.logit_rows.begin(), b.logit_rows.end(), m.logit_rows);
  for (int s = 0; s < S; ++s) {
    int32_t* row = m.block_tables + s * step.blocks_per_seq;
    std::copy_n(b.block_tables.begin() + int64_t{s} * b.max_blocks_per_seq, b.max_blocks_per_seq, row);
    std::fill(row + b.max_blocks_per_seq, row + step.blocks_per_seq, 0);
  }
  // Padding: one token per padded sequence, no context, no slot.
  for (int64_t t = T; t < step.tokens; ++t) {
    m.tokens[t] = 0;
    m.positions[t] = 0;
    m.slots[t] = -1;
  }
  for (int64_t s = S; s < step.seqs; ++s) {
    m.query_start[s + 1] = static_cast<int32_t>(T + (s + 1 - S));
    m.context_lens[s] = 0;
    std::fill_n(m.block_tables + s * step.blocks_per_seq, step.blocks_per_seq, 0);
  }
  for (int64_t r = R; r < step.logit_rows; ++r) {
    m.logit_rows[r] = static_cast<int32_t>(std::min(r, step.tokens - 1));
  }
  for (int64_t r = 0; r < step.logit_rows; ++r) {
    const bool device = sampling != nullptr && r < R;
    m.temperature[r] = device ? sampling->temperature[r] : -1.0f;
    m.uniform[r] = device ? sampling->uniform[r] : 0.0;
  }
  *m.valid_tokens = T;
  if (backend.device_memory_is_host()) return absl::OkStatus();
  const size_t used = block_tables_ + static_cast<size_t>(step.seqs * step.blocks_per_seq) * sizeof(int32_t);
  return backend.CopyAsync(device_.data(), staging_.data(), std::min(used, metadata_bytes_));
}

}  // namespace joule
