// The coordinator's config.json reader (coordinator/cluster/model_summary.h) on
// DeepSeek-V3: the checkpoints joule-make-model writes and DeepSeek-V3's own
// config.json. Which layers are MoE must agree with the worker's reading
// (ModelConfig::IsMoeLayer), or expert placement would cover the wrong layers.
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/file.h"
#include "coordinator/cluster/model_summary.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/testing/paths.h"
#include "worker/model/config.h"

namespace joule::cluster {
namespace {

using ::testing::HasSubstr;
using Json = nlohmann::json;

// DIR/config.json of `joule-make-model ARGS --config-only --out DIR`.
class MadeModel {
 public:
  explicit MadeModel(const std::string& args) {
    char tmpl[] = "/tmp/joule-summary-XXXXXX";
    dir_ = mkdtemp(tmpl) != nullptr ? tmpl : "";
    const std::string cmd =
        absl::StrCat(JOULE_MAKE_MODEL_BIN, " ", args, " --config-only --out ", dir_, " >/dev/null 2>&1");
    const int status = std::system(cmd.c_str());
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << cmd;
  }
  ~MadeModel() { std::filesystem::remove_all(dir_); }
  const std::string& dir() const { return dir_; }

 private:
  std::string dir_;
};

// The worker's MoE layers for the same config.json.
std::vector<bool> WorkerMoeLayers(const std::string& model_dir) {
  auto config = LoadModelConfig(model_dir);
  EXPECT_TRUE(config.ok()) << config.status();
  std::vector<bool> moe;
  if (!config.ok()) return moe;
  for (int l = 0; l < config->num_layers; ++l) moe.push_back(config->IsMoeLayer(l));
  return moe;
}

struct Preset {
  std::string args;
  int layers, experts, top_k;
  std::vector<bool> moe_layer;
};

TEST(ModelSummaryDeepseekV3, MadeModelsAgreeWithTheWorker) {
  const std::vector<Preset> presets = {
      {"--family deepseek_v3 --preset tiny", 3, 16, 3, {false, true, true}},
      {"--family deepseek_v3 --preset tiny --dtype fp8", 3, 16, 3, {false, true, true}},
      {"--family deepseek_v3 --preset mini", 8, 32, 4,
       {false, true, true, true, true, true, true, true}},
      {"--family deepseek_v3 --preset mini --layers 2", 2, 32, 4, {false, true}},
  };
  for (const Preset& p : presets) {
    SCOPED_TRACE(p.args);
    MadeModel made(p.args);
    auto m = ReadModelSummary(made.dir());
    ASSERT_TRUE(m.ok()) << m.status();
    EXPECT_TRUE(m->is_deepseek_v3);
    EXPECT_EQ(m->architecture, "DeepseekV3ForCausalLM");
    EXPECT_EQ(m->num_layers, p.layers);
    EXPECT_EQ(m->num_experts, p.experts);
    EXPECT_EQ(m->top_k, p.top_k);
    EXPECT_EQ(m->moe_layer, p.moe_layer);
    EXPECT_EQ(m->moe_layer, WorkerMoeLayers(made.dir()));
    EXPECT_EQ(m->eos_token_ids, (std::vector<int64_t>{258}));
  }
}

TEST(ModelSummaryDeepseekV3, OtherFamiliesAreUnchanged) {
  for (const std::string family : {"qwen3_moe", "qwen2_moe", "mixtral"}) {
    MadeModel made("--family " + family + " --preset tiny");
    auto m = ReadModelSummary(made.dir());
    ASSERT_TRUE(m.ok()) << family << ": " << m.status();
    EXPECT_FALSE(m->is_deepseek_v3) << family;
    EXPECT_EQ(m->moe_layer, WorkerMoeLayers(made.dir())) << family;
  }
}

// DeepSeek-V3's config.json as published: 61 layers, the first 3 dense, 256 experts, top-8.
TEST(ModelSummaryDeepseekV3, ReadsTheRealConfig) {
  const std::string path = joule::testing::SourceDir() + "/tests/fuzz/corpus/model_config/deepseek_v3";
  auto text = ReadFile(path);
  ASSERT_TRUE(text.ok()) << text.status();
  auto m = ParseModelSummary(*text, path);
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->num_layers, 61);
  EXPECT_EQ(m->num_experts, 256);
  EXPECT_EQ(m->top_k, 8);
  EXPECT_EQ(m->max_context, 163840);
  EXPECT_EQ(m->num_moe_layers(), 58);
  EXPECT_EQ(std::vector<bool>(m->moe_layer.begin(), m->moe_layer.begin() + 4),
            (std::vector<bool>{false, false, false, true}));
}

// A small DeepSeek-V3 config.json; `edit` changes it before parsing.
absl::StatusOr<ModelSummary> Parse(const std::function<void(Json&)>& edit) {
  Json c = {{"architectures", {"DeepseekV3ForCausalLM"}}, {"model_type", "deepseek_v3"},
            {"vocab_size", 272}, {"hidden_size", 64}, {"num_hidden_layers", 4},
            {"n_routed_experts", 8}, {"num_experts_per_tok", 2}, {"first_k_dense_replace", 2},
            {"moe_layer_freq", 1}, {"max_position_embeddings", 512}};
  edit(c);
  return ParseModelSummary(c.dump(), "config.json");
}

TEST(ModelSummaryDeepseekV3, FirstKDenseReplaceAndModelType) {
  auto m = Parse([](Json&) {});
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->moe_layer, (std::vector<bool>{false, false, true, true}));
  // No dense layer, or none MoE (as the worker reads it).
  m = Parse([](Json& c) { c["first_k_dense_replace"] = 0; });
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->num_moe_layers(), 4);
  m = Parse([](Json& c) { c["first_k_dense_replace"] = 9; });
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->num_moe_layers(), 0);
  // moe_layer_freq may be left out (1). model_type alone names the family too.
  m = Parse([](Json& c) {
    c.erase("moe_layer_freq");
    c["architectures"] = {"SomethingElse"};
  });
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_TRUE(m->is_deepseek_v3);
  EXPECT_EQ(m->num_experts, 8);
  EXPECT_EQ(m->moe_layer, (std::vector<bool>{false, false, true, true}));
}

