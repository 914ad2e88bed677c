// The model's weights where the backend computes: views of the host weights
// on the CPU (zero copy, as loaded, FP8 included), or one upload to GPU memory
// (each matrix in the backend's weight_type: BF16, F32/F16 checkpoints
// converted, block-scaled FP8 codes copied byte for byte with their F32 scale
// grids; a rank uploads only the experts it holds, plus attention, dense and
// shared weights).
//
// The forward pass reads weights only through these views, so it is written
// once for both devices.
#pragma once

#include <memory>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/status/statusor.h"
#include "kernels/params/types.h"
#include "worker/device/backend.h"
#include "worker/model/weights.h"

namespace joule {

// An [out_features, in_features] matrix (nn.Linear layout) and its optional
// F32 bias, in the backend's memory.
struct LinearView {
  const void* w = nullptr;
  kernels::DType type = kernels::DType::kBF16;
  int64_t out_features = 0;
  int64_t in_features = 0;
  const float* bias = nullptr;
  const float* scale_inv = nullptr;  // kF8E4M3: the block scales
  kernels::WeightBlocks blocks;
};

// y [m, out_features] = x [m, in_features] . W^T (+ bias), with W's FP8
// scales if it has them; the rest of the struct is the caller's.
kernels::GemmParams LinearGemm(const LinearView& w, const float* x, int64_t m, float* y,
                               void* workspace);

struct MlpView {
  LinearView gate, up, down;
};

// One layer's routed experts as the grouped GEMM takes them: arrays of
// num_experts pointers (in the backend's memory), null for experts this rank
// does not hold. Every expert of a layer has one shape and type.
struct ExpertsView {
  const void* const* gate = nullptr;
  const void* const* up = nullptr;
  const void* const* down = nullptr;
  kernels::DType type = kernels::DType::kBF16;
  // kF8E4M3: each expert's F32 block scales (GroupedGemmParams::w_scale_inv).
  const void* const* gate_scale_inv = nullptr;
  const void* const* up_scale_inv = nullptr;
  const void* const* down_scale_inv = nullptr;
  kernels::WeightBlocks blocks;
  int num_experts = 0;
  int64_t hidden = 0;
  int64_t intermediate = 0;
  int held = 0;  // experts with weights
};

struct LayerView {
  const float* input_norm = nullptr;
  const float* post_attention_norm = nullptr;
  const float* q_norm = nullptr;  // Qwen3 only
  const float* k_norm = nullptr;
  LinearView q_proj, k_proj, v_proj, o_proj;
  // DeepSeek-V3's multi-head latent attention (LayerWeights).
  LinearView q_a_proj, q_b_proj, kv_a_proj, kv_b_proj;
  const float* q_a_norm = nullptr;
  const float* kv_a_norm = nullptr;
  bool is_moe = false;
  MlpView dense;  // when !is_moe
  LinearView router;
  const float* router_bias = nullptr;  // DeepSeek-V3's e_score_correction_bias
  ExpertsView experts;
  bool has_shared_expert = false;  // Qwen2-MoE (gated), DeepSeek-V3 (not)
  MlpView shared_expert;
  LinearView shared_expert_gate;   // w null when the shared expert has no gate
};

// A view of one layer's routed experts in host memory (as loaded), with its
// pointer arrays in `table` ([gate x E, up x E, down x E], then for FP8 the
// scales of each in the same order; kept by the caller).
ExpertsView ViewExperts(const LayerWeights& layer, std::vector<const void*>* table);

// One MoE layer's device expert table, filled expert by expert: `pointers` is
// [gate x E, up x E, down x E], then for FP8 experts the scales of each in the
// same order (3 x E nulls for a layer without experts); `view` its shape.
struct ExpertTable {
  explicit ExpertTable(int num_experts);
  void Add(int expert, const MlpView& mlp);
  // `view` reading its pointers from `table`, a device copy of `pointers`.
  ExpertsView At(const void* const* table) const;

  std::vector<const void*> pointers;
  ExpertsView view;
};

class DeviceWeights {
 public:
  // `weights` must outlive the result (the CPU views point into it).
  // ResourceExhausted on a GPU says how many bytes the weights need and how
  // many are free.
  static absl::StatusOr<std::unique_ptr<DeviceWeights>> Create(const ModelWeights& weights,
                                                               device::Backend& backend);
  // One MLP (a routed expert) on the device, converted as Create converts;
  // `*buffer` gets the bytes the view points into (none for host views).
  static absl::StatusOr<MlpView> CreateMlp(const MlpWeights& mlp, device::Backend& backend,
                                           device::Buffer* buffer);

  const LinearView& embed_tokens() const { return embed_; }
  const LinearView& lm_head() const { return lm_head_; }
  const float* final_norm() const { return final_norm_; }
  const std::vector<LayerView>& layers() const { return layers_; }
  // A MoE layer's expert pointers as the device's table holds them ([gate x
  // E, up x E, down x E], then FP8 scales in the same order when the experts
  // are FP8, always for host views); empty for dense layers.
  const std::vector<const void*>& expert_table(int layer) const { return tables_[layer]; }
  // Bytes placed in device memory by the upload; 0 for views of host memory.
  size_t uploaded_bytes() const { return arena_.bytes(); }

 private:
  class Placer;
  DeviceWeights() = default;
  // Walks `walk` with a planning Placer, allocates the bytes it reserved as
  // `*arena`, then walks it again to upload into them.
  static absl::Status PlaceInArena(device::Backend& backend, device::Buffer* arena,
                                   absl::FunctionRef<void(Placer&)> walk);

  device::Buffer arena_;                          // GPU: every weight, one allocation
  std::vector<std::vector<const void*>> tables_;  // CPU: each MoE layer's expert pointers
  LinearView embed_, lm_head_;
  const float* final_norm_ = nullptr;
  std::vector<LayerView> layers_;
};

}  // namespace joule
