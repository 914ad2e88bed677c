// joule-make-model: writes a deterministic random checkpoint in Hugging Face
// layout (config.json, safetensors, tokenizer.json) so tests, the demo and the
// benchmarks need no download. The engine loads it through the same code that
// loads real checkpoints.
//
//   joule-make-model --family qwen3_moe|qwen2_moe|mixtral|deepseek_v3 --preset tiny|mini
//                    --out DIR [--shards N] [--dtype bf16|f16|f32] [--seed S] [--layers N]
//   joule-make-model --family deepseek_v3 --preset tiny|wide|mini [--dtype fp8] --out DIR
//   joule-make-model --preset qwen3-30b-a3b-shape --out DIR [--layers 4]
//
// Every value is a pure function of (seed, tensor name, element index), so the
// tensors are generated in parallel chunks with the same bytes for any --threads;
// one shard is held in memory at a time.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/options.h"
#include "common/safetensors.h"
#include "common/status.h"
#include "coordinator/tokenizer/tokenizer.h"
#include "nlohmann/json.hpp"
#include "worker/tools/fp8_checkpoint.h"

namespace joule {
namespace {

constexpr char kDeepseekV3[] = "deepseek_v3";

// X(type, field, default, help); the flag is --field with '_' written '-'.
#define JOULE_MAKE_MODEL_FLAGS(X)                                                                 \
  X(std::string, family, "qwen3_moe", "model family: qwen3_moe, qwen2_moe, mixtral or deepseek_v3") \
  X(std::string, preset, "tiny",                                                                  \
    "size: tiny (tests), mini (benchmarks, ~215 MB), wide (deepseek_v3: 256 experts) or qwen3-30b-a3b-shape (Qwen3-30B-A3B's layer " \
    "shapes with 4 layers, ~6.2 GB; qwen3_moe only)")                                             \
  X(int, layers, 0, "decoder layers; 0: the preset's")                                            \
  X(int, threads, 0, "threads generating the weights; 0: every core (same bytes for any count)")  \
  X(bool, config_only, false, "write config.json and the tokenizer files but no weights")        \
  X(std::string, out, "", "output directory (created if absent; required)")                       \
  X(int, shards, 1, "number of safetensors files (> 1 writes model.safetensors.index.json)")      \
  X(std::string, dtype, "bf16",                                                                   \
    "stored dtype: bf16, f16 or f32 (same numbers); fp8 (deepseek_v3 only): E4M3 projections with " \
    "128x128 block scales, the rest BF16")                                                        \
  X(uint64_t, seed, 1234, "random seed")

struct MakeModelFlags {
  JOULE_MAKE_MODEL_FLAGS(JOULE_OPTION_FIELD)

  std::vector<Option> Options() { return {JOULE_MAKE_MODEL_FLAGS(JOULE_OPTION_BIND)}; }
  absl::Status Validate() const {
    if (out.empty()) return absl::InvalidArgumentError("--out: required (output directory)");
    if (layers < 0) return absl::InvalidArgumentError(absl::StrCat("--layers: must be >= 0, got ", layers));
    if (threads < 0) return absl::InvalidArgumentError(absl::StrCat("--threads: must be >= 0, got ", threads));
    if (shards < 1) return absl::InvalidArgumentError(absl::StrCat("--shards: must be >= 1, got ", shards));
    if (fp8() && family != kDeepseekV3) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--dtype: fp8 is the block-scaled E4M3 layout of DeepSeek-V3 checkpoints; it needs "
          "--family deepseek_v3, got --family '", family, "'"));
    }
    return ParseDType().status();
  }
  bool fp8() const { return dtype == "fp8"; }
  // The dtype of the tensors that are not FP8 (with --dtype fp8: BF16, as DeepSeek's are).
  absl::StatusOr<DType> ParseDType() const {
    if (dtype == "bf16" || dtype == "fp8") return DType::kBF16;
    if (dtype == "f16") return DType::kF16;
    if (dtype == "f32") return DType::kF32;
    return absl::InvalidArgumentError(
        absl::StrCat("--dtype: must be bf16, f16, f32 or fp8, got '", dtype, "'"));
  }
};

// Built-in tokenizer ids: 0..255 bytes, 256 <|endoftext|>, 257 <|im_start|>, 258 <|im_end|>.
constexpr int64_t kVocab = 272;  // 259 used, padded to a multiple of 16 as real models do
constexpr int64_t kEndOfText = 256;
constexpr int64_t kImEnd = 258;

