// The transformer forward pass of a MoE model over a batch of sequences that
// share one step: prefill chunks and decode tokens together, each sequence
// reading and writing its own blocks of a paged KV cache.
//
// The pass is written once against the execution seam (worker/device): the
// same code runs on the CPU (F32 activations, F32 KV cache, weights as
// stored) and on a GPU (F32 activations, BF16 weights and KV cache,
// tensor-core GEMMs). Each step's metadata is staged in host memory and
// copied to the device in one transfer; the logits of the rows that sample
// come back to the caller in host memory. On a GPU, decode steps replay CUDA
// graphs captured once per batch-size bucket (CaptureDecodeGraphs).
#pragma once

#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/params/types.h"
#include "worker/device/backend.h"
#include "worker/model/device_weights.h"
#include "worker/model/experts.h"
#include "worker/model/forward_batch.h"
#include "worker/model/mla.h"
#include "worker/model/step_workspace.h"
#include "worker/model/weights.h"

namespace joule {

class Model {
 public:
  struct Options {
    int num_threads = 0;  // CPU threads; 0: every usable core (kernels::cpu::UsableCores)
    WeightLoadOptions weights;
    device::DeviceSpec device;  // --device; the CPU by default
    bool cuda_graphs = true;    // decode steps replay captured graphs where the device has them
  };

  static absl::StatusOr<std::unique_ptr<Model>> Load(const std::string& model_dir,
                                                     const Options& options);
  // Places `weights` on `backend` (uploads them to a GPU).
  static absl::StatusOr<std::unique_ptr<Model>> Create(std::unique_ptr<ModelWeights> weights,
                                                       std::unique_ptr<device::Backend> backend,
                                                       bool cuda_graphs = true);
  // On the CPU with `num_threads` threads (0: every usable core).
  Model(std::unique_ptr<ModelWeights> weights, int num_threads);
  ~Model();

  const ModelConfig& config() const { return weights_->config(); }
  const ModelWeights& weights() const { return *weights_; }  // host weights, as loaded
  const DeviceWeights& device_weights() const { return *device_weights_; }
  device::Backend& backend() { return *backend_; }
  // Host work next to the model (expert-parallel packing): the CPU's threads.
  kernels::cpu::CpuStream stream() { return backend_->host_stream(); }

  // Replaces where routed experts run (expert parallelism); nullptr restores
  // the local executor. Not owned.
  void set_expert_executor(ExpertExecutor* executor);
  LocalExpertExecutor& local_experts() { return *local_experts_; }

  // Sizes the step workspace (and the local experts', unless an expert
  // executor is set) for steps up to `shape`, so no step allocates. Forward
  // grows it for a larger step.
  absl::Status Reserve(const StepShape& shape);
  const StepShape& reserved() const { return workspace_.shape(); }
  size_t workspace_bytes() const { return workspace_.bytes(); }

  // Captures one decode step (one token per sequence) per batch-size bucket
  // up to max_seqs on the cache `kv`, for Forward to replay; the first
  // request after start-up then pays no capture. No-op where the backend has
  // no graphs or they are off. Returns the buckets captured.
  absl::StatusOr<std::vector<int>> CaptureDecodeGraphs(const KvCacheView& kv, int max_seqs);

  // Steps that replayed a decode graph so far (tests and metrics).
  int64_t graph_replays() const { return graph_replays_; }

  // Runs all layers and writes logits [logit_rows.size(), vocab_size] into
  // host memory. With `sampling`, the rows it gives the device get their next
  // token there (sampling->tokens) and only the other rows' logits come back.
  absl::Status Forward(const ForwardBatch& batch, const KvCacheView& kv, float* logits,
                       StepSampling* sampling = nullptr);

 private:
  Model(std::unique_ptr<ModelWeights> weights, std::unique_ptr<device::Backend> backend,
        std::unique_ptr<DeviceWeights> device_weights, bool cuda_graphs);
  absl::Status Validate(const ForwardBatch& batch, const KvCacheView& kv) const;
  // The RoPE table and, for MLA, the absorbed weights.
  absl::Status PrepareTables();
  // The graph that replays `batch` and its batch-size bucket, or null when
  // the step must run eagerly.
  std::pair<device::Graph*, int64_t> DecodeGraphFor(const ForwardBatch& batch,
                                                    const KvCacheView& kv);
  // A decode step of `bucket` sequences on the reserved block-table width.
  StepShape DecodeShape(int64_t bucket) const;
  // Every layer, the final norm and lm_head for `shape` over the staged
  // metadata, logits into `logits` (backend memory).
  absl::Status Run(const StepShape& shape, bool padded, const KvCacheView& kv, float* logits);
  absl::Status Layer(int layer, const StepShape& shape, bool padded, const KvCacheView& kv);
  // Each half of a layer: x += attention(norm(x)) (h holds norm(x)), then x += mlp(norm(x)).
  absl::Status GroupedQueryAttention(int layer, const StepShape& shape, const KvCacheView& kv);
  absl::Status FeedForward(int layer, const StepShape& shape, bool padded);
  // Copies back the tokens the device picked and the logits of the rows it
  // did not (of `rows` rows), and waits.
  absl::Status ReturnResults(int64_t rows, float* logits, StepSampling* sampling);

  std::unique_ptr<ModelWeights> weights_;
  std::unique_ptr<device::Backend> backend_;
  std::unique_ptr<DeviceWeights> device_weights_;
  std::unique_ptr<LocalExpertExecutor> local_experts_;
  ExpertExecutor* experts_;
  const bool cuda_graphs_;
  device::Buffer rope_;  // cos then sin, [max_position, head_dim / 2] each
  MlaWeights mla_;       // multi-head latent attention's absorbed kv_b_proj
  const float* rope_cos_ = nullptr;
  const float* rope_sin_ = nullptr;
  StepWorkspace workspace_;
  // Decode graphs by batch size, valid for the cache they were captured on.
  std::map<int64_t, std::unique_ptr<device::Graph>> decode_graphs_;
  KvCacheView graph_kv_;
  int64_t graph_replays_ = 0;
};

}  // namespace joule
