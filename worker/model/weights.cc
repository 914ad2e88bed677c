#include "worker/model/weights.h"

#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status.h"
#include "worker/model/mla.h"

namespace joule {
namespace {

using kernels::cpu::WeightType;

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

absl::Status CheckShape(const TensorView& t, const std::vector<int64_t>& want) {
  if (t.shape != want) {
    return absl::InvalidArgumentError(absl::StrCat("tensor '", t.name, "' in ", t.file,
                                                   " has shape ", ShapeString(t.shape),
                                                   ", expected ", ShapeString(want)));
  }
  return absl::OkStatus();
}

// A vector, an F16 matrix or block scales widened to F32.
std::vector<float> ToF32(const TensorView& t) {
  std::vector<float> out(static_cast<size_t>(t.numel()));
  const auto* u16 = static_cast<const uint16_t*>(t.data);
  switch (t.dtype) {
    case DType::kF32:
      std::memcpy(out.data(), t.data, out.size() * sizeof(float));
      break;
    case DType::kBF16:
      for (size_t i = 0; i < out.size(); ++i) out[i] = Bf16ToF32(u16[i]);
      break;
    case DType::kF16:
      for (size_t i = 0; i < out.size(); ++i) out[i] = F16ToF32(u16[i]);
      break;
    case DType::kF8E4M3: {
      const auto* u8 = static_cast<const uint8_t*>(t.data);
      for (size_t i = 0; i < out.size(); ++i) out[i] = E4M3ToF32(u8[i]);
      break;
    }
  }
  return out;
}

absl::Status TensorError(const TensorView& t, absl::string_view msg) {
  return absl::InvalidArgumentError(absl::StrCat("tensor '", t.name, "' in ", t.file, " ", msg));
}

// Reads tensors by name, checking shapes against the config and dtypes against
// its quantization_config: with block FP8, every projection is F8_E4M3 with
// its F32 block scales, and nothing else is FP8.
class Loader {
 public:
  Loader(const Checkpoint& ckpt, const ModelConfig& config) : ckpt_(ckpt), config_(config) {}

  absl::StatusOr<std::vector<float>> Vector(const std::string& name, int64_t n) const {
    ASSIGN_OR_RETURN(const TensorView* t, ckpt_.Get(name));
    RETURN_IF_ERROR(CheckShape(*t, {n}));
    if (t->dtype == DType::kF8E4M3) {
      return TensorError(*t, "is F8_E4M3; norms, biases and router biases must be F32, BF16 or F16");
    }
    return ToF32(*t);
  }

  // A projection: F8_E4M3 with block scales when config.json quantizes, else
  // F32, BF16 or F16.
  absl::StatusOr<Linear> Projection(const std::string& prefix, int64_t out_features,
                                    int64_t in_features, bool bias = false) const {
    return Load(prefix, out_features, in_features, bias, /*projection=*/true);
  }
  // A matrix quantized checkpoints keep unquantized: embeddings, lm_head, routers.
  absl::StatusOr<Linear> Matrix(const std::string& prefix, int64_t out_features,
                                int64_t in_features) const {
    return Load(prefix, out_features, in_features, false, /*projection=*/false);
  }

  absl::StatusOr<MlpWeights> Mlp(const std::string& prefix, const char* gate, const char* up,
                                 const char* down, int64_t hidden, int64_t intermediate) const {
    MlpWeights m;
    ASSIGN_OR_RETURN(m.gate, Projection(absl::StrCat(prefix, ".", gate), intermediate, hidden));
    ASSIGN_OR_RETURN(m.up, Projection(absl::StrCat(prefix, ".", up), intermediate, hidden));
    ASSIGN_OR_RETURN(m.down, Projection(absl::StrCat(prefix, ".", down), hidden, intermediate));
    m.loaded = true;
    return m;
  }
  absl::StatusOr<MlpWeights> Mlp(const std::string& prefix, int64_t hidden, int64_t intermediate) const {
    return Mlp(prefix, "gate_proj", "up_proj", "down_proj", hidden, intermediate);
  }