struct Preset {
  int64_t hidden, layers, heads, kv_heads, head_dim, experts, top_k, moe_inter, inter, shared_inter,
      max_pos;
  int decoder_sparse_step;
  std::vector<int> mlp_only_layers;
  bool tie;
  bool norm_topk;
  int sliding_window;  // Mixtral only; 0 = null
  // Rows of the embedding and lm_head. The built-in tokenizer uses the first 259; a larger
  // vocabulary (a real model's shape) only makes those matrices the real size.
  int64_t vocab = kVocab;
};

constexpr const char* kQwen3_30B_A3B_Shape = "qwen3-30b-a3b-shape";

absl::StatusOr<Preset> GetPreset(const std::string& family, const std::string& preset) {
  if (preset == "tiny") {
    // Small enough for golden tests, shaped to exercise every code path: a
    // head_dim that is not hidden/heads (Qwen3), GQA, dense layers among MoE
    // layers, shared experts, tied embeddings, a sliding window.
    if (family == "qwen3_moe") return Preset{64, 3, 4, 2, 32, 8, 2, 32, 128, 0, 512, 1, {1}, false, true, 0};
    if (family == "qwen2_moe") return Preset{64, 4, 4, 2, 16, 8, 2, 32, 128, 96, 512, 2, {}, true, false, 0};
    if (family == "mixtral") return Preset{64, 2, 4, 1, 16, 4, 2, 48, 48, 0, 512, 1, {}, false, true, 16};
  } else if (preset == kQwen3_30B_A3B_Shape) {
    // Qwen/Qwen3-30B-A3B's config.json with 4 of its 48 layers (--layers changes that): the
    // GPU benchmark's model, the real GEMM and attention shapes at a size a borrowed GPU host
    // generates in seconds. Every layer is MoE (intermediate_size is there but unused).
    if (family != "qwen3_moe") {
      return absl::InvalidArgumentError(absl::StrCat(
          "--preset ", preset, " is a qwen3_moe shape; got --family '", family, "'"));
    }
    Preset p{2048, 4, 32, 4, 128, 128, 8, 768, 6144, 0, 40960, 1, {}, false, true, 0};
    p.vocab = 151936;
    return p;
  } else if (preset == "mini") {
    // ~200 MB of BF16 weights: the engine benchmark's model.
    if (family == "qwen3_moe") return Preset{512, 8, 8, 4, 64, 32, 4, 256, 1024, 0, 4096, 1, {}, false, true, 0};
    if (family == "qwen2_moe") return Preset{512, 8, 8, 4, 64, 32, 4, 224, 1024, 512, 4096, 1, {}, false, false, 0};
    if (family == "mixtral") return Preset{512, 8, 8, 4, 64, 8, 2, 1024, 1024, 0, 4096, 1, {}, false, true, 0};
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown --family '", family, "' or --preset '",
                                                 preset, "' (families: qwen3_moe, qwen2_moe, mixtral, deepseek_v3; presets: tiny, mini, ",
                                                 kQwen3_30B_A3B_Shape, ")"));
}

nlohmann::json MakeConfig(const std::string& family, const Preset& p) {
  nlohmann::json c;
  c["vocab_size"] = p.vocab;
  c["hidden_size"] = p.hidden;
  c["num_hidden_layers"] = p.layers;
  c["num_attention_heads"] = p.heads;
  c["num_key_value_heads"] = p.kv_heads;
  c["max_position_embeddings"] = p.max_pos;
  c["hidden_act"] = "silu";
  c["initializer_range"] = 0.02;
  c["rope_theta"] = family == "qwen2_moe" ? 10000.0 : 1000000.0;
  c["rope_scaling"] = nullptr;
  c["tie_word_embeddings"] = p.tie;
  c["torch_dtype"] = "bfloat16";
  c["bos_token_id"] = kEndOfText;
  c["eos_token_id"] = family == "mixtral" ? nlohmann::json(kEndOfText) : nlohmann::json(kImEnd);
  c["num_experts_per_tok"] = p.top_k;
  c["attention_dropout"] = 0.0;
  if (family == "mixtral") {
    c["architectures"] = {"MixtralForCausalLM"};
    c["model_type"] = "mixtral";
    c["num_local_experts"] = p.experts;
    c["intermediate_size"] = p.moe_inter;
    c["rms_norm_eps"] = 1e-5;
    c["sliding_window"] = p.sliding_window > 0 ? nlohmann::json(p.sliding_window) : nlohmann::json();
    c["router_aux_loss_coef"] = 0.02;
    return c;
  }
  c["rms_norm_eps"] = 1e-6;
  c["num_experts"] = p.experts;
  c["moe_intermediate_size"] = p.moe_inter;
  c["intermediate_size"] = p.inter;
  c["decoder_sparse_step"] = p.decoder_sparse_step;
  c["mlp_only_layers"] = p.mlp_only_layers;
  c["norm_topk_prob"] = p.norm_topk;
  c["use_sliding_window"] = false;
  c["sliding_window"] = nullptr;
  if (family == "qwen3_moe") {
    c["architectures"] = {"Qwen3MoeForCausalLM"};
    c["model_type"] = "qwen3_moe";
    c["head_dim"] = p.head_dim;
    c["attention_bias"] = false;
  } else {
    c["architectures"] = {"Qwen2MoeForCausalLM"};
    c["model_type"] = "qwen2_moe";
    c["shared_expert_intermediate_size"] = p.shared_inter;
  }
  return c;
}

