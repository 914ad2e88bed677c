// Loading checkpoints into the model: what is loaded, and clear errors for
// checkpoints that do not match their config.
#include <filesystem>
#include <fstream>

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

}  // namespace
}  // namespace joule
