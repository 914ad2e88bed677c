// The model fingerprint (common/model_fingerprint.h) and the coordinator's
// config.json reader (coordinator/cluster/model_summary.h).
#include "common/model_fingerprint.h"

#include "coordinator/cluster/model_summary.h"
#include "gtest/gtest.h"
#include "tests/coordinator/cluster/test_model.h"

namespace joule::cluster {
namespace {

using testing::TinyModelDir;

TEST(ModelFingerprint, SameCheckpointSameFingerprintEvenIfReformatted) {
  TinyModelDir a;
  // Same content, other key order and whitespace.
  TinyModelDir b(R"({"vocab_size":100,"architectures":["Qwen3MoeForCausalLM"],"model_type":"qwen3_moe",
    "hidden_size":16,"num_hidden_layers":4,"num_experts":8,"num_experts_per_tok":2,
    "decoder_sparse_step":1,"mlp_only_layers":[1],"max_position_embeddings":64})");
  auto fa = ModelFingerprint(a.path());
  auto fb = ModelFingerprint(b.path());
  ASSERT_TRUE(fa.ok()) << fa.status();
  ASSERT_TRUE(fb.ok()) << fb.status();
  EXPECT_EQ(*fa, *fb);
  EXPECT_EQ(fa->rfind("fnv1a64:", 0), 0u) << *fa;
  EXPECT_EQ(fa->size(), 8u + 16u);
}

TEST(ModelFingerprint, DiffersWhenConfigOrTensorShapesDiffer) {
  TinyModelDir base;
  std::string other_config = testing::kTinyConfig;
  other_config.replace(other_config.find("\"num_experts\": 8"), 16, "\"num_experts\": 4");
  TinyModelDir config_changed(other_config);
  TinyModelDir shapes_changed(testing::kTinyConfig, /*hidden=*/32);
  const std::string f = *ModelFingerprint(base.path());
  EXPECT_NE(f, *ModelFingerprint(config_changed.path()));
  EXPECT_NE(f, *ModelFingerprint(shapes_changed.path()));
}

TEST(ModelFingerprint, TensorOrderDoesNotMatter) {
  std::vector<TensorSignature> t = {{"a", "F32", {2, 3}}, {"b", "BF16", {4}}};
  std::vector<TensorSignature> r = {t[1], t[0]};
  EXPECT_EQ(*ComputeModelFingerprint("{}", t), *ComputeModelFingerprint("{}", r));
  std::vector<TensorSignature> other_dtype = {{"a", "F16", {2, 3}}, {"b", "BF16", {4}}};
  EXPECT_NE(*ComputeModelFingerprint("{}", t), *ComputeModelFingerprint("{}", other_dtype));
}

TEST(ModelFingerprint, MissingCheckpointNamesTheFile) {
  auto f = ModelFingerprint("/nonexistent/model");
  ASSERT_FALSE(f.ok());
  EXPECT_NE(f.status().message().find("/nonexistent/model/config.json"), std::string::npos)
      << f.status();
}

TEST(ModelSummary, ReadsLayersExpertsAndLimits) {
  TinyModelDir dir;
  auto m = ReadModelSummary(dir.path());
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->architecture, "Qwen3MoeForCausalLM");
  EXPECT_EQ(m->vocab_size, 100);
  EXPECT_EQ(m->num_layers, 4);
  EXPECT_EQ(m->num_experts, 8);
  EXPECT_EQ(m->top_k, 2);
  EXPECT_EQ(m->max_context, 64);
  EXPECT_EQ(m->moe_layer, (std::vector<bool>{true, false, true, true}));
  EXPECT_EQ(m->num_moe_layers(), 3);
  EXPECT_EQ(m->name, std::filesystem::path(dir.path()).filename().string());
}

TEST(ModelSummary, MixtralSpellingAndSparseStep) {
  auto mixtral = ParseModelSummary(
      R"({"architectures":["MixtralForCausalLM"],"vocab_size":10,"hidden_size":4,
          "num_hidden_layers":2,"num_local_experts":4,"num_experts_per_tok":2,
          "max_position_embeddings":32})",
      "config.json");
  ASSERT_TRUE(mixtral.ok()) << mixtral.status();
  EXPECT_EQ(mixtral->num_experts, 4);
  EXPECT_EQ(mixtral->moe_layer, (std::vector<bool>{true, true}));

  auto qwen2 = ParseModelSummary(
      R"({"architectures":["Qwen2MoeForCausalLM"],"vocab_size":10,"hidden_size":4,
          "num_hidden_layers":4,"num_experts":4,"num_experts_per_tok":2,
          "decoder_sparse_step":2,"max_position_embeddings":32})",
      "config.json");
  ASSERT_TRUE(qwen2.ok()) << qwen2.status();
  EXPECT_EQ(qwen2->moe_layer, (std::vector<bool>{false, true, false, true}));
}

TEST(ModelSummary, MissingFieldIsNamed) {
  auto m = ParseModelSummary(R"({"architectures":["X"],"vocab_size":10})", "cfg.json");
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(m.status().message().find("cfg.json: field 'hidden_size' is missing"), std::string::npos)
      << m.status();
}

TEST(ModelSummary, EosTokenIdIsOneIdOrAList) {
  const std::string base = R"({"architectures":["X"],"vocab_size":10,"hidden_size":4,
      "num_hidden_layers":1,"num_experts":2,"num_experts_per_tok":1,"max_position_embeddings":8)";
  auto none = ParseModelSummary(base + "}", "c.json");
  ASSERT_TRUE(none.ok()) << none.status();
  EXPECT_TRUE(none->eos_token_ids.empty());
  auto one = ParseModelSummary(base + R"(,"eos_token_id":3})", "c.json");
  ASSERT_TRUE(one.ok()) << one.status();
  EXPECT_EQ(one->eos_token_ids, (std::vector<int64_t>{3}));
  auto list = ParseModelSummary(base + R"(,"eos_token_id":[3,7]})", "c.json");
  ASSERT_TRUE(list.ok()) << list.status();
  EXPECT_EQ(list->eos_token_ids, (std::vector<int64_t>{3, 7}));
  auto bad = ParseModelSummary(base + R"(,"eos_token_id":"x"})", "c.json");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("eos_token_id"), std::string::npos) << bad.status();
}

}  // namespace
}  // namespace joule::cluster