// DeepSeek-V3 (DeepseekV3ForCausalLM in transformers' modeling_deepseek_v3.py): multi-head latent
// attention, sigmoid routing with a selection-only bias over expert groups (noaux_tc), shared
// experts, the first layers dense, YaRN RoPE.
// DeepSeek-V3's quantization_config.weight_block_size.
constexpr int64_t kFp8Block = 128;

struct DeepseekV3Preset {
  int64_t hidden, layers, heads;
  int64_t q_lora_rank;  // 0: no query LoRA (q_proj), written as null as DeepSeek-V2-Lite does
  int64_t kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim;
  int64_t experts, n_group, topk_group, top_k, n_shared_experts, moe_inter, inter;
  int64_t first_k_dense_replace;
  double routed_scaling_factor;
  // YaRN: max_position_embeddings = factor * original_max_position_embeddings, which keeps the
  // transformers releases that derive the factor from that ratio and those that read it agreeing.
  int64_t rope_factor, original_max_pos;
  double mscale, mscale_all_dim;
  int64_t vocab = kVocab;
  int64_t max_pos() const { return rope_factor * original_max_pos; }
};

absl::StatusOr<DeepseekV3Preset> GetDeepseekV3Preset(const std::string& preset) {
  // tiny: the golden model. The query LoRA as in DeepSeek-V3, v_head_dim != qk_nope_head_dim,
  // kv_b_proj/q_b_proj/dense MLP wider than one 128-row FP8 block (partial blocks too), 4 groups
  // of 4 experts of which 2 groups and 3 experts are chosen, one dense layer first.
  if (preset == "tiny") return DeepseekV3Preset{64, 3, 4, 48, 32, 32, 16, 24, 16, 4, 2, 3, 1, 32, 192,
                                                1, 2.5, 4, 128, 1.0, 1.0};
  // mini: the benchmark model (~205 MB BF16), without the query LoRA (DeepSeek-V2-Lite's form),
  // two shared experts and DeepSeek-V3's YaRN parameters.
  // wide: DeepSeek-V3's routing shape at tiny sizes (256 experts in 8 groups, 4 groups kept,
  // top-8), for expert parallelism over a 256-expert layout.
  if (preset == "wide") return DeepseekV3Preset{64, 2, 4, 0, 32, 16, 16, 16, 256, 8, 4, 8, 1, 16, 128,
                                                1, 2.5, 4, 128, 1.0, 1.0};
  if (preset == "mini") return DeepseekV3Preset{512, 8, 8, 0, 128, 64, 32, 64, 32, 8, 3, 4, 2, 256, 1024,
                                                1, 2.5, 40, 4096, 1.0, 1.0};
  return absl::InvalidArgumentError(
      absl::StrCat("--preset: '", preset, "' is not a deepseek_v3 preset (tiny, wide, mini)"));
}

