// The model's weights as views into a checkpoint.
//
// BF16 and F32 matrices are used in place from the mmapped files (zero copy);
// F16 matrices and every vector (norms, biases) are widened to F32 once at load.
// A rank that serves expert parallelism loads only the experts it owns: the
// others are never touched, so their pages never become resident.
#pragma once

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/safetensors.h"
#include "kernels/cpu/gemm.h"
#include "worker/model/config.h"

namespace joule {

// A [out_features, in_features] matrix in nn.Linear layout.
struct Linear {
  const void* w = nullptr;
  kernels::cpu::WeightType type = kernels::cpu::WeightType::kBF16;
  int64_t out_features = 0;
  int64_t in_features = 0;
  std::vector<float> bias;      // empty when the layer has none
  std::vector<float> owned_f32; // backing store when widened from F16
  // Bytes of the matrix (and bias); with `as`, of the matrix stored in that
  // type instead (a GPU keeps every matrix in BF16).
  size_t bytes(std::optional<kernels::DType> as = std::nullopt) const;
};

// SwiGLU MLP: down(silu(gate(x)) * up(x)).
struct MlpWeights {
  Linear gate, up, down;
  bool loaded = false;  // false for experts this rank does not own
};

struct LayerWeights {
  std::vector<float> input_norm;
  std::vector<float> post_attention_norm;
  std::vector<float> q_norm, k_norm;  // Qwen3 only
  Linear q_proj, k_proj, v_proj, o_proj;

  bool is_moe = false;
  MlpWeights dense;               // when !is_moe
  Linear router;                  // [num_experts, hidden]
  std::vector<MlpWeights> experts;  // [num_experts]
  MlpWeights shared_expert;       // Qwen2-MoE
  Linear shared_expert_gate;      // [1, hidden]
};

struct WeightLoadOptions {
  // Returns true for the (layer, expert) pairs this rank holds. Empty: all.
  std::function<bool(int layer, int expert)> owns_expert;
};

class ModelWeights {
 public:
  static absl::StatusOr<std::unique_ptr<ModelWeights>> Load(const std::string& model_dir,
                                                            const WeightLoadOptions& options = {});

  const ModelConfig& config() const { return config_; }
  const Linear& embed_tokens() const { return embed_; }  // [vocab, hidden]
  const Linear& lm_head() const { return lm_head_; }      // [vocab, hidden]; tied: embed
  const std::vector<float>& final_norm() const { return final_norm_; }
  const std::vector<LayerWeights>& layers() const { return layers_; }

  // Bytes of weights one token touches in a decode step (attention, router,
  // dense/shared MLPs, top_k experts per MoE layer, lm_head) — the numerator
  // of the memory-bandwidth roofline.
  // With `as`: the matrices counted as stored in that type (the device's).
  size_t ActiveBytesPerToken(std::optional<kernels::DType> as = std::nullopt) const;
  // Bytes of every loaded weight.
  size_t LoadedBytes() const;

 private:
  ModelWeights() = default;
  ModelConfig config_;
  std::unique_ptr<Checkpoint> checkpoint_;
  Linear embed_;
  Linear lm_head_;
  std::vector<float> final_norm_;
  std::vector<LayerWeights> layers_;
};

}  // namespace joule
