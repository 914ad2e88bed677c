// The transformer forward pass of a MoE model over a batch of sequences that
// share one step: prefill chunks and decode tokens together, each sequence
// reading and writing its own blocks of a paged KV cache.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/cpu/thread_pool.h"
#include "worker/model/experts.h"
#include "worker/model/weights.h"

namespace joule {

// Per-layer KV storage, laid out [num_blocks, block_size, num_kv_heads, head_dim] F32.
struct KvCacheView {
  int block_size = 0;
  int64_t num_blocks = 0;
  std::vector<float*> k;  // [num_layers]
  std::vector<float*> v;  // [num_layers]
};

// One step's work, flattened over tokens. Sequence s owns token rows
// [query_start[s], query_start[s+1]); those are the last tokens of its
// context of context_lens[s] tokens.
struct ForwardBatch {
  std::vector<int32_t> tokens;        // [T]
  std::vector<int32_t> positions;     // [T]
  std::vector<int64_t> slots;         // [T] KV slot = block * block_size + offset
  std::vector<int32_t> query_start;   // [S + 1]
  std::vector<int32_t> context_lens;  // [S]
  std::vector<int32_t> block_tables;  // [S * max_blocks_per_seq]
  int max_blocks_per_seq = 0;
  std::vector<int32_t> logit_rows;    // token rows whose next-token logits are wanted

  int64_t num_tokens() const { return static_cast<int64_t>(tokens.size()); }
  int num_seqs() const { return static_cast<int>(context_lens.size()); }
};

class Model {
 public:
  struct Options {
    int num_threads = 0;  // 0: every usable core (kernels::cpu::UsableCores)
    WeightLoadOptions weights;
  };

  static absl::StatusOr<std::unique_ptr<Model>> Load(const std::string& model_dir,
                                                     const Options& options);
  Model(std::unique_ptr<ModelWeights> weights, int num_threads);

  const ModelConfig& config() const { return weights_->config(); }
  const ModelWeights& weights() const { return *weights_; }
  kernels::cpu::CpuStream stream() { return {pool_.get()}; }

  // Replaces where routed experts run (expert parallelism); nullptr restores
  // the local executor. Not owned.
  void set_expert_executor(ExpertExecutor* executor);
  const LocalExpertExecutor& local_experts() const { return local_experts_; }

  // Runs all layers and writes logits [logit_rows.size(), vocab_size].
  absl::Status Forward(const ForwardBatch& batch, const KvCacheView& kv, float* logits);

 private:
  absl::Status Validate(const ForwardBatch& batch, const KvCacheView& kv) const;
  absl::Status Layer(int layer, const ForwardBatch& batch, const KvCacheView& kv);

  std::unique_ptr<ModelWeights> weights_;
  std::unique_ptr<kernels::cpu::ThreadPool> pool_;
  LocalExpertExecutor local_experts_;
  ExpertExecutor* experts_;
  std::vector<float> rope_cos_, rope_sin_;

  // Workspace, grown to the largest step seen.
  std::vector<float> x_, h_, q_, k_, v_, attn_, router_logits_, topk_w_, mlp_out_, scratch_,
      gate_logit_, final_;
  std::vector<int32_t> topk_ids_;
};

}  // namespace joule