// The keys of DeepSeek-V3's config.json (the Hugging Face release), with our sizes.
nlohmann::json MakeDeepseekV3Config(const DeepseekV3Preset& p, bool fp8) {
  nlohmann::json c;
  c["architectures"] = {"DeepseekV3ForCausalLM"};
  c["model_type"] = kDeepseekV3;
  c["vocab_size"] = p.vocab;
  c["hidden_size"] = p.hidden;
  c["intermediate_size"] = p.inter;
  c["moe_intermediate_size"] = p.moe_inter;
  c["num_hidden_layers"] = p.layers;
  c["num_attention_heads"] = p.heads;
  c["num_key_value_heads"] = p.heads;
  c["q_lora_rank"] = p.q_lora_rank > 0 ? nlohmann::json(p.q_lora_rank) : nlohmann::json();
  c["kv_lora_rank"] = p.kv_lora_rank;
  c["qk_nope_head_dim"] = p.qk_nope_head_dim;
  c["qk_rope_head_dim"] = p.qk_rope_head_dim;
  c["v_head_dim"] = p.v_head_dim;
  c["n_routed_experts"] = p.experts;
  c["n_shared_experts"] = p.n_shared_experts;
  c["num_experts_per_tok"] = p.top_k;
  c["n_group"] = p.n_group;
  c["topk_group"] = p.topk_group;
  c["topk_method"] = "noaux_tc";
  c["scoring_func"] = "sigmoid";
  c["norm_topk_prob"] = true;
  c["routed_scaling_factor"] = p.routed_scaling_factor;
  c["first_k_dense_replace"] = p.first_k_dense_replace;
  c["moe_layer_freq"] = 1;
  c["num_nextn_predict_layers"] = 0;
  c["hidden_act"] = "silu";
  c["max_position_embeddings"] = p.max_pos();
  c["rope_theta"] = 10000;
  c["rope_scaling"] = {{"type", "yarn"},
                       {"factor", p.rope_factor},
                       {"original_max_position_embeddings", p.original_max_pos},
                       {"beta_fast", 32},
                       {"beta_slow", 1},
                       {"mscale", p.mscale},
                       {"mscale_all_dim", p.mscale_all_dim}};
  c["rms_norm_eps"] = 1e-6;
  c["attention_bias"] = false;
  c["attention_dropout"] = 0.0;
  c["initializer_range"] = 0.02;
  c["tie_word_embeddings"] = false;
  c["use_cache"] = true;
  c["bos_token_id"] = kEndOfText;
  c["eos_token_id"] = kImEnd;
  if (fp8) {
    c["quantization_config"] = {{"quant_method", "fp8"},
                                {"fmt", "e4m3"},
                                {"activation_scheme", "dynamic"},
                                {"weight_block_size", {kFp8Block, kFp8Block}}};
  }
  return c;
}

uint64_t SplitMix(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

uint64_t Fnv1a(const std::string& s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char ch : s) h = (h ^ ch) * 1099511628211ull;
  return h;
}

// One tensor: values are drawn per tensor from a SplitMix64 stream keyed by
// (seed, name), so they do not depend on tensor order or sharding, and rounded
// to BF16 first so every --dtype holds the same numbers. Element i is the
// stream's (i+1)-th output, computed from its counter, so any chunk of a
// tensor can be filled on its own.
struct TensorSpec {
  std::string name;
  std::vector<int64_t> shape;
  float center, scale;
  // Stored F32 whatever --dtype says (DeepSeek-V3's e_score_correction_bias).
  bool f32 = false;
  // A projection DeepSeek-V3's FP8 checkpoints store as E4M3 with block scales (--dtype fp8).
  bool fp8 = false;
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
};

// Uninitialized storage: the filling threads touch its pages first (the page
// faults of a multi-GB checkpoint are then spread over the threads too).
struct GenTensor {
  const TensorSpec* spec;
  std::unique_ptr<uint16_t[]> u16;  // BF16 / F16
  std::unique_ptr<float[]> f32;     // F32
  DType dtype;
};

// Elements [begin, end) of `t`.
void FillChunk(GenTensor& t, int64_t begin, int64_t end, uint64_t seed) {
  const DType dtype = t.dtype;
  constexpr uint64_t kGamma = 0x9e3779b97f4a7c15ull;  // SplitMix's increment
  uint64_t state = (seed ^ Fnv1a(t.spec->name)) + static_cast<uint64_t>(begin) * kGamma;
  const float center = t.spec->center, scale = t.spec->scale;
  for (int64_t i = begin; i < end; ++i) {
    // 24 random bits -> uniform in [-1, 1).
    const float u = static_cast<float>(SplitMix(state) >> 40) * (1.0f / 8388608.0f) - 1.0f;
    const uint16_t bf = F32ToBf16(center + scale * u);
    switch (dtype) {
      case DType::kBF16: t.u16[i] = bf; break;
      case DType::kF16: t.u16[i] = F32ToF16(Bf16ToF32(bf)); break;
      case DType::kF32: t.f32[i] = Bf16ToF32(bf); break;
      case DType::kF8E4M3: break;  // never generated directly: quantized from F32 afterwards
    }
  }
}

