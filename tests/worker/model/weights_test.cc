// Loading checkpoints into the model: what is loaded, and clear errors for
// checkpoints that do not match their config.
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <vector>

#include "common/safetensors.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/testing/paths.h"
#include "worker/model/model.h"

namespace joule {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

// Copies a tiny model into a scratch dir so a test can damage it.
fs::path CopyModel(const std::string& name, const std::string& tag) {
  fs::path dst = fs::path(::testing::TempDir()) / ("weights_test_" + tag);
  fs::remove_all(dst);
  fs::copy(testing::TinyModelDir(name), dst, fs::copy_options::recursive);
  return dst;
}

nlohmann::json ReadJson(const fs::path& p) {
  std::ifstream in(p);
  return nlohmann::json::parse(in);
}

void WriteJson(const fs::path& p, const nlohmann::json& j) { std::ofstream(p) << j.dump(2); }

TEST(WeightsTest, LoadsEveryFamilyAndCountsBytes) {
  for (const char* name : {"qwen3_moe-tiny", "qwen2_moe-tiny", "mixtral-tiny"}) {
    auto w = ModelWeights::Load(testing::TinyModelDir(name));
    ASSERT_TRUE(w.ok()) << name << ": " << w.status();
    const ModelConfig& c = (*w)->config();
    EXPECT_GT((*w)->LoadedBytes(), (*w)->ActiveBytesPerToken()) << name;
    int moe_layers = 0;
    for (const auto& l : (*w)->layers()) moe_layers += l.is_moe;
    EXPECT_GT(moe_layers, 0) << name;
    EXPECT_EQ((*w)->layers().size(), static_cast<size_t>(c.num_layers));
  }
}

TEST(WeightsTest, DenseLayersFollowSparseStepAndMlpOnlyLayers) {
  auto q3 = ModelWeights::Load(testing::TinyModelDir("qwen3_moe-tiny"));  // mlp_only_layers [1]
  ASSERT_TRUE(q3.ok());
  EXPECT_TRUE((*q3)->layers()[0].is_moe);
  EXPECT_FALSE((*q3)->layers()[1].is_moe);
  EXPECT_TRUE((*q3)->layers()[2].is_moe);
  auto q2 = ModelWeights::Load(testing::TinyModelDir("qwen2_moe-tiny"));  // decoder_sparse_step 2
  ASSERT_TRUE(q2.ok());
  EXPECT_FALSE((*q2)->layers()[0].is_moe);
  EXPECT_TRUE((*q2)->layers()[1].is_moe);
  EXPECT_TRUE((*q2)->layers()[1].shared_expert.loaded);
}

TEST(WeightsTest, LoadsOnlyOwnedExperts) {
  auto all = ModelWeights::Load(testing::TinyModelDir("qwen3_moe-tiny"));
  WeightLoadOptions half;
  half.owns_expert = [](int, int e) { return e % 2 == 0; };
  auto some = ModelWeights::Load(testing::TinyModelDir("qwen3_moe-tiny"), half);
  ASSERT_TRUE(all.ok() && some.ok());
  EXPECT_LT((*some)->LoadedBytes(), (*all)->LoadedBytes());
  EXPECT_TRUE((*some)->layers()[0].experts[0].loaded);
  EXPECT_FALSE((*some)->layers()[0].experts[1].loaded);
}

TEST(WeightsTest, RoutingToAnExpertNotHeldIsAnError) {
  WeightLoadOptions none;
  none.owns_expert = [](int, int) { return false; };
  auto w = ModelWeights::Load(testing::TinyModelDir("qwen3_moe-tiny"), none);
  ASSERT_TRUE(w.ok());
  Model model(std::move(*w), 1);
  KvCacheView kv{.block_size = 16, .num_blocks = 4};
  std::vector<std::vector<float>> store(2 * model.config().num_layers, std::vector<float>(4 * 16 * 64 * 2));
  for (int l = 0; l < model.config().num_layers; ++l) {
    kv.k.push_back(store[2 * l].data());
    kv.v.push_back(store[2 * l + 1].data());
  }
  ForwardBatch b{.tokens = {1}, .positions = {0}, .slots = {0}, .query_start = {0, 1},
                 .context_lens = {1}, .block_tables = {0}, .max_blocks_per_seq = 1, .logit_rows = {0}};
  std::vector<float> logits(model.config().vocab_size);
  absl::Status s = model.Forward(b, kv, logits.data());
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(s.message()), HasSubstr("does not hold"));
}

