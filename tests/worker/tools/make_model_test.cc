// joule-make-model run as a process: the Qwen3-30B-A3B-shape preset is the real model's
// configuration with fewer layers, --layers changes any preset's depth, the weights are the
// same bytes for any --threads, and bad flags are errors naming the flag.
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <string>

#include "absl/strings/str_cat.h"
#include "common/dtype.h"
#include "common/safetensors.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "worker/model/config.h"

namespace joule {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

// Qwen/Qwen3-30B-A3B's config.json, as published.
constexpr char kQwen3_30B_A3B[] = R"({
  "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
  "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128,
  "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 6144,
  "max_position_embeddings": 40960, "max_window_layers": 48, "mlp_only_layers": [],
  "model_type": "qwen3_moe", "moe_intermediate_size": 768, "norm_topk_prob": true,
  "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8, "num_hidden_layers": 48,
  "num_key_value_heads": 4, "output_router_logits": false, "rms_norm_eps": 1e-06,
  "rope_scaling": null, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001,
  "sliding_window": null, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
  "transformers_version": "4.51.0", "use_cache": true, "use_sliding_window": false,
  "vocab_size": 151936
})";

class MakeModelTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/joule-make-model-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override { fs::remove_all(dir_); }

  // Runs joule-make-model with `args`; returns its exit status, stdout+stderr in *output.
  int Run(const std::string& args, std::string* output = nullptr) {
    const std::string cmd = absl::StrCat(JOULE_MAKE_MODEL_BIN, " ", args, " 2>&1");
    FILE* pipe = popen(cmd.c_str(), "r");
    if (pipe == nullptr) return -1;
    std::string text;
    char buf[512];
    while (fgets(buf, sizeof(buf), pipe) != nullptr) text += buf;
    const int status = pclose(pipe);
    if (output) *output = text;
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  }
  nlohmann::json Config(const std::string& model) {
    std::ifstream in(dir_ + "/" + model + "/config.json");
    return nlohmann::json::parse(in);
  }
  std::string ReadFile(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    std::stringstream s;
    s << in.rdbuf();
    return s.str();
  }

  std::string dir_;
};

TEST_F(MakeModelTest, Qwen3_30B_A3BShapeIsTheRealConfigWithFewerLayers) {
  std::string out;
  ASSERT_EQ(Run(absl::StrCat("--preset qwen3-30b-a3b-shape --config-only --out ", dir_, "/q"), &out), 0)
      << out;
  const nlohmann::json got = Config("q");
  const nlohmann::json real = nlohmann::json::parse(kQwen3_30B_A3B);
  // What may differ: the depth (4 layers by default), the built-in tokenizer's special ids,
  // and keys transformers defaults the same way or that only concern training.
  const std::set<std::string> may_differ = {"num_hidden_layers", "bos_token_id", "eos_token_id",
                                            "max_window_layers", "output_router_logits",
                                            "router_aux_loss_coef", "transformers_version", "use_cache"};
  for (const auto& [key, value] : real.items()) {
    if (may_differ.count(key)) continue;
    ASSERT_TRUE(got.contains(key)) << key;
    EXPECT_EQ(got[key], value) << key;
  }
  EXPECT_EQ(got["num_hidden_layers"], 4);
  // Joule's own loader reads it as the real model's shapes.
  const absl::StatusOr<ModelConfig> c = LoadModelConfig(dir_ + "/q");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->family, ModelFamily::kQwen3Moe);
  EXPECT_EQ(c->hidden_size, 2048);
  EXPECT_EQ(c->num_experts, 128);
  EXPECT_EQ(c->num_experts_per_tok, 8);
  EXPECT_EQ(c->moe_intermediate_size, 768);
  EXPECT_EQ(c->num_attention_heads, 32);
  EXPECT_EQ(c->num_key_value_heads, 4);
  EXPECT_EQ(c->head_dim, 128);
  EXPECT_EQ(c->vocab_size, 151936);
  EXPECT_TRUE(c->qk_norm);
  EXPECT_TRUE(c->norm_topk_prob);
  EXPECT_FLOAT_EQ(c->rope_theta, 1e6f);
  EXPECT_FLOAT_EQ(c->rms_norm_eps, 1e-6f);
  EXPECT_EQ(c->num_layers, 4);
  for (int l = 0; l < c->num_layers; ++l) EXPECT_TRUE(c->IsMoeLayer(l)) << l;
  EXPECT_FALSE(fs::exists(dir_ + "/q/model.safetensors")) << "--config-only writes no weights";

  ASSERT_EQ(Run(absl::StrCat("--preset qwen3-30b-a3b-shape --layers 2 --config-only --out ", dir_, "/q2")), 0);
  EXPECT_EQ(Config("q2")["num_hidden_layers"], 2);
}