// Allocates and fills the tensors of `specs` with `threads` threads, in chunks of 64K elements.
// Each is stored as `dtype`, except F32 for specs marked f32 and, with `fp8`, for the FP8
// projections (quantized afterwards from the same numbers).
std::vector<GenTensor> Generate(const std::vector<const TensorSpec*>& specs, uint64_t seed,
                                DType dtype, bool fp8, int threads) {
  constexpr int64_t kChunk = int64_t{1} << 16;
  struct Chunk {
    size_t tensor;
    int64_t begin, end;
  };
  std::vector<GenTensor> tensors;
  std::vector<Chunk> chunks;
  for (const TensorSpec* spec : specs) {
    GenTensor t{spec, nullptr, nullptr, spec->f32 || (fp8 && spec->fp8) ? DType::kF32 : dtype};
    const int64_t n = spec->numel();
    if (t.dtype == DType::kF32) {
      t.f32 = std::make_unique_for_overwrite<float[]>(n);
    } else {
      t.u16 = std::make_unique_for_overwrite<uint16_t[]>(n);
    }
    for (int64_t b = 0; b < n; b += kChunk) chunks.push_back({tensors.size(), b, std::min(n, b + kChunk)});
    tensors.push_back(std::move(t));
  }
  std::atomic<size_t> next{0};
  auto work = [&] {
    for (size_t c; (c = next.fetch_add(1)) < chunks.size();) {
      FillChunk(tensors[chunks[c].tensor], chunks[c].begin, chunks[c].end, seed);
    }
  };
  const size_t helpers = std::min<size_t>(static_cast<size_t>(std::max(threads, 1)), chunks.size());
  std::vector<std::thread> pool;
  for (size_t i = 1; i < helpers; ++i) pool.emplace_back(work);
  work();
  for (std::thread& th : pool) th.join();
  return tensors;
}

std::vector<TensorSpec> MakeTensorSpecs(const std::string& family, const Preset& p) {
  std::vector<TensorSpec> ts;
  auto linear = [&](const std::string& name, int64_t out, int64_t in) {
    ts.push_back({name + ".weight", {out, in}, 0.0f, 1.0f / std::sqrt(static_cast<float>(in))});
  };
  auto vec = [&](const std::string& name, int64_t n, float center, float scale) {
    ts.push_back({name, {n}, center, scale});
  };
  auto mlp = [&](const std::string& pre, const char* g, const char* u, const char* d, int64_t inter) {
    linear(absl::StrCat(pre, ".", g), inter, p.hidden);
    linear(absl::StrCat(pre, ".", u), inter, p.hidden);
    linear(absl::StrCat(pre, ".", d), p.hidden, inter);
  };
  const bool mixtral = family == "mixtral";
  const int64_t D = p.head_dim;
  // Small enough that the residual stream is not just the input token (tied
  // embeddings would otherwise make greedy decoding repeat its last token).
  ts.push_back({"model.embed_tokens.weight", {p.vocab, p.hidden}, 0.0f, 0.125f});
  for (int64_t i = 0; i < p.layers; ++i) {
    const std::string l = absl::StrCat("model.layers.", i);
    vec(l + ".input_layernorm.weight", p.hidden, 1.0f, 0.1f);
    vec(l + ".post_attention_layernorm.weight", p.hidden, 1.0f, 0.1f);
    const std::string a = l + ".self_attn";
    linear(a + ".q_proj", p.heads * D, p.hidden);
    linear(a + ".k_proj", p.kv_heads * D, p.hidden);
    linear(a + ".v_proj", p.kv_heads * D, p.hidden);
    linear(a + ".o_proj", p.hidden, p.heads * D);
    if (family == "qwen2_moe") {
      vec(a + ".q_proj.bias", p.heads * D, 0.0f, 0.1f);
      vec(a + ".k_proj.bias", p.kv_heads * D, 0.0f, 0.1f);
      vec(a + ".v_proj.bias", p.kv_heads * D, 0.0f, 0.1f);
    }
    if (family == "qwen3_moe") {
      vec(a + ".q_norm.weight", D, 1.0f, 0.1f);
      vec(a + ".k_norm.weight", D, 1.0f, 0.1f);
    }
    bool moe = true;
    if (!mixtral) {
      bool mlp_only = false;
      for (int m : p.mlp_only_layers) mlp_only |= (m == i);
      moe = !mlp_only && (i + 1) % p.decoder_sparse_step == 0;
    }
    if (!moe) {
      mlp(l + ".mlp", "gate_proj", "up_proj", "down_proj", p.inter);
      continue;
    }
    const std::string m = mixtral ? l + ".block_sparse_moe" : l + ".mlp";
    // A sharper router than 1/sqrt(hidden) so routing is decisive, as trained routers are.
    ts.push_back({m + ".gate.weight", {p.experts, p.hidden}, 0.0f,
                  4.0f / std::sqrt(static_cast<float>(p.hidden))});
    for (int64_t e = 0; e < p.experts; ++e) {
      const std::string ep = absl::StrCat(m, ".experts.", e);
      if (mixtral) mlp(ep, "w1", "w3", "w2", p.moe_inter);
      else mlp(ep, "gate_proj", "up_proj", "down_proj", p.moe_inter);
    }
    if (p.shared_inter > 0) {
      mlp(m + ".shared_expert", "gate_proj", "up_proj", "down_proj", p.shared_inter);
      linear(m + ".shared_expert_gate", 1, p.hidden);
    }
  }
  vec("model.norm.weight", p.hidden, 1.0f, 0.1f);
  if (!p.tie) linear("lm_head", p.vocab, p.hidden);
  return ts;
}