TEST(WeightsTest, MissingTensorNamesTensor) {
  fs::path dir = CopyModel("qwen3_moe-tiny-sharded", "missing");
  auto index = ReadJson(dir / "model.safetensors.index.json");
  index["weight_map"].erase("model.layers.2.self_attn.k_norm.weight");
  WriteJson(dir / "model.safetensors.index.json", index);
  auto w = ModelWeights::Load(dir.string());
  ASSERT_FALSE(w.ok());
  EXPECT_THAT(std::string(w.status().message()), HasSubstr("model.layers.2.self_attn.k_norm.weight"));
}

TEST(WeightsTest, ShapeMismatchAgainstConfigNamesTensorAndShapes) {
  fs::path dir = CopyModel("mixtral-tiny", "shape");
  auto cfg = ReadJson(dir / "config.json");
  cfg["intermediate_size"] = 40;  // checkpoint has 48
  WriteJson(dir / "config.json", cfg);
  auto w = ModelWeights::Load(dir.string());
  ASSERT_FALSE(w.ok());
  const std::string msg(w.status().message());
  EXPECT_THAT(msg, HasSubstr("block_sparse_moe.experts.0.w1.weight"));
  EXPECT_THAT(msg, HasSubstr("[48, 64]"));
  EXPECT_THAT(msg, HasSubstr("[40, 64]"));
}

TEST(WeightsTest, UnexpectedBiasIsRejected) {
  fs::path dir = CopyModel("qwen2_moe-tiny", "bias");
  auto cfg = ReadJson(dir / "config.json");
  cfg["architectures"] = {"Qwen3MoeForCausalLM"};  // Qwen3 has no q/k/v bias and needs q_norm
  cfg["model_type"] = "qwen3_moe";
  WriteJson(dir / "config.json", cfg);
  auto w = ModelWeights::Load(dir.string());
  ASSERT_FALSE(w.ok());
}

TEST(WeightsTest, UnsupportedArchitectureIsRejected) {
  fs::path dir = CopyModel("qwen3_moe-tiny", "arch");
  auto cfg = ReadJson(dir / "config.json");
  cfg["architectures"] = {"LlamaForCausalLM"};
  cfg.erase("model_type");
  WriteJson(dir / "config.json", cfg);
  auto w = ModelWeights::Load(dir.string());
  ASSERT_FALSE(w.ok());
  EXPECT_THAT(std::string(w.status().message()), HasSubstr("LlamaForCausalLM"));
}

TEST(WeightsTest, ForwardRejectsOutOfVocabularyToken) {
  auto m = Model::Load(testing::TinyModelDir("mixtral-tiny"), {.num_threads = 1});
  ASSERT_TRUE(m.ok());
  KvCacheView kv{.block_size = 16, .num_blocks = 1};
  std::vector<float> store(16 * 64 * 4);
  for (int l = 0; l < (*m)->config().num_layers; ++l) {
    kv.k.push_back(store.data());
    kv.v.push_back(store.data());
  }
  ForwardBatch b{.tokens = {100000}, .positions = {0}, .slots = {0}, .query_start = {0, 1},
                 .context_lens = {1}, .block_tables = {0}, .max_blocks_per_seq = 1, .logit_rows = {0}};
  std::vector<float> logits((*m)->config().vocab_size);
  absl::Status s = (*m)->Forward(b, kv, logits.data());
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("100000"));
}

// --- DeepSeek-V3 (multi-head latent attention, noaux_tc routing, FP8) ------

// Rewrites DIR/model.safetensors after `edit` changed its tensor list (views of
// the old file stay valid until the rename replaces it).
void RewriteTensors(const fs::path& dir,
                    const std::function<void(std::vector<TensorToWrite>&)>& edit) {
  const std::string path = (dir / "model.safetensors").string();
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  std::vector<TensorToWrite> tensors;
  for (const auto& [name, t] : (*file)->tensors()) tensors.push_back({name, t.dtype, t.shape, t.data});
  edit(tensors);
  ASSERT_TRUE(WriteSafetensors(path, tensors, (*file)->metadata()).ok());
}

