// A tiny checkpoint on disk for coordinator tests: config.json (Qwen3-MoE
// layout, 4 layers of which layer 1 is dense, 8 experts, vocab 100) and a
// model.safetensors with a few small tensors. Only headers matter to the
// coordinator, so the weights are zeros.
#pragma once

#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "common/safetensors.h"
#include "gtest/gtest.h"

namespace joule::cluster::testing {

inline const char kTinyConfig[] = R"({
  "architectures": ["Qwen3MoeForCausalLM"],
  "model_type": "qwen3_moe",
  "vocab_size": 100,
  "hidden_size": 16,
  "num_hidden_layers": 4,
  "num_experts": 8,
  "num_experts_per_tok": 2,
  "decoder_sparse_step": 1,
  "mlp_only_layers": [1],
  "max_position_embeddings": 64
})";

// A fresh directory under the test's temp dir, removed on destruction.
class TinyModelDir {
 public:
  explicit TinyModelDir(const std::string& config = kTinyConfig, int64_t hidden = 16) {
    std::string tmpl = ::testing::TempDir() + "/joule-model-XXXXXX";
    std::vector<char> buf(tmpl.begin(), tmpl.end());
    buf.push_back('\0');
    dir_ = mkdtemp(buf.data());
    std::ofstream(dir_ + "/config.json") << config;
    std::vector<float> zeros(static_cast<size_t>(100 * hidden), 0.0f);
    std::vector<TensorToWrite> tensors = {
        {.name = "model.embed_tokens.weight", .dtype = DType::kF32, .shape = {100, hidden}, .data = zeros.data()},
        {.name = "model.norm.weight", .dtype = DType::kF32, .shape = {hidden}, .data = zeros.data()},
    };
    absl::Status s = WriteSafetensors(dir_ + "/model.safetensors", tensors);
    EXPECT_TRUE(s.ok()) << s;
  }
  ~TinyModelDir() { std::filesystem::remove_all(dir_); }
  const std::string& path() const { return dir_; }

 private:
  std::string dir_;
};

}  // namespace joule::cluster::testing