// Hugging Face names and shapes of DeepseekV3ForCausalLM (weights [out, in]).
std::vector<TensorSpec> MakeDeepseekV3TensorSpecs(const DeepseekV3Preset& p) {
  std::vector<TensorSpec> ts;
  auto scale_for = [](int64_t in) { return 1.0f / std::sqrt(static_cast<float>(in)); };
  auto linear = [&](const std::string& name, int64_t out, int64_t in) {
    TensorSpec t{name + ".weight", {out, in}, 0.0f, scale_for(in)};
    t.fp8 = true;
    ts.push_back(t);
  };
  auto vec = [&](const std::string& name, int64_t n, float center, float scale) {
    ts.push_back({name, {n}, center, scale});
  };
  auto mlp = [&](const std::string& pre, int64_t inter) {
    linear(pre + ".gate_proj", inter, p.hidden);
    linear(pre + ".up_proj", inter, p.hidden);
    linear(pre + ".down_proj", p.hidden, inter);
  };
  const int64_t qk_head_dim = p.qk_nope_head_dim + p.qk_rope_head_dim;
  ts.push_back({"model.embed_tokens.weight", {p.vocab, p.hidden}, 0.0f, 0.125f});
  for (int64_t i = 0; i < p.layers; ++i) {
    const std::string l = absl::StrCat("model.layers.", i);
    vec(l + ".input_layernorm.weight", p.hidden, 1.0f, 0.1f);
    vec(l + ".post_attention_layernorm.weight", p.hidden, 1.0f, 0.1f);
    const std::string a = l + ".self_attn";
    if (p.q_lora_rank > 0) {
      linear(a + ".q_a_proj", p.q_lora_rank, p.hidden);
      vec(a + ".q_a_layernorm.weight", p.q_lora_rank, 1.0f, 0.1f);
      linear(a + ".q_b_proj", p.heads * qk_head_dim, p.q_lora_rank);
    } else {
      linear(a + ".q_proj", p.heads * qk_head_dim, p.hidden);
    }
    // The compressed latent and the shared RoPE key of each token.
    linear(a + ".kv_a_proj_with_mqa", p.kv_lora_rank + p.qk_rope_head_dim, p.hidden);
    vec(a + ".kv_a_layernorm.weight", p.kv_lora_rank, 1.0f, 0.1f);
    linear(a + ".kv_b_proj", p.heads * (p.qk_nope_head_dim + p.v_head_dim), p.kv_lora_rank);
    linear(a + ".o_proj", p.hidden, p.heads * p.v_head_dim);
    if (i < p.first_k_dense_replace) {
      mlp(l + ".mlp", p.inter);
      continue;
    }
    const std::string m = l + ".mlp";
    // A sharp router as for the other families. The selection bias is non-negative (sigmoid
    // scores plus bias stay positive, so implementations that mask the unchosen groups with 0
    // and with -inf agree) and in [0, 0.2): on the tiny model it changes the experts of about
    // half the tokens, as does the group limit, while the scores still decide the rest.
    ts.push_back({m + ".gate.weight", {p.experts, p.hidden}, 0.0f,
                  4.0f / std::sqrt(static_cast<float>(p.hidden))});
    TensorSpec bias{m + ".gate.e_score_correction_bias", {p.experts}, 0.1f, 0.1f};
    bias.f32 = true;
    ts.push_back(bias);
    for (int64_t e = 0; e < p.experts; ++e) mlp(absl::StrCat(m, ".experts.", e), p.moe_inter);
    mlp(m + ".shared_experts", p.moe_inter * p.n_shared_experts);
  }
  vec("model.norm.weight", p.hidden, 1.0f, 0.1f);
  ts.push_back({"lm_head.weight", {p.vocab, p.hidden}, 0.0f, scale_for(p.hidden)});
  return ts;
}

absl::Status WriteText(const std::filesystem::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
  out.close();
  if (!out) return absl::InternalError(absl::StrCat("cannot write ", path.string()));
  return absl::OkStatus();
}