TEST(ModelSummaryDeepseekV3, BadFieldsAreNamed) {
  struct Case {
    std::function<void(Json&)> edit;
    std::string message;
  };
  const std::vector<Case> cases = {
      {[](Json& c) { c.erase("n_routed_experts"); }, "config.json: field 'n_routed_experts' is missing"},
      {[](Json& c) { c["n_routed_experts"] = 0; }, "field 'n_routed_experts' must be a positive integer, got 0"},
      {[](Json& c) { c.erase("first_k_dense_replace"); }, "field 'first_k_dense_replace' is missing"},
      {[](Json& c) { c["first_k_dense_replace"] = -1; },
       "field 'first_k_dense_replace' must be a non-negative integer, got -1"},
      {[](Json& c) { c["moe_layer_freq"] = 2; }, "field 'moe_layer_freq' is 2; only 1 is supported"},
      {[](Json& c) { c["moe_layer_freq"] = "1"; }, "field 'moe_layer_freq' must be a non-negative integer"},
      // DeepSeek-V3 is not read with the Qwen names: num_experts alone is not enough.
      {[](Json& c) {
         c.erase("n_routed_experts");
         c["num_experts"] = 8;
       },
       "field 'n_routed_experts' is missing"},
  };
  for (const Case& c : cases) {
    auto m = Parse(c.edit);
    ASSERT_FALSE(m.ok()) << c.message;
    EXPECT_EQ(m.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(m.status().message(), HasSubstr(c.message));
  }
}

}  // namespace
}  // namespace joule::cluster
