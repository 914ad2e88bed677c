// Helpers shared by the expert-parallel tests: a small random checkpoint on
// disk (so every rank loads only its experts through the real loader) and
// ranks run as threads.
#pragma once

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <unistd.h>

#include "absl/strings/str_cat.h"
#include "common/dtype.h"
#include "common/placement.h"
#include "common/safetensors.h"
#include "common/status.h"
#include "gtest/gtest.h"
#include "worker/model/weights.h"

namespace joule::ep::testing {

// A Mixtral-layout checkpoint (every layer MoE) with random BF16 weights and
// the given MoE shape. Attention is a token-mixing stub (one head of dim 2):
// only the experts matter to the dispatch tests, which call the executor directly.
inline absl::Status WriteRandomMoeCheckpoint(const std::string& dir, int64_t hidden, int experts,
                                             int top_k, int64_t intermediate, int layers,
                                             uint64_t seed) {
  std::filesystem::create_directories(dir);
  constexpr int64_t kVocab = 16, kHeadDim = 2;
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<std::vector<uint16_t>> store;
  std::vector<TensorToWrite> tensors;
  auto add = [&](const std::string& name, std::vector<int64_t> shape, float center, float scale) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    std::vector<uint16_t> v(n);
    for (auto& x : v) x = F32ToBf16(center + scale * u(rng));
    store.push_back(std::move(v));
    tensors.push_back({name, DType::kBF16, std::move(shape), nullptr});
  };
  const float in_scale = 1.0f / std::sqrt(static_cast<float>(hidden));
  add("model.embed_tokens.weight", {kVocab, hidden}, 0, 1);
  add("model.norm.weight", {hidden}, 1, 0.1f);
  for (int l = 0; l < layers; ++l) {
    const std::string p = absl::StrCat("model.layers.", l);
    add(p + ".input_layernorm.weight", {hidden}, 1, 0.1f);
    add(p + ".post_attention_layernorm.weight", {hidden}, 1, 0.1f);
    for (const char* proj : {"q_proj", "k_proj", "v_proj"}) {
      add(absl::StrCat(p, ".self_attn.", proj, ".weight"), {kHeadDim, hidden}, 0, in_scale);
    }
    add(p + ".self_attn.o_proj.weight", {hidden, kHeadDim}, 0, 0.5f);
    add(p + ".block_sparse_moe.gate.weight", {experts, hidden}, 0, in_scale);
    for (int e = 0; e < experts; ++e) {
      const std::string m = absl::StrCat(p, ".block_sparse_moe.experts.", e);
      add(m + ".w1.weight", {intermediate, hidden}, 0, in_scale);
      add(m + ".w3.weight", {intermediate, hidden}, 0, in_scale);
      add(m + ".w2.weight", {hidden, intermediate}, 0, 1.0f / std::sqrt(static_cast<float>(intermediate)));
    }
  }
  for (size_t i = 0; i < tensors.size(); ++i) tensors[i].data = store[i].data();
  RETURN_IF_ERROR(WriteSafetensors(dir + "/model.safetensors", tensors));
  std::ofstream cfg(dir + "/config.json", std::ios::trunc);
  cfg << "{\"architectures\": [\"MixtralForCausalLM\"], \"model_type\": \"mixtral\", "
      << "\"vocab_size\": " << kVocab << ", \"hidden_size\": " << hidden
      << ", \"num_hidden_layers\": " << layers
      << ", \"num_attention_heads\": 1, \"num_key_value_heads\": 1, \"head_dim\": " << kHeadDim
      << ", \"max_position_embeddings\": 64, \"rms_norm_eps\": 1e-5, \"rope_theta\": 10000.0"
      << ", \"tie_word_embeddings\": true, \"num_local_experts\": " << experts
      << ", \"num_experts_per_tok\": " << top_k << ", \"intermediate_size\": " << intermediate
      << ", \"sliding_window\": null, \"hidden_act\": \"silu\", \"bos_token_id\": 1, \"eos_token_id\": 2}";
  cfg.close();
  if (!cfg) return absl::InternalError("cannot write " + dir + "/config.json");
  return absl::OkStatus();
}

// Loads only the experts `placement` gives `rank`.
inline WeightLoadOptions OwnedBy(const Placement& placement, int rank) {
  return {.owns_expert = [placement, rank](int layer, int expert) {
    return placement.Holds(rank, layer, expert);
  }};
}

// Runs fn(rank) on `world` threads and joins them.
inline void RunRanks(int world, const std::function<void(int rank)>& fn) {
  std::vector<std::thread> threads;
  for (int r = 0; r < world; ++r) threads.emplace_back(fn, r);
  for (auto& t : threads) t.join();
}

// A fresh directory under the test's temporary directory (per process: ctest
// may run the same test from several build trees at once).
inline std::string TestDir(const std::string& name) {
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  std::string dir = absl::StrCat(::testing::TempDir(), "/joule_ep_", info->test_suite_name(), "_",
                                 info->name(), "_", name, "_", getpid());
  std::filesystem::remove_all(dir);
  return dir;
}

}  // namespace joule::ep::testing