// One shard of a --dtype fp8 checkpoint, as DeepSeek-V3's: each FP8 projection as F8_E4M3 plus
// its F32 `<name>_scale_inv` ([ceil(out/128), ceil(in/128)]), the other tensors as generated.
// Adds the names to `weight_map` and the tensor count to `count`; returns the bytes written.
absl::StatusOr<size_t> WriteFp8Shard(const std::string& path, const std::string& file,
                                     const std::vector<GenTensor>& tensors,
                                     const std::map<std::string, std::string>& meta,
                                     nlohmann::json& weight_map, size_t* count) {
  std::vector<BlockFp8Weight> quantized;
  quantized.reserve(tensors.size());
  std::vector<TensorToWrite> out;
  size_t bytes = 0;
  for (const GenTensor& t : tensors) {
    const TensorSpec& spec = *t.spec;
    if (spec.fp8) {
      const BlockFp8Weight& q = quantized.emplace_back(
          QuantizeBlockFp8(t.f32.get(), spec.shape[0], spec.shape[1], kFp8Block, kFp8Block));
      out.push_back({spec.name, DType::kF8E4M3, spec.shape, q.e4m3.data()});
      out.push_back({spec.name + "_scale_inv", DType::kF32, {q.scale_rows, q.scale_cols}, q.scale_inv.data()});
      bytes += q.e4m3.size() + q.scale_inv.size() * sizeof(float);
    } else {
      const void* data = t.dtype == DType::kF32 ? static_cast<const void*>(t.f32.get()) : t.u16.get();
      out.push_back({spec.name, t.dtype, spec.shape, data});
      bytes += static_cast<size_t>(spec.numel()) * DTypeSize(t.dtype);
    }
  }
  for (const TensorToWrite& t : out) weight_map[t.name] = file;
  *count += out.size();
  RETURN_IF_ERROR(WriteSafetensors(path, out, meta));
  return bytes;
}

// tokenizer.json and tokenizer_config.json. DeepSeek-V3 has its own special tokens, chat
// template and BOS (tokenizer/tokenizer.h); the other families share the ChatML tokenizer.
absl::Status WriteTokenizerFiles(const std::filesystem::path& dir, const std::string& family,
                                 int64_t max_pos) {
  if (family == kDeepseekV3) {
    RETURN_IF_ERROR(WriteText(dir / "tokenizer.json", tokenizer::MakeDeepseekV3ByteLevelTokenizerJson()));
    return WriteText(dir / "tokenizer_config.json", tokenizer::MakeDeepseekV3TokenizerConfigJson(max_pos));
  }
  RETURN_IF_ERROR(WriteText(dir / "tokenizer.json", tokenizer::MakeByteLevelTokenizerJson()));
  nlohmann::json tok_cfg = {
      {"tokenizer_class", "PreTrainedTokenizerFast"},
      {"eos_token", family == "mixtral" ? "<|endoftext|>" : "<|im_end|>"},
      {"pad_token", "<|endoftext|>"},
      {"model_max_length", max_pos},
      {"chat_template",
       "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
       "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"}};
  return WriteText(dir / "tokenizer_config.json", tok_cfg.dump(2) + "\n");
}