TEST_F(MakeModelTest, LayersChangesThePresetsDepthAndItsTensors) {
  std::string out;
  // The tiny qwen3_moe has a dense layer 1 (mlp_only_layers [1]): one layer leaves it out.
  ASSERT_EQ(Run(absl::StrCat("--family qwen3_moe --preset tiny --layers 1 --out ", dir_, "/t1"), &out), 0)
      << out;
  const nlohmann::json c = Config("t1");
  EXPECT_EQ(c["num_hidden_layers"], 1);
  EXPECT_EQ(c["mlp_only_layers"], nlohmann::json::array());
  absl::StatusOr<std::unique_ptr<Checkpoint>> ckpt = Checkpoint::Open(dir_ + "/t1");
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  EXPECT_TRUE((*ckpt)->Has("model.layers.0.mlp.experts.7.down_proj.weight"));
  EXPECT_FALSE((*ckpt)->Has("model.layers.1.self_attn.q_proj.weight"));
  EXPECT_TRUE((*ckpt)->Has("lm_head.weight"));

  ASSERT_EQ(Run(absl::StrCat("--family mixtral --preset tiny --layers 5 --out ", dir_, "/m5")), 0);
  EXPECT_EQ(Config("m5")["num_hidden_layers"], 5);
  ckpt = Checkpoint::Open(dir_ + "/m5");
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  EXPECT_TRUE((*ckpt)->Has("model.layers.4.block_sparse_moe.experts.3.w2.weight"));
}

TEST_F(MakeModelTest, SameBytesForAnyThreadCount) {
  // Two layers of the mini preset (~55 MB): hundreds of tensors shared among the threads.
  for (const char* threads : {"1", "3"}) {
    ASSERT_EQ(Run(absl::StrCat("--family qwen2_moe --preset mini --layers 2 --threads ", threads,
                               " --out ", dir_, "/t", threads)),
              0);
  }
  const std::string one = ReadFile(dir_ + "/t1/model.safetensors");
  ASSERT_GT(one.size(), size_t{10} << 20);
  EXPECT_TRUE(one == ReadFile(dir_ + "/t3/model.safetensors")) << "weights differ between 1 and 3 threads";
}

// The generator's definition, written out sequentially: element i of a tensor is the
// (i+1)-th output of SplitMix64 seeded with seed ^ FNV-1a(name), 24 bits scaled to
// [-1, 1), times the tensor's scale, rounded to BF16.
uint16_t SequentialBf16(uint64_t seed, const std::string& name, int64_t index, float scale) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char ch : name) h = (h ^ ch) * 1099511628211ull;
  uint64_t state = seed ^ h, z = 0;
  for (int64_t i = 0; i <= index; ++i) {
    z = (state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
  }
  const float u = static_cast<float>(z >> 40) * (1.0f / 8388608.0f) - 1.0f;
  return F32ToBf16(scale * u);
}

TEST_F(MakeModelTest, ChunksContinueEachTensorsRandomStream) {
  // Generation runs in chunks of 64K elements; every chunk must pick the stream up where the
  // previous one left it (the tiny models' golden fixtures only see single-chunk tensors).
  ASSERT_EQ(Run(absl::StrCat("--family qwen3_moe --preset mini --layers 1 --seed 99 --threads 2 --out ",
                             dir_, "/m")),
            0);
  absl::StatusOr<std::unique_ptr<Checkpoint>> ckpt = Checkpoint::Open(dir_ + "/m");
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  const std::string name = "model.layers.0.self_attn.q_proj.weight";  // 512 x 512: 4 chunks
  absl::StatusOr<const TensorView*> t = (*ckpt)->Get(name);
  ASSERT_TRUE(t.ok()) << t.status();
  ASSERT_EQ((*t)->dtype, DType::kBF16);
  ASSERT_EQ((*t)->numel(), 512 * 512);
  const uint16_t* values = static_cast<const uint16_t*>((*t)->data);
  for (int64_t i : {int64_t{0}, int64_t{65535}, int64_t{65536}, int64_t{131072 + 7}, int64_t{512 * 512 - 1}}) {
    EXPECT_EQ(values[i], SequentialBf16(99, name, i, 1.0f / std::sqrt(512.0f))) << "element " << i;
  }
}

TEST_F(MakeModelTest, BadFlagsAreErrorsNamingTheFlag) {
  std::string out;
  EXPECT_EQ(Run(absl::StrCat("--family mixtral --preset qwen3-30b-a3b-shape --out ", dir_, "/x"), &out), 1);
  EXPECT_THAT(out, HasSubstr("qwen3-30b-a3b-shape is a qwen3_moe shape"));
  EXPECT_THAT(out, HasSubstr("mixtral"));
  EXPECT_NE(Run(absl::StrCat("--preset tiny --layers -1 --out ", dir_, "/x"), &out), 0);
  EXPECT_THAT(out, HasSubstr("--layers"));
  EXPECT_NE(Run(absl::StrCat("--preset huge --out ", dir_, "/x"), &out), 0);
  EXPECT_THAT(out, HasSubstr("qwen3-30b-a3b-shape"));  // the list of presets
}

}  // namespace
}  // namespace joule
