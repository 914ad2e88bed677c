#include "worker/model/weights.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status.h"

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
  }
  return out;
}

absl::StatusOr<std::vector<float>> LoadVector(const Checkpoint& ckpt, const std::string& name,
                                              int64_t n) {
  ASSIGN_OR_RETURN(const TensorView* t, ckpt.Get(name));
  RETURN_IF_ERROR(CheckShape(*t, {n}));
  return ToF32(*t);
}

absl::StatusOr<Linear> LoadLinear(const Checkpoint& ckpt, const std::string& prefix,
                                  int64_t out_features, int64_t in_features, bool bias) {
  ASSIGN_OR_RETURN(const TensorView* t, ckpt.Get(prefix + ".weight"));
  RETURN_IF_ERROR(CheckShape(*t, {out_features, in_features}));
  Linear l;
  l.out_features = out_features;
  l.in_features = in_features;
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
  }
  if (bias) {
    ASSIGN_OR_RETURN(l.bias, LoadVector(ckpt, prefix + ".bias", out_features));
  } else if (ckpt.Has(prefix + ".bias")) {
    return absl::InvalidArgumentError(absl::StrCat(
        "checkpoint has '", prefix, ".bias' but the config says this projection has no bias"));
  }
  return l;
}

absl::StatusOr<MlpWeights> LoadMlp(const Checkpoint& ckpt, const std::string& prefix,
                                   const char* gate, const char* up, const char* down,
                                   int64_t hidden, int64_t intermediate) {
  MlpWeights m;
  ASSIGN_OR_RETURN(m.gate, LoadLinear(ckpt, absl::StrCat(prefix, ".", gate), intermediate, hidden, false));
  ASSIGN_OR_RETURN(m.up, LoadLinear(ckpt, absl::StrCat(prefix, ".", up), intermediate, hidden, false));
  ASSIGN_OR_RETURN(m.down, LoadLinear(ckpt, absl::StrCat(prefix, ".", down), hidden, intermediate, false));
  m.loaded = true;
  return m;
}

using AsType = std::optional<kernels::DType>;

size_t MlpBytes(const MlpWeights& m, AsType as = std::nullopt) {
  return m.gate.bytes(as) + m.up.bytes(as) + m.down.bytes(as);
}

// Bytes of a layer's weights that every token reads: attention, and the dense
// MLP or the router and shared expert. Routed experts are counted by the caller.
size_t LayerBytesExceptRoutedExperts(const LayerWeights& L, AsType as = std::nullopt) {
  size_t total = L.q_proj.bytes(as) + L.k_proj.bytes(as) + L.v_proj.bytes(as) + L.o_proj.bytes(as);
  if (!L.is_moe) return total + MlpBytes(L.dense, as);
  total += L.router.bytes(as);
  if (L.shared_expert.loaded) total += MlpBytes(L.shared_expert, as) + L.shared_expert_gate.bytes(as);
  return total;
}

}  // namespace

size_t Linear::bytes(std::optional<kernels::DType> as) const {
  const size_t elem = kernels::ElementBytes(as.value_or(type));
  return static_cast<size_t>(out_features * in_features) * elem + bias.size() * sizeof(float);
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

  ASSIGN_OR_RETURN(mw->embed_, LoadLinear(ckpt, "model.embed_tokens", c.vocab_size, H, false));
  if (c.tie_word_embeddings) {
    // Shares the embedding's storage (and its widened copy, if any).
    mw->lm_head_.w = mw->embed_.w;
    mw->lm_head_.type = mw->embed_.type;
    mw->lm_head_.out_features = c.vocab_size;
    mw->lm_head_.in_features = H;
  } else {
    ASSIGN_OR_RETURN(mw->lm_head_, LoadLinear(ckpt, "lm_head", c.vocab_size, H, false));
  }
  ASSIGN_OR_RETURN(mw->final_norm_, LoadVector(ckpt, "model.norm.weight", H));

  const bool mixtral = c.family == ModelFamily::kMixtral;
  mw->layers_.resize(c.num_layers);
  for (int i = 0; i < c.num_layers; ++i) {
    LayerWeights& L = mw->layers_[i];
    const std::string p = absl::StrCat("model.layers.", i);
    auto annotate = [&](const absl::Status& s) { return Annotate(s, absl::StrCat("layer ", i)); };
    auto v = LoadVector(ckpt, p + ".input_layernorm.weight", H);
    if (!v.ok()) return annotate(v.status());
    L.input_norm = std::move(*v);
    v = LoadVector(ckpt, p + ".post_attention_layernorm.weight", H);
    if (!v.ok()) return annotate(v.status());
    L.post_attention_norm = std::move(*v);

    const std::string a = p + ".self_attn";
    ASSIGN_OR_RETURN(L.q_proj, LoadLinear(ckpt, a + ".q_proj", c.num_attention_heads * D, H, c.attention_bias));
    ASSIGN_OR_RETURN(L.k_proj, LoadLinear(ckpt, a + ".k_proj", c.num_key_value_heads * D, H, c.attention_bias));
    ASSIGN_OR_RETURN(L.v_proj, LoadLinear(ckpt, a + ".v_proj", c.num_key_value_heads * D, H, c.attention_bias));
    ASSIGN_OR_RETURN(L.o_proj, LoadLinear(ckpt, a + ".o_proj", H, c.num_attention_heads * D, false));
    if (c.qk_norm) {
      ASSIGN_OR_RETURN(L.q_norm, LoadVector(ckpt, a + ".q_norm.weight", D));
      ASSIGN_OR_RETURN(L.k_norm, LoadVector(ckpt, a + ".k_norm.weight", D));
    }

    L.is_moe = c.IsMoeLayer(i);
    if (!L.is_moe) {
      ASSIGN_OR_RETURN(L.dense, LoadMlp(ckpt, p + ".mlp", "gate_proj", "up_proj", "down_proj", H,
                                        c.intermediate_size));
      continue;
    }
    const std::string m = mixtral ? p + ".block_sparse_moe" : p + ".mlp";
    ASSIGN_OR_RETURN(L.router, LoadLinear(ckpt, m + ".gate", c.num_experts, H, false));
    L.experts.resize(c.num_experts);
    for (int e = 0; e < c.num_experts; ++e) {
      if (options.owns_expert && !options.owns_expert(i, e)) continue;
      const std::string ep = absl::StrCat(m, ".experts.", e);
      if (mixtral) {
        ASSIGN_OR_RETURN(L.experts[e], LoadMlp(ckpt, ep, "w1", "w3", "w2", H, c.moe_intermediate_size));
      } else {
        ASSIGN_OR_RETURN(L.experts[e], LoadMlp(ckpt, ep, "gate_proj", "up_proj", "down_proj", H,
                                               c.moe_intermediate_size));
      }
    }
    if (c.shared_expert_intermediate_size > 0) {
      ASSIGN_OR_RETURN(L.shared_expert, LoadMlp(ckpt, m + ".shared_expert", "gate_proj", "up_proj",
                                                "down_proj", H, c.shared_expert_intermediate_size));
      ASSIGN_OR_RETURN(L.shared_expert_gate, LoadLinear(ckpt, m + ".shared_expert_gate", 1, H, false));
    }
  }
  return mw;
}

size_t ModelWeights::ActiveBytesPerToken(std::optional<kernels::DType> as) const {
  size_t total = lm_head_.bytes(as);
  for (const LayerWeights& L : layers_) {
    total += LayerBytesExceptRoutedExperts(L, as);
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
