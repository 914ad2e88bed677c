// Where a MoE layer's routed experts run.
//
// The model computes attention and the router on its device and hands the
// routed tokens to an ExpertExecutor. LocalExpertExecutor runs every expert in
// this process, on the model's backend (grouped: the dispatch layout, one
// grouped GEMM per projection, the weighted un-permute). The expert-parallel
// executor dispatches the same layout to the ranks that own the experts and
// combines their outputs; both see the same call.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/params/moe.h"
#include "worker/device/backend.h"
#include "worker/model/config.h"
#include "worker/model/device_weights.h"

namespace joule {

class ExpertExecutor {
 public:
  virtual ~ExpertExecutor() = default;
  // x: [tokens, hidden] (post-attention-normed hidden states); expert_ids and
  // weights: [tokens, top_k] from the router. Adds sum_j weight_j * expert_j(x)
  // into out [tokens, hidden]. Called for every MoE layer of every step, also
  // with tokens == 0, so collective implementations stay in lockstep. Every
  // pointer is memory of the model's backend.
  virtual absl::Status Run(int layer, const float* x, int64_t tokens, const int32_t* expert_ids,
                           const float* weights, float* out) = 0;
};

// A SwiGLU MLP, down(silu(gate(x)) * up(x)), for `rows` rows of x into out
// [rows, hidden]. `scratch` holds 2 * rows * intermediate floats;
// gemm_workspace holds Backend::GemmWorkspaceBytes(rows, max(hidden, intermediate)).
absl::Status RunMlp(device::Backend& backend, const MlpView& mlp, const float* x, int64_t rows,
                    float* out, float* scratch, void* gemm_workspace);

// Reused across calls of RunGroupedExperts: the gate/up activations in the
// backend's memory (grown on demand, or sized once by the caller so nothing
// allocates later, e.g. under graph capture), and the host scratch of the
// CPU's chunked combine (FusedCombine::sink).
struct GroupedExpertBuffers {
  device::Buffer gate_up;            // [2, rows, intermediate] F32
  std::vector<const void*> chunk_w;  // FusedCombine::sink: down weights of one column chunk
  std::vector<float> chunk_y;        // FusedCombine::sink: one column chunk of the output
};

// Bytes of GroupedExpertBuffers::gate_up for `rows` grouped rows.
size_t GroupedExpertBytes(const ExpertsView& experts, int64_t rows);

// A weighted combine fused into the down projection: grouped row g is scaled
// by weights[g] and added into row rows[g] of the output.
//
// With `sink` (CPU only), the output is never whole in memory: the down
// projection runs over column chunks of a scratch [out_rows, chunk] (zeroed
// first; every row of it must be named by some rows[g]), and each finished
// chunk goes to sink(col0, cols, y) while it is still in cache, y row r
// holding columns [col0, col0 + cols) of output row r. Expert parallelism
// rounds the chunks straight into the rows it sends back. Same bits as without.
struct FusedCombine {
  const int32_t* rows = nullptr;   // [offsets[num_experts]]
  const float* weights = nullptr;  // [offsets[num_experts]]
  int64_t out_rows = 0;            // with sink: rows of the output
  std::function<void(int64_t col0, int64_t cols, const float* y)> sink;
};

// The rows the experts read, grouped by expert: grouped row g is row rows[g]
// of x (row g without rows), `stride` elements apart (0: hidden), F32 or
// BF16 (widened exactly in registers). Rows can stay where they arrived.
struct GroupedInput {
  const void* x = nullptr;
  kernels::RowType type = kernels::RowType::kF32;
  int64_t stride = 0;
  const int32_t* rows = nullptr;
};

// Runs each expert's SwiGLU MLP on its rows of x, which are grouped by expert:
// rows [offsets[e], offsets[e+1]) go through expert e, one grouped GEMM per
// projection. Writes [offsets[num_experts], hidden] into out; with `combine`,
// adds into the rows of out it names instead (the caller initializes them;
// on the CPU each out row gets its terms in expert order), or with
// combine->sink hands the sums over chunk by chunk and leaves out unused (it
// may be null).
//
// Where offsets are host-visible (the CPU) every expert that has rows must be
// held (FailedPrecondition naming layer and expert) and the row count is
// read from them; on a GPU they stay on the device and max_rows bounds the
// rows. The local and the expert-parallel executors both compute experts here.
absl::Status RunGroupedExperts(device::Backend& backend, const ExpertsView& experts, int layer,
                               const GroupedInput& x, const int64_t* offsets, int64_t max_rows,
                               float* out, GroupedExpertBuffers* buffers,
                               const FusedCombine* combine = nullptr);

// Runs every expert in this process on the backend; the reference the
// expert-parallel path must match.
class LocalExpertExecutor : public ExpertExecutor {
 public:
  // `backend` and `weights` are not owned and must outlive the executor.
  LocalExpertExecutor(device::Backend* backend, const DeviceWeights* weights,
                      const ModelConfig& config);

  // Sizes the workspace for steps of up to `max_tokens` tokens, so Run
  // allocates nothing (graph capture). Run grows it otherwise.
  absl::Status Reserve(int64_t max_tokens);
  int64_t reserved_tokens() const { return reserved_tokens_; }
  absl::Status Run(int layer, const float* x, int64_t tokens, const int32_t* expert_ids,
                   const float* weights, float* out) override;

  // Tokens routed to each expert since construction, [layer][expert]; what
  // EPLB reads. Counted on the device; reading waits for the stream.
  absl::StatusOr<std::vector<std::vector<int64_t>>> ExpertLoad();
  // The tokens routed since the previous call (the first: since construction).
  absl::StatusOr<std::vector<std::vector<int64_t>>> TakeExpertLoad();

 private:
  device::Backend* backend_;
  const DeviceWeights* weights_;
  const ModelConfig config_;
  int64_t reserved_tokens_ = 0;
  device::Buffer workspace_;  // layout and per-choice outputs (Reserve)
  device::Buffer load_;       // [layers, experts] int64
  int64_t* offsets_ = nullptr;
  int32_t *permuted_to_slot_ = nullptr, *slot_to_permuted_ = nullptr, *permuted_token_ = nullptr;
  float* down_ = nullptr;
  GroupedExpertBuffers buffers_;
  std::vector<std::vector<int64_t>> taken_;  // ExpertLoad() at the last TakeExpertLoad()
};

}  // namespace joule