 private:
  absl::StatusOr<Linear> Load(const std::string& prefix, int64_t out_features, int64_t in_features,
                              bool bias, bool projection) const {
    const Fp8Quantization& fp8 = config_.fp8;
    ASSIGN_OR_RETURN(const TensorView* t, ckpt_.Get(prefix + ".weight"));
    RETURN_IF_ERROR(CheckShape(*t, {out_features, in_features}));
    Linear l;
    l.out_features = out_features;
    l.in_features = in_features;
    if (t->dtype == DType::kF8E4M3) {
      if (!fp8.enabled) return TensorError(*t, "is F8_E4M3 but config.json has no quantization_config");
      if (!projection) {
        return TensorError(*t, absl::StrCat("is F8_E4M3, but only the projections of ",
                                            config_.architecture, " are FP8"));
      }
      RETURN_IF_ERROR(LoadScales(*t, &l));
    } else if (fp8.enabled && projection) {
      return TensorError(*t, absl::StrCat("is ", std::string(DTypeName(t->dtype)),
                                          ", but config.json's quantization_config (fp8) makes every "
                                          "projection F8_E4M3 with block scales"));
    }
    switch (t->dtype) {
      case DType::kBF16:
        l.w = t->data;
        l.type = WeightType::kBF16;
        break;
      case DType::kF32:
        l.w = t->data;
        l.type = WeightType::kF32;
        break;
      case DType::kF16:  // no F16 GEMM path: widen once
        l.owned_f32 = ToF32(*t);
        l.w = l.owned_f32.data();
        l.type = WeightType::kF32;
        break;
      case DType::kF8E4M3:  // the codes as stored, widened in the GEMM
        l.w = t->data;
        l.type = WeightType::kF8E4M3;
        break;
    }
    if (bias) {
      ASSIGN_OR_RETURN(l.bias, Vector(prefix + ".bias", out_features));
    } else if (ckpt_.Has(prefix + ".bias")) {
      return absl::InvalidArgumentError(absl::StrCat(
          "checkpoint has '", prefix, ".bias' but the config says this projection has no bias"));
    }
    return l;
  }

  // `<weight>_scale_inv`: one F32 scale per block of the FP8 tensor `w`.
  absl::Status LoadScales(const TensorView& w, Linear* l) const {
    const Fp8Quantization& fp8 = config_.fp8;
    const std::string name = w.name + "_scale_inv";
    const std::string blocks = absl::StrCat("one scale per ", fp8.block_rows, "x", fp8.block_cols,
                                            " block of '", w.name, "' ", ShapeString(w.shape));
    if (!ckpt_.Has(name)) {
      return absl::InvalidArgumentError(absl::StrCat("checkpoint ", ckpt_.dir(), ": tensor '", name,
                                                     "' is missing (", blocks, ")"));
    }
    ASSIGN_OR_RETURN(const TensorView* s, ckpt_.Get(name));
    const std::vector<int64_t> grid = {(w.shape[0] + fp8.block_rows - 1) / fp8.block_rows,
                                       (w.shape[1] + fp8.block_cols - 1) / fp8.block_cols};
    if (s->shape != grid) {
      return TensorError(*s, absl::StrCat("has shape ", ShapeString(s->shape), ", expected ",
                                          ShapeString(grid), " (", blocks, ")"));
    }
    if (s->dtype == DType::kF8E4M3) return TensorError(*s, "is F8_E4M3; block scales are F32");
    if (s->dtype == DType::kF32) {
      l->scale_inv = static_cast<const float*>(s->data);
    } else {
      l->owned_scale_inv = ToF32(*s);
      l->scale_inv = l->owned_scale_inv.data();
    }
    const int64_t n = grid[0] * grid[1];
    for (int64_t i = 0; i < n; ++i) {
      if (!std::isfinite(l->scale_inv[i])) {
        return TensorError(*s, absl::StrCat("holds ", l->scale_inv[i], " at block ", i / grid[1], ", ",
                                            i % grid[1], "; block scales must be finite"));
      }
    }
    l->blocks = {.rows = fp8.block_rows, .cols = fp8.block_cols, .first_row = 0};
    return absl::OkStatus();
  }