TensorToWrite* Find(std::vector<TensorToWrite>& tensors, const std::string& name) {
  for (TensorToWrite& t : tensors) {
    if (t.name == name) return &t;
  }
  ADD_FAILURE() << "no tensor " << name;
  return nullptr;
}

// Loading `dir` fails with InvalidArgument containing every needle.
void ExpectLoadError(const fs::path& dir, const std::vector<std::string>& needles) {
  auto w = ModelWeights::Load(dir.string());
  ASSERT_FALSE(w.ok()) << "loaded; expected an error containing " << needles[0];
  EXPECT_EQ(w.status().code(), absl::StatusCode::kInvalidArgument) << w.status();
  for (const std::string& n : needles) EXPECT_THAT(std::string(w.status().message()), HasSubstr(n));
}

// joule-make-model's tiny preset: hidden 64, 4 heads, q LoRA 48, kv LoRA 32,
// nope 32 / rope 16 / v 24, 16 experts of 32 in 4 groups, one shared expert,
// layer 0 dense (192).
TEST(WeightsTest, DeepseekV3LoadsMlaRoutingSharedExpertsAndDenseLayers) {
  for (const char* name : {"deepseek_v3-tiny", "deepseek_v3_fp8-tiny"}) {
    SCOPED_TRACE(name);
    const bool fp8 = std::string(name).find("fp8") != std::string::npos;
    auto w = ModelWeights::Load(testing::TinyModelDir(name));
    ASSERT_TRUE(w.ok()) << w.status();
    const ModelConfig& c = (*w)->config();
    EXPECT_EQ(c.family, ModelFamily::kDeepseekV3);
    EXPECT_EQ(c.fp8.enabled, fp8);
    const auto proj = fp8 ? kernels::DType::kF8E4M3 : kernels::DType::kBF16;
    const auto& layers = (*w)->layers();
    ASSERT_EQ(layers.size(), 3u);
    EXPECT_FALSE(layers[0].is_moe);
    EXPECT_EQ(layers[0].dense.gate.out_features, 192);
    EXPECT_EQ(layers[0].dense.down.type, proj);
    for (const LayerWeights& L : layers) {
      EXPECT_EQ(L.q_proj.w, nullptr);  // the query goes through the LoRA
      EXPECT_EQ(L.q_a_proj.out_features, 48);
      EXPECT_EQ(L.q_a_norm.size(), 48u);
      EXPECT_EQ(L.q_b_proj.out_features, 4 * (32 + 16));
      EXPECT_EQ(L.kv_a_proj.out_features, 32 + 16);
      EXPECT_EQ(L.kv_a_norm.size(), 32u);
      EXPECT_EQ(L.kv_b_proj.out_features, 4 * (32 + 24));
      EXPECT_EQ(L.kv_b_proj.in_features, 32);
      EXPECT_EQ(L.o_proj.in_features, 4 * 24);
      EXPECT_EQ(L.kv_b_proj.type, proj);
      EXPECT_EQ(L.kv_b_proj.scale_inv != nullptr, fp8);
    }
    for (int l : {1, 2}) {
      const LayerWeights& L = layers[l];
      EXPECT_TRUE(L.is_moe);
      EXPECT_EQ(L.router.type, kernels::DType::kBF16);  // routers stay BF16
      ASSERT_EQ(L.router_bias.size(), 16u);
      for (float b : L.router_bias) EXPECT_GT(b, 0.0f);  // joule-make-model's bias is in (0, 0.2)
      ASSERT_EQ(L.experts.size(), 16u);
      EXPECT_EQ(L.experts[15].up.out_features, 32);
      EXPECT_EQ(L.experts[15].up.type, proj);
      EXPECT_TRUE(L.shared_expert.loaded);
      EXPECT_EQ(L.shared_expert.gate.out_features, 32);  // moe_intermediate_size * 1
      EXPECT_EQ(L.shared_expert_gate.w, nullptr);        // ungated
    }
    if (fp8) {
      // kv_b_proj [224, 32]: two 128-row blocks, the second partial.
      const Linear& kv_b = layers[1].kv_b_proj;
      EXPECT_EQ(kv_b.blocks.rows, 128);
      EXPECT_EQ(kv_b.blocks.cols, 128);
      EXPECT_GT(kv_b.scale_inv[1], 0.0f);
    }
    EXPECT_EQ((*w)->embed_tokens().type, kernels::DType::kBF16);
    EXPECT_EQ((*w)->lm_head().type, kernels::DType::kBF16);
  }
  auto bf16 = ModelWeights::Load(testing::TinyModelDir("deepseek_v3-tiny"));
  auto fp8 = ModelWeights::Load(testing::TinyModelDir("deepseek_v3_fp8-tiny"));
  ASSERT_TRUE(bf16.ok() && fp8.ok());
  EXPECT_LT((*fp8)->LoadedBytes(), (*bf16)->LoadedBytes());  // kept as one byte per weight
  EXPECT_LT((*fp8)->ActiveBytesPerToken(), (*bf16)->ActiveBytesPerToken());
}

