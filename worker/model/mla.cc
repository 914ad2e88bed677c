#include "worker/model/mla.h"

#include <algorithm>
#include <cmath>
#include <numbers>

#include "common/dtype.h"
#include "common/status.h"

namespace joule {

int64_t MlaCacheRow(const MlaConfig& mla) { return int64_t{mla.kv_lora_rank} + mla.qk_rope_head_dim; }

std::vector<float> RopeInverseFrequencies(const ModelConfig& c) {
  const int dim = c.head_dim;
  const int half = dim / 2;
  const float base = c.rope_theta;
  std::vector<float> pos_freqs(half), inv(half);
  for (int i = 0; i < half; ++i) {
    pos_freqs[i] = std::pow(base, static_cast<float>(2 * i) / static_cast<float>(dim));
    inv[i] = 1.0f / pos_freqs[i];
  }
  const YarnConfig& y = c.yarn;
  if (!y.enabled) return inv;
  // The dimension whose wavelength turns `rotations` times over the original context.
  auto correction_dim = [&](double rotations) {
    return dim * std::log(static_cast<double>(y.original_max_position_embeddings) /
                          (rotations * 2 * std::numbers::pi)) /
           (2 * std::log(static_cast<double>(base)));
  };
  double low = correction_dim(y.beta_fast), high = correction_dim(y.beta_slow);
  if (y.truncate) low = std::floor(low), high = std::ceil(high);
  low = std::max(low, 0.0);
  high = std::min(high, static_cast<double>(dim - 1));
  if (low == high) high += 0.001;  // as transformers: no division by zero
  for (int i = 0; i < half; ++i) {
    const float ramp = std::clamp(static_cast<float>((i - low) / (high - low)), 0.0f, 1.0f);
    const float extrapolation = 1.0f - ramp;
    const float interpolated = 1.0f / (y.factor * pos_freqs[i]);
    inv[i] = interpolated * (1.0f - extrapolation) + inv[i] * extrapolation;
  }
  return inv;
}

namespace {

// W[row, col] of a host matrix widened to F32 (an FP8 code times its block's scale).
float ElementOf(const Linear& l, int64_t row, int64_t col) {
  const int64_t i = row * l.in_features + col;
  switch (l.type) {
    case kernels::DType::kF32: return static_cast<const float*>(l.w)[i];
    case kernels::DType::kBF16: return Bf16ToF32(static_cast<const uint16_t*>(l.w)[i]);
    case kernels::DType::kF8E4M3: {
      const int64_t block_cols = (l.in_features + l.blocks.cols - 1) / l.blocks.cols;
      const float scale = l.scale_inv[(row / l.blocks.rows) * block_cols + col / l.blocks.cols];
      return E4M3ToF32(static_cast<const uint8_t*>(l.w)[i]) * scale;
    }
  }
  return 0.0f;
}

// Stores element i of an absorbed matrix of type `type` (BF16 only from BF16: exact).
void Put(std::byte* out, kernels::DType type, int64_t i, const Linear& kv_b, int64_t row, int64_t col) {
  if (type == kernels::DType::kBF16) {
    reinterpret_cast<uint16_t*>(out)[i] = static_cast<const uint16_t*>(kv_b.w)[row * kv_b.in_features + col];
  } else {
    reinterpret_cast<float*>(out)[i] = ElementOf(kv_b, row, col);
  }
}

// One layer's W_UK^T then W_UV (MlaLayerWeights' layouts) from kv_b_proj, into `out`.
void SplitKvB(const MlaConfig& mla, int heads, const Linear& kv_b, kernels::DType type,
              std::byte* out) {
  const int64_t R = mla.kv_lora_rank, dn = mla.qk_nope_head_dim, dv = mla.v_head_dim;
  const int64_t uv = heads * R * dn;  // elements of W_UK^T, where W_UV starts
  for (int h = 0; h < heads; ++h) {
    const int64_t first = h * (dn + dv);
    for (int64_t r = 0; r < R; ++r) {
      for (int64_t d = 0; d < dn; ++d) Put(out, type, (h * R + r) * dn + d, kv_b, first + d, r);
    }
    for (int64_t j = 0; j < dv; ++j) {
      for (int64_t r = 0; r < R; ++r) Put(out, type, uv + (h * dv + j) * R + r, kv_b, first + dn + j, r);
    }
  }
}

}  // namespace

kernels::DType MlaAbsorbedType(const Linear& kv_b_proj) {
  return kv_b_proj.type == kernels::DType::kBF16 ? kernels::DType::kBF16 : kernels::DType::kF32;
}

size_t MlaAbsorbedBytes(const ModelConfig& c, const Linear& kv_b_proj) {
  const MlaConfig& mla = c.mla;
  const int64_t elements = int64_t{c.num_attention_heads} * mla.kv_lora_rank *
                           (mla.qk_nope_head_dim + mla.v_head_dim);
  return static_cast<size_t>(elements) * kernels::ElementBytes(MlaAbsorbedType(kv_b_proj));
}

absl::StatusOr<MlaWeights> MlaWeights::Create(const ModelWeights& weights, device::Backend& backend) {
  MlaWeights out;
  const ModelConfig& c = weights.config();
  if (!c.UsesMla()) return out;
  const MlaConfig& mla = c.mla;
  const int H = c.num_attention_heads;
  std::vector<size_t> offsets;
  size_t total = 0;
  for (const LayerWeights& L : weights.layers()) {
    offsets.push_back(total);
    total += MlaAbsorbedBytes(c, L.kv_b_proj);
  }
  std::vector<std::byte> host(total);
  for (int l = 0; l < c.num_layers; ++l) {
    const Linear& kv_b = weights.layers()[l].kv_b_proj;
    SplitKvB(mla, H, kv_b, MlaAbsorbedType(kv_b), host.data() + offsets[l]);
  }
  ASSIGN_OR_RETURN(out.buffer_, backend.Allocate(device::MemoryKind::kDevice, total));
  RETURN_IF_ERROR(backend.CopyAsync(out.buffer_.data(), host.data(), total));
  RETURN_IF_ERROR(backend.Synchronize());  // `host` ends here
  for (int l = 0; l < c.num_layers; ++l) {
    const kernels::DType type = MlaAbsorbedType(weights.layers()[l].kv_b_proj);
    const std::byte* at = out.buffer_.as<std::byte>() + offsets[l];
    const size_t uk_bytes = static_cast<size_t>(H) * mla.kv_lora_rank * mla.qk_nope_head_dim *
                            kernels::ElementBytes(type);
    out.layers_.push_back({.uk_t = at, .uv = at + uk_bytes, .type = type});
  }
  return out;
}

namespace {

// The queries [tokens, heads, qk_head_dim] and the kv_a projection's rows
// [tokens, kv_lora + rope] (latent normalized in place) of the normed input.
absl::Status ProjectQueryAndLatent(device::Backend& dev, const ModelConfig& c, const LayerView& L,
                                   const MlaStep& s) {
  const StepActivations& a = s.act;
  const MlaConfig& mla = c.mla;
  const int64_t T = s.shape.tokens;
  auto project = [&](const LinearView& l, const float* x, float* y) {
    return dev.Gemm(LinearGemm(l, x, T, y, a.gemm_workspace));
  };
  if (mla.q_lora_rank > 0) {
    RETURN_IF_ERROR(project(L.q_a_proj, a.h, a.q_lora));
    RETURN_IF_ERROR(dev.RmsNorm({.x = a.q_lora, .weight = L.q_a_norm, .out = a.q_lora, .rows = T,
                                 .cols = mla.q_lora_rank, .eps = mla.latent_norm_eps}));
    RETURN_IF_ERROR(project(L.q_b_proj, a.q_lora, a.q));
  } else {
    RETURN_IF_ERROR(project(L.q_proj, a.h, a.q));
  }
  RETURN_IF_ERROR(project(L.kv_a_proj, a.h, a.kv_latent));
  return dev.RmsNorm({.x = a.kv_latent, .weight = L.kv_a_norm, .out = a.kv_latent, .rows = T,
                      .cols = mla.kv_lora_rank, .eps = mla.latent_norm_eps,
                      .stride = MlaCacheRow(mla)});
}

// For every head, y[:, h] = x[:, h] W[h]^T with per-head weights W [n, k] of
// `type`: one batched GEMM (a launch per head was 2 x heads launches a layer).
absl::Status PerHeadGemm(device::Backend& dev, int heads, const float* x, int64_t x_head,
                         int64_t ldx, int64_t k, const void* w, kernels::DType type, int64_t n,
                         float* y, int64_t y_head, int64_t ldy, int64_t tokens, void* workspace) {
  return dev.Gemm({.x = x, .m = tokens, .k = k, .ldx = ldx, .w = w, .w_type = type, .n = n,
                   .y = y, .ldy = ldy, .workspace = workspace, .batch = heads,
                   .x_batch_stride = x_head, .w_batch_stride = n * k, .y_batch_stride = y_head});
}

}  // namespace

absl::Status RunMlaAttention(device::Backend& dev, const ModelConfig& c, const LayerView& L,
                             const MlaLayerWeights& absorbed, const MlaStep& s) {
  const StepActivations& a = s.act;
  const StepMetadata& m = s.meta;
  const MlaConfig& mla = c.mla;
  const int Hq = c.num_attention_heads;
  const int64_t T = s.shape.tokens;
  const int64_t qk = mla.qk_head_dim(), R = mla.kv_lora_rank, row = MlaCacheRow(mla);
  RETURN_IF_ERROR(ProjectQueryAndLatent(dev, c, L, s));
  // Rope parts: q's into the absorbed query's last qk_rope_head_dim, the key in its cache row.
  RETURN_IF_ERROR(dev.Rope({.q = a.q + mla.qk_nope_head_dim, .k = a.kv_latent + R,
                            .positions = m.positions, .tokens = T, .num_q_heads = Hq,
                            .num_kv_heads = 1, .head_dim = mla.qk_rope_head_dim, .cos = s.cos,
                            .sin = s.sin, .q_head_stride = qk, .q_out = a.q_latent + R,
                            .q_out_head_stride = row, .k_row_stride = row,
                            .interleaved = mla.rope_interleave}));
  RETURN_IF_ERROR(dev.KvCacheWrite({.k = a.kv_latent, .slots = m.slots, .tokens = T,
                                    .num_kv_heads = 1, .head_dim = static_cast<int>(row),
                                    .k_cache = s.cache, .cache_type = s.cache_type}));
  RETURN_IF_ERROR(PerHeadGemm(dev, Hq, a.q, qk, Hq * qk, mla.qk_nope_head_dim, absorbed.uk_t,
                              absorbed.type, R, a.q_latent, row, Hq * row, T, a.gemm_workspace));
  RETURN_IF_ERROR(dev.PagedAttention(
      {.q = a.q_latent, .out = a.attn_latent, .num_q_heads = Hq, .num_kv_heads = 1,
       .head_dim = static_cast<int>(row), .v_head_dim = static_cast<int>(R),
       .scale = mla.softmax_scale, .k_cache = s.cache, .v_cache = s.cache,
       .cache_type = s.cache_type, .block_size = s.block_size,
       .num_seqs = static_cast<int>(s.shape.seqs), .query_start = m.query_start,
       .context_lens = m.context_lens, .block_tables = m.block_tables,
       .max_blocks_per_seq = static_cast<int>(s.shape.blocks_per_seq), .num_tokens = T,
       .max_context_len = s.shape.max_context_len, .workspace = a.attention_workspace}));
  const int64_t dv = mla.v_head_dim;
  RETURN_IF_ERROR(PerHeadGemm(dev, Hq, a.attn_latent, R, Hq * R, R, absorbed.uv, absorbed.type,
                              dv, a.attn, dv, Hq * dv, T, a.gemm_workspace));
  // Residual add fused into the output projection.
  return dev.Gemm({.x = a.attn, .m = T, .k = Hq * dv, .w = L.o_proj.w, .w_type = L.o_proj.type,
                   .n = c.hidden_size, .y = a.x, .accumulate = true,
                   .workspace = a.gemm_workspace, .w_scale_inv = L.o_proj.scale_inv,
                   .w_blocks = L.o_proj.blocks});
}

}  // namespace joule