  const Checkpoint& ckpt_;
  const ModelConfig& config_;
};

// A DeepseekV3ForCausalLM decoder layer: multi-head latent attention, then the
// dense MLP (below first_k_dense_replace) or the routed experts (noaux_tc
// router with its selection bias) plus the ungated shared experts.
absl::Status LoadDeepseekV3Layer(const Loader& load, const ModelConfig& c, int i,
                                 const WeightLoadOptions& options, LayerWeights& L) {
  const int64_t H = c.hidden_size;
  const int64_t heads = c.num_attention_heads;
  const MlaConfig& mla = c.mla;
  const std::string p = absl::StrCat("model.layers.", i);
  ASSIGN_OR_RETURN(L.input_norm, load.Vector(p + ".input_layernorm.weight", H));
  ASSIGN_OR_RETURN(L.post_attention_norm, load.Vector(p + ".post_attention_layernorm.weight", H));
  const std::string a = p + ".self_attn";
  if (mla.q_lora_rank > 0) {
    ASSIGN_OR_RETURN(L.q_a_proj, load.Projection(a + ".q_a_proj", mla.q_lora_rank, H));
    ASSIGN_OR_RETURN(L.q_a_norm, load.Vector(a + ".q_a_layernorm.weight", mla.q_lora_rank));
    ASSIGN_OR_RETURN(L.q_b_proj, load.Projection(a + ".q_b_proj", heads * mla.qk_head_dim(),
                                                 mla.q_lora_rank));
  } else {
    ASSIGN_OR_RETURN(L.q_proj, load.Projection(a + ".q_proj", heads * mla.qk_head_dim(), H));
  }
  ASSIGN_OR_RETURN(L.kv_a_proj, load.Projection(a + ".kv_a_proj_with_mqa",
                                                mla.kv_lora_rank + mla.qk_rope_head_dim, H));
  ASSIGN_OR_RETURN(L.kv_a_norm, load.Vector(a + ".kv_a_layernorm.weight", mla.kv_lora_rank));
  ASSIGN_OR_RETURN(L.kv_b_proj, load.Projection(a + ".kv_b_proj",
                                                heads * (mla.qk_nope_head_dim + mla.v_head_dim),
                                                mla.kv_lora_rank));
  ASSIGN_OR_RETURN(L.o_proj, load.Projection(a + ".o_proj", H, heads * mla.v_head_dim));

  const std::string m = p + ".mlp";
  L.is_moe = c.IsMoeLayer(i);
  if (!L.is_moe) {
    ASSIGN_OR_RETURN(L.dense, load.Mlp(m, H, c.intermediate_size));
    return absl::OkStatus();
  }
  ASSIGN_OR_RETURN(L.router, load.Matrix(m + ".gate", c.num_experts, H));
  ASSIGN_OR_RETURN(L.router_bias, load.Vector(m + ".gate.e_score_correction_bias", c.num_experts));
  L.experts.resize(c.num_experts);
  for (int e = 0; e < c.num_experts; ++e) {
    if (options.owns_expert && !options.owns_expert(i, e)) continue;
    ASSIGN_OR_RETURN(L.experts[e], load.Mlp(absl::StrCat(m, ".experts.", e), H, c.moe_intermediate_size));
  }
  if (c.shared_expert_intermediate_size > 0) {
    ASSIGN_OR_RETURN(L.shared_expert, load.Mlp(m + ".shared_experts", H, c.shared_expert_intermediate_size));
  }
  return absl::OkStatus();
}

using AsType = std::optional<kernels::DType>;

size_t MlpBytes(const MlpWeights& m, AsType as = std::nullopt) {
  return m.gate.bytes(as) + m.up.bytes(as) + m.down.bytes(as);
}

// Bytes of a layer's weights that every token reads: attention, and the dense
// MLP or the router and shared expert. Routed experts are counted by the caller.
size_t LayerBytesExceptRoutedExperts(const LayerWeights& L, AsType as = std::nullopt) {
  size_t total = L.q_proj.bytes(as) + L.k_proj.bytes(as) + L.v_proj.bytes(as) + L.o_proj.bytes(as) +
                 L.q_a_proj.bytes(as) + L.q_b_proj.bytes(as) + L.kv_a_proj.bytes(as) +
                 L.kv_b_proj.bytes(as);
  if (!L.is_moe) return total + MlpBytes(L.dense, as);
  total += L.router.bytes(as);
  if (L.shared_expert.loaded) total += MlpBytes(L.shared_expert, as) + L.shared_expert_gate.bytes(as);
  return total;
}

}  // namespace

size_t Linear::bytes(std::optional<kernels::DType> as) const {
  const kernels::DType stored = type == kernels::DType::kF8E4M3 ? type : as.value_or(type);
  size_t total = static_cast<size_t>(out_features * in_features) * kernels::ElementBytes(stored) +
                 bias.size() * sizeof(float);
  if (stored == kernels::DType::kF8E4M3) {  // and its block scales
    total += static_cast<size_t>(((out_features + blocks.rows - 1) / blocks.rows) *
                                 ((in_features + blocks.cols - 1) / blocks.cols)) * sizeof(float);
  }
  return total;
}

absl::StatusOr<std::unique_ptr<ModelWeights>> ModelWeights::Load(const std::string& model_dir,
                                                                 const WeightLoadOptions& options) {
  auto mw = std::unique_ptr<ModelWeights>(new ModelWeights());
  ASSIGN_OR_RETURN(mw->config_, LoadModelConfig(model_dir));
  ASSIGN_OR_RETURN(mw->checkpoint_, Checkpoint::Open(model_dir));
  const ModelConfig& c = mw->config_;
  const Checkpoint& ckpt = *mw->checkpoint_;
  const int64_t H = c.hidden_size;
  const int64_t D = c.head_dim;

  const Loader load(ckpt, c);
  ASSIGN_OR_RETURN(mw->embed_, load.Matrix("model.embed_tokens", c.vocab_size, H));
  if (c.tie_word_embeddings) {
    // Shares the embedding's storage (and its widened copy, if any).
    mw->lm_head_.w = mw->embed_.w;
    mw->lm_head_.type = mw->embed_.type;
    mw->lm_head_.out_features = c.vocab_size;
    mw->lm_head_.in_features = H;
  } else {
    ASSIGN_OR_RETURN(mw->lm_head_, load.Matrix("lm_head", c.vocab_size, H));
  }
  ASSIGN_OR_RETURN(mw->final_norm_, load.Vector("model.norm.weight", H));

  const bool mixtral = c.family == ModelFamily::kMixtral;
  mw->layers_.resize(c.num_layers);
  for (int i = 0; i < c.num_layers; ++i) {
    LayerWeights& L = mw->layers_[i];
    if (c.family == ModelFamily::kDeepseekV3) {
      RETURN_IF_ERROR(LoadDeepseekV3Layer(load, c, i, options, L));
      continue;
    }
    const std::string p = absl::StrCat("model.layers.", i);
    auto annotate = [&](const absl::Status& s) { return Annotate(s, absl::StrCat("layer ", i)); };
    auto v = load.Vector(p + ".input_layernorm.weight", H);
    if (!v.ok()) return annotate(v.status());
    L.input_norm = std::move(*v);
    v = load.Vector(p + ".post_attention_layernorm.weight", H);
    if (!v.ok()) return annotate(v.status());
    L.post_attention_norm = std::move(*v);

    const std::string a = p + ".self_attn";
    ASSIGN_OR_RETURN(L.q_proj, load.Projection(a + ".q_proj", c.num_attention_heads * D, H, c.attention_bias));
    ASSIGN_OR_RETURN(L.k_proj, load.Projection(a + ".k_proj", c.num_key_value_heads * D, H, c.attention_bias));
    ASSIGN_OR_RETURN(L.v_proj, load.Projection(a + ".v_proj", c.num_key_value_heads * D, H, c.attention_bias));
    ASSIGN_OR_RETURN(L.o_proj, load.Projection(a + ".o_proj", H, c.num_attention_heads * D));
    if (c.qk_norm) {
      ASSIGN_OR_RETURN(L.q_norm, load.Vector(a + ".q_norm.weight", D));
      ASSIGN_OR_RETURN(L.k_norm, load.Vector(a + ".k_norm.weight", D));
    }

    L.is_moe = c.IsMoeLayer(i);
    if (!L.is_moe) {
      ASSIGN_OR_RETURN(L.dense, load.Mlp(p + ".mlp", H, c.intermediate_size));
      continue;
    }
    const std::string m = mixtral ? p + ".block_sparse_moe" : p + ".mlp";
    ASSIGN_OR_RETURN(L.router, load.Matrix(m + ".gate", c.num_experts, H));
    L.experts.resize(c.num_experts);
    for (int e = 0; e < c.num_experts; ++e) {
      if (options.owns_expert && !options.owns_expert(i, e)) continue;
      const std::string ep = absl::StrCat(m, ".experts.", e);
      if (mixtral) {
        ASSIGN_OR_RETURN(L.experts[e], load.Mlp(ep, "w1", "w3", "w2", H, c.moe_intermediate_size));
      } else {
        ASSIGN_OR_RETURN(L.experts[e], load.Mlp(ep, H, c.moe_intermediate_size));
      }
    }
    if (c.shared_expert_intermediate_size > 0) {
      ASSIGN_OR_RETURN(L.shared_expert, load.Mlp(m + ".shared_expert", H, c.shared_expert_intermediate_size));
      ASSIGN_OR_RETURN(L.shared_expert_gate, load.Projection(m + ".shared_expert_gate", 1, H));
    }
  }
  return mw;
}

size_t ModelWeights::ActiveBytesPerToken(std::optional<kernels::DType> as) const {
  size_t total = lm_head_.bytes(as);
  for (const LayerWeights& L : layers_) {
    total += LayerBytesExceptRoutedExperts(L, as);
    if (config_.UsesMla()) {  // decode reads the absorbed per-head matrices instead
      total += MlaAbsorbedBytes(config_, L.kv_b_proj) - L.kv_b_proj.bytes(as);
    }
    // Every expert of a layer has the same shape and dtype; any loaded one stands for all.
    for (const MlpWeights& e : L.experts) {
      if (!e.loaded) continue;
      total += MlpBytes(e, as) * static_cast<size_t>(config_.num_experts_per_tok);
      break;
    }
  }
  return total;
}

size_t ModelWeights::LoadedBytes() const {
  size_t total = embed_.bytes() + (config_.tie_word_embeddings ? 0 : lm_head_.bytes());
  for (const LayerWeights& L : layers_) {
    total += LayerBytesExceptRoutedExperts(L);
    for (const MlpWeights& e : L.experts) {
      if (e.loaded) total += MlpBytes(e);
    }
  }
  return total;
}

}  // namespace joule