// Both checkpoints load into a model (golden_test checks its numbers); the
// forward pass's checks come after the checkpoint's own.
TEST(WeightsTest, DeepseekV3ModelLoadsAndADamagedOneNamesItsTensor) {
  for (const char* name : {"deepseek_v3-tiny", "deepseek_v3_fp8-tiny"}) {
    SCOPED_TRACE(name);
    auto m = Model::Load(testing::TinyModelDir(name), {.num_threads = 1});
    ASSERT_TRUE(m.ok()) << m.status();
  }
  // A damaged checkpoint says what is wrong with it instead.
  fs::path dir = CopyModel("deepseek_v3-tiny", "ds_missing_latent_norm");
  RewriteTensors(dir, [](std::vector<TensorToWrite>& t) {
    std::erase_if(t, [](const TensorToWrite& x) { return x.name == "model.layers.2.self_attn.kv_a_layernorm.weight"; });
  });
  auto m = Model::Load(dir.string(), {.num_threads = 1});
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), absl::StatusCode::kNotFound) << m.status();
  EXPECT_THAT(std::string(m.status().message()), HasSubstr("model.layers.2.self_attn.kv_a_layernorm.weight"));
}

TEST(WeightsTest, DeepseekV3MissingScaleNamesTheScaleTensor) {
  fs::path dir = CopyModel("deepseek_v3_fp8-tiny", "ds_missing_scale");
  RewriteTensors(dir, [](std::vector<TensorToWrite>& t) {
    std::erase_if(t, [](const TensorToWrite& x) {
      return x.name == "model.layers.1.mlp.experts.3.down_proj.weight_scale_inv";
    });
  });
  ExpectLoadError(dir, {"'model.layers.1.mlp.experts.3.down_proj.weight_scale_inv' is missing",
                        "128x128 block of 'model.layers.1.mlp.experts.3.down_proj.weight' [64, 32]"});
}

TEST(WeightsTest, DeepseekV3WrongFp8ShapeNamesTheTensor) {
  fs::path dir = CopyModel("deepseek_v3_fp8-tiny", "ds_fp8_shape");
  RewriteTensors(dir, [](std::vector<TensorToWrite>& t) {
    Find(t, "model.layers.0.mlp.gate_proj.weight")->shape = {64, 192};  // same bytes, transposed shape
  });
  ExpectLoadError(dir, {"'model.layers.0.mlp.gate_proj.weight'", "has shape [64, 192]",
                        "expected [192, 64]"});
}

TEST(WeightsTest, DeepseekV3WrongScaleGridNamesTheScaleTensor) {
  fs::path dir = CopyModel("deepseek_v3_fp8-tiny", "ds_scale_grid");
  RewriteTensors(dir, [](std::vector<TensorToWrite>& t) {
    Find(t, "model.layers.1.self_attn.kv_b_proj.weight_scale_inv")->shape = {1, 2};  // is [2, 1]
  });
  ExpectLoadError(dir, {"'model.layers.1.self_attn.kv_b_proj.weight_scale_inv'", "has shape [1, 2]",
                        "expected [2, 1]", "128x128 block of 'model.layers.1.self_attn.kv_b_proj.weight' [224, 32]"});
}

TEST(WeightsTest, DeepseekV3NonFiniteScaleIsRefused) {
  fs::path dir = CopyModel("deepseek_v3_fp8-tiny", "ds_nan_scale");
  static const float kNan[1] = {std::numeric_limits<float>::quiet_NaN()};
  RewriteTensors(dir, [](std::vector<TensorToWrite>& t) {
    Find(t, "model.layers.2.mlp.shared_experts.up_proj.weight_scale_inv")->data = kNan;  // [1, 1]
  });
  ExpectLoadError(dir, {"'model.layers.2.mlp.shared_experts.up_proj.weight_scale_inv'", "finite"});
}