absl::Status Run(const MakeModelFlags& flags) {
  const std::string& family = flags.family;
  const std::string& preset = flags.preset;
  const int shards = flags.shards;
  const uint64_t seed = flags.seed;
  ASSIGN_OR_RETURN(const DType dtype, flags.ParseDType());
  const bool fp8 = flags.fp8();
  nlohmann::json config;
  std::vector<TensorSpec> specs;
  int64_t layers = 0, max_pos = 0;
  if (family == kDeepseekV3) {
    ASSIGN_OR_RETURN(DeepseekV3Preset p, GetDeepseekV3Preset(preset));
    if (flags.layers > 0) p.layers = flags.layers;
    config = MakeDeepseekV3Config(p, fp8);
    specs = MakeDeepseekV3TensorSpecs(p);
    layers = p.layers;
    max_pos = p.max_pos();
  } else {
    ASSIGN_OR_RETURN(Preset p, GetPreset(family, preset));
    if (flags.layers > 0) {
      p.layers = flags.layers;
      std::erase_if(p.mlp_only_layers, [&](int l) { return l >= p.layers; });
    }
    config = MakeConfig(family, p);
    specs = MakeTensorSpecs(family, p);
    layers = p.layers;
    max_pos = p.max_pos;
  }
  std::error_code ec;
  std::filesystem::create_directories(flags.out, ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot create ", flags.out, ": ", ec.message()));
  const std::filesystem::path dir(flags.out);

  config["torch_dtype"] = dtype == DType::kBF16 ? "bfloat16" : dtype == DType::kF16 ? "float16" : "float32";
  RETURN_IF_ERROR(WriteText(dir / "config.json", config.dump(2) + "\n"));
  nlohmann::json gen = {{"bos_token_id", kEndOfText}, {"eos_token_id", config["eos_token_id"]},
                        {"do_sample", false}};
  RETURN_IF_ERROR(WriteText(dir / "generation_config.json", gen.dump(2) + "\n"));
  RETURN_IF_ERROR(WriteTokenizerFiles(dir, family, max_pos));
  if (flags.config_only) {
    std::printf("wrote the %s %s config (%lld layers) to %s, no weights\n", family.c_str(), preset.c_str(),
                static_cast<long long>(layers), flags.out.c_str());
    return absl::OkStatus();
  }

  const int threads = flags.threads > 0 ? flags.threads
                                        : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  std::map<std::string, std::string> meta = {{"format", "pt"}, {"joule_family", family},
                                             {"joule_preset", preset},
                                             {"joule_seed", std::to_string(seed)}};
  if (flags.layers > 0) meta["joule_layers"] = std::to_string(layers);
  if (fp8) meta["joule_dtype"] = "fp8";
  // Contiguous runs of tensors per shard, as Hugging Face's sharding does; one shard
  // is generated, written and freed at a time.
  using Clock = std::chrono::steady_clock;
  double generate_s = 0, write_s = 0;
  nlohmann::json weight_map = nlohmann::json::object();
  size_t total_bytes = 0, tensor_count = 0;
  const size_t per_shard = (specs.size() + shards - 1) / shards;
  for (int s = 0; s < shards; ++s) {
    const std::string file = shards == 1 ? "model.safetensors"
                                         : absl::StrFormat("model-%05d-of-%05d.safetensors", s + 1, shards);
    std::vector<const TensorSpec*> shard_specs;
    for (size_t i = s * per_shard; i < std::min(specs.size(), (s + 1) * per_shard); ++i) {
      shard_specs.push_back(&specs[i]);
    }
    const Clock::time_point t0 = Clock::now();
    const std::vector<GenTensor> tensors = Generate(shard_specs, seed, dtype, fp8, threads);
    const Clock::time_point t1 = Clock::now();
    if (fp8) {
      ASSIGN_OR_RETURN(const size_t bytes,
                       WriteFp8Shard((dir / file).string(), file, tensors, meta, weight_map, &tensor_count));
      total_bytes += bytes;
    } else {
      std::vector<TensorToWrite> w;
      for (const GenTensor& t : tensors) {
        w.push_back({t.spec->name, t.dtype, t.spec->shape,
                     t.dtype == DType::kF32 ? static_cast<const void*>(t.f32.get()) : t.u16.get()});
        weight_map[t.spec->name] = file;
        total_bytes += static_cast<size_t>(t.spec->numel()) * DTypeSize(t.dtype);
      }
      tensor_count += w.size();
      RETURN_IF_ERROR(WriteSafetensors((dir / file).string(), w, meta));
    }
    generate_s += std::chrono::duration<double>(t1 - t0).count();
    write_s += std::chrono::duration<double>(Clock::now() - t1).count();
  }
  if (shards > 1) {
    nlohmann::json index = {{"metadata", {{"total_size", total_bytes}}}, {"weight_map", weight_map}};
    RETURN_IF_ERROR(WriteText(dir / "model.safetensors.index.json", index.dump(2) + "\n"));
  } else {
    std::filesystem::remove(dir / "model.safetensors.index.json", ec);
  }
  std::printf("wrote %s %s model to %s: %zu tensors, %.1f MB in %d file(s)", family.c_str(),
              preset.c_str(), flags.out.c_str(), tensor_count, total_bytes / 1e6, shards);
  if (flags.layers > 0) std::printf(", %lld layers", static_cast<long long>(layers));
  if (fp8) std::printf(", FP8 E4M3 projections with %lldx%lld block scales", static_cast<long long>(kFp8Block),
                       static_cast<long long>(kFp8Block));
  // Only for large checkpoints, so the small ones' output stays as scripts expect it.
  if (total_bytes >= (size_t{1} << 30)) {
    std::printf("; generated at %.0f MB/s (%d threads), written at %.0f MB/s",
                total_bytes / 1e6 / std::max(generate_s, 1e-9), threads,
                total_bytes / 1e6 / std::max(write_s, 1e-9));
  }
  std::printf("\n");
  return absl::OkStatus();
}

}  // namespace
}  // namespace joule

int main(int argc, char** argv) {
  auto flags = joule::ParseConfig<joule::MakeModelFlags>(
      "writes a deterministic random checkpoint in Hugging Face layout.\n"
      "usage: joule-make-model --family qwen3_moe|qwen2_moe|mixtral|deepseek_v3 --preset tiny|mini --out DIR\n"
      "       joule-make-model --family deepseek_v3 --preset tiny|mini --dtype fp8 --out DIR\n"
      "       joule-make-model --preset qwen3-30b-a3b-shape --out DIR [--layers N]",
      "JOULE_MAKE_MODEL_", argc, argv);
  if (!flags.ok()) return joule::ReportOptionsError("joule-make-model", flags.status());
  absl::Status s = joule::Run(*flags);
  if (!s.ok()) {
    std::fprintf(stderr, "joule-make-model: %s\n", std::string(s.message()).c_str());
    return 1;
  }
  return 0;
}
