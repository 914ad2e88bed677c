// Where a MoE layer's routed experts run.
//
// The model computes attention and the router locally and hands the routed
// tokens to an ExpertExecutor. LocalExpertExecutor runs every expert in this
// process (grouped: permute by expert, one GEMM per expert, weighted
// un-permute). The expert-parallel executor dispatches the same layout to the
// ranks that own the experts and combines their outputs; both see the same call.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "absl/status/status.h"
#include "kernels/cpu/thread_pool.h"
#include "kernels/params/moe.h"
#include "worker/model/weights.h"

namespace joule {

class ExpertExecutor {
 public:
  virtual ~ExpertExecutor() = default;
  // x: [tokens, hidden] (post-attention-normed hidden states); expert_ids and
  // weights: [tokens, top_k] from the router. Adds sum_j weight_j * expert_j(x)
  // into out [tokens, hidden]. Called for every MoE layer of every step, also
  // with tokens == 0, so collective implementations stay in lockstep.
  virtual absl::Status Run(int layer, const float* x, int64_t tokens, const int32_t* expert_ids,
                           const float* weights, float* out) = 0;
};

// Computes a SwiGLU MLP for `rows` rows of x, writing [rows, hidden] into out.
// `scratch` is grown as needed.
void RunMlp(const MlpWeights& mlp, const float* x, int64_t rows, float* out,
            std::vector<float>* scratch, kernels::cpu::CpuStream stream);

// Reused across calls of RunGroupedExperts.
struct GroupedExpertBuffers {
  std::vector<const void*> w;  // [3 * num_experts]: gate, then up, then down pointers
  std::vector<float> gate, up;
  std::vector<const void*> chunk_w;  // FusedCombine::sink: down weights of one column chunk
  std::vector<float> chunk_y;        // FusedCombine::sink: one column chunk of the output
};

// A weighted combine fused into the down projection: grouped row g is scaled
// by weights[g] and added into row rows[g] of the output.
//
// With `sink`, the output is never whole in memory: the down projection runs
// over column chunks of a scratch [out_rows, chunk] (zeroed first; every row
// of it must be named by some rows[g]), and each finished chunk goes to
// sink(col0, cols, y) while it is still in cache, y row r holding columns
// [col0, col0 + cols) of output row r. Expert parallelism rounds the chunks
// straight into the rows it sends back. Same bits as without.
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
// each out row gets its terms in expert order), or with combine->sink hands
// the sums over chunk by chunk and leaves out unused (it may be null). Every expert that has rows
// must be loaded (FailedPrecondition naming layer and expert). The local and
// the expert-parallel executors both compute experts here.
absl::Status RunGroupedExperts(const LayerWeights& weights, int layer, const GroupedInput& x,
                               const int64_t* offsets, int num_experts, float* out,
                               GroupedExpertBuffers* buffers, kernels::cpu::CpuStream stream,
                               const FusedCombine* combine = nullptr);

// Runs every expert in this process; the reference the EP path must match.
class LocalExpertExecutor : public ExpertExecutor {
 public:
  LocalExpertExecutor(const ModelWeights* weights, kernels::cpu::CpuStream stream)
      : weights_(weights), stream_(stream) {}

  absl::Status Run(int layer, const float* x, int64_t tokens, const int32_t* expert_ids,
                   const float* weights, float* out) override;

  // Tokens routed to each expert since construction, [layer][expert]; what EPLB reads.
  const std::vector<std::vector<int64_t>>& expert_load() const { return expert_load_; }

 private:
  const ModelWeights* weights_;
  kernels::cpu::CpuStream stream_;
  std::vector<int64_t> offsets_;
  std::vector<int32_t> permuted_to_slot_, slot_to_permuted_, permuted_token_;
  std::vector<float> down_;
  GroupedExpertBuffers buffers_;
  std::vector<std::vector<int64_t>> expert_load_;
};

}  // namespace joule