TEST(WeightsTest, DeepseekV3DtypesFollowQuantizationConfig) {
  {  // BF16 projections under an FP8 quantization_config.
    fs::path dir = CopyModel("deepseek_v3-tiny", "ds_bf16_as_fp8");
    auto cfg = ReadJson(dir / "config.json");
    cfg["quantization_config"] = {{"quant_method", "fp8"}, {"fmt", "e4m3"},
                                  {"activation_scheme", "dynamic"}, {"weight_block_size", {128, 128}}};
    WriteJson(dir / "config.json", cfg);
    ExpectLoadError(dir, {"'model.layers.0.self_attn.q_a_proj.weight'", "is BF16", "F8_E4M3"});
  }
  {  // FP8 projections without one.
    fs::path dir = CopyModel("deepseek_v3_fp8-tiny", "ds_fp8_unannounced");
    auto cfg = ReadJson(dir / "config.json");
    cfg.erase("quantization_config");
    WriteJson(dir / "config.json", cfg);
    ExpectLoadError(dir, {"'model.layers.0.self_attn.q_a_proj.weight'", "F8_E4M3",
                          "no quantization_config"});
  }
  {  // FP8 where DeepSeek-V3 keeps BF16: the router.
    fs::path dir = CopyModel("deepseek_v3_fp8-tiny", "ds_fp8_router");
    static std::vector<uint8_t> codes(16 * 64, 0x38);
    RewriteTensors(dir, [](std::vector<TensorToWrite>& t) {
      TensorToWrite* router = Find(t, "model.layers.1.mlp.gate.weight");
      router->dtype = DType::kF8E4M3;
      router->data = codes.data();
    });
    ExpectLoadError(dir, {"'model.layers.1.mlp.gate.weight'", "F8_E4M3", "only the projections"});
  }
  {  // The selection bias is a vector: F32 (BF16/F16 widened), never FP8.
    fs::path dir = CopyModel("deepseek_v3_fp8-tiny", "ds_fp8_bias");
    static std::vector<uint8_t> codes(16, 0x38);
    RewriteTensors(dir, [](std::vector<TensorToWrite>& t) {
      TensorToWrite* bias = Find(t, "model.layers.2.mlp.gate.e_score_correction_bias");
      bias->dtype = DType::kF8E4M3;
      bias->data = codes.data();
    });
    ExpectLoadError(dir, {"'model.layers.2.mlp.gate.e_score_correction_bias'", "F8_E4M3"});
  }
}

TEST(WeightsTest, DeepseekV3MissingOrMisshapedTensorsNameThem) {
  const std::vector<std::string> required = {
      "model.layers.1.self_attn.q_a_layernorm.weight", "model.layers.1.self_attn.kv_b_proj.weight",
      "model.layers.2.mlp.gate.e_score_correction_bias", "model.layers.2.mlp.shared_experts.down_proj.weight",
      "model.layers.0.mlp.up_proj.weight"};
  for (const std::string& name : required) {
    SCOPED_TRACE(name);
    fs::path dir = CopyModel("deepseek_v3-tiny", "ds_missing");
    RewriteTensors(dir, [&](std::vector<TensorToWrite>& t) {
      std::erase_if(t, [&](const TensorToWrite& x) { return x.name == name; });
    });
    auto w = ModelWeights::Load(dir.string());
    ASSERT_FALSE(w.ok());
    EXPECT_THAT(std::string(w.status().message()), HasSubstr(name));
  }
  fs::path dir = CopyModel("deepseek_v3-tiny", "ds_kv_a_shape");
  auto cfg = ReadJson(dir / "config.json");
  cfg["qk_rope_head_dim"] = 8;  // the checkpoint has 16: q_b_proj is [4 * (32 + 16), 48]
  WriteJson(dir / "config.json", cfg);
  ExpectLoadError(dir, {"'model.layers.0.self_attn.q_b_proj.weight'", "[192, 48]", "expected [160, 48]"});
}

}  // namespace
}  // namespace joule
