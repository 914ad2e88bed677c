#include "worker/model/model.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/status.h"
#include "kernels/cpu/elementwise.h"
#include "worker/device/cpu_backend.h"
#include "worker/model/feed_forward.h"
#include "worker/model/mla.h"

namespace joule {

absl::StatusOr<std::unique_ptr<Model>> Model::Load(const std::string& model_dir,
                                                   const Options& options) {
  ASSIGN_OR_RETURN(auto backend, device::CreateBackend(options.device,
                                                       {.num_threads = options.num_threads}));
  ASSIGN_OR_RETURN(auto weights, ModelWeights::Load(model_dir, options.weights));
  return Create(std::move(weights), std::move(backend), options.cuda_graphs);
}

absl::StatusOr<std::unique_ptr<Model>> Model::Create(std::unique_ptr<ModelWeights> weights,
                                                     std::unique_ptr<device::Backend> backend,
                                                     bool cuda_graphs) {
  ASSIGN_OR_RETURN(auto device_weights, DeviceWeights::Create(*weights, *backend));
  auto model = std::unique_ptr<Model>(new Model(std::move(weights), std::move(backend),
                                                std::move(device_weights), cuda_graphs));
  RETURN_IF_ERROR(model->PrepareTables());
  return model;
}

Model::Model(std::unique_ptr<ModelWeights> weights, int num_threads)
    : Model(std::move(weights), std::make_unique<device::CpuBackend>(num_threads), nullptr, false) {
  // On the CPU the weights are views (nothing can fail) and the tables are
  // host memory.
  device_weights_ = *DeviceWeights::Create(*weights_, *backend_);
  local_experts_ = std::make_unique<LocalExpertExecutor>(backend_.get(), device_weights_.get(), config());
  absl::Status tables = PrepareTables();
  if (!tables.ok()) {  // only an allocation of host memory can fail here
    JOULE_LOG(Error) << "model: " << tables;
    std::abort();
  }
}

Model::Model(std::unique_ptr<ModelWeights> weights, std::unique_ptr<device::Backend> backend,
             std::unique_ptr<DeviceWeights> device_weights, bool cuda_graphs)
    : weights_(std::move(weights)),
      backend_(std::move(backend)),
      device_weights_(std::move(device_weights)),
      cuda_graphs_(cuda_graphs) {
  if (device_weights_ != nullptr) {
    local_experts_ = std::make_unique<LocalExpertExecutor>(backend_.get(), device_weights_.get(), config());
  }
  experts_ = nullptr;
}

Model::~Model() = default;

absl::Status Model::PrepareTables() {
  const ModelConfig& c = config();
  ASSIGN_OR_RETURN(mla_, MlaWeights::Create(*weights_, *backend_));
  const int64_t n = c.max_position_embeddings * (c.head_dim / 2);
  std::vector<float> table(2 * n);
  const std::vector<float> inv_freq = RopeInverseFrequencies(c);
  kernels::cpu::BuildRopeTable(inv_freq.data(), c.head_dim / 2, c.max_position_embeddings,
                               c.yarn.attention_factor, table.data(), table.data() + n);
  ASSIGN_OR_RETURN(rope_, backend_->Allocate(device::MemoryKind::kDevice, table.size() * sizeof(float)));
  RETURN_IF_ERROR(backend_->CopyAsync(rope_.data(), table.data(), table.size() * sizeof(float)));
  RETURN_IF_ERROR(backend_->Synchronize());
  rope_cos_ = rope_.as<float>();
  rope_sin_ = rope_cos_ + n;
  return absl::OkStatus();
}

void Model::set_expert_executor(ExpertExecutor* executor) { experts_ = executor; }

absl::Status Model::Reserve(const StepShape& shape) {
  if (workspace_.bytes() > 0 && workspace_.shape().Holds(shape)) return absl::OkStatus();
  // Graphs hold the old buffers' addresses; they are captured again on demand.
  decode_graphs_.clear();
  graph_kv_ = KvCacheView();
  RETURN_IF_ERROR(workspace_.Allocate(*backend_, config(), shape.Max(workspace_.shape())));
  // Routed experts that run elsewhere (expert parallelism) leave the local
  // executor idle: its buffers (GBs for a large model) would only shrink the
  // KV cache. It sizes them on a first Run if it ever runs.
  if (experts_ != nullptr) return absl::OkStatus();
  return local_experts_->Reserve(workspace_.shape().tokens);
}

absl::Status Model::Validate(const ForwardBatch& b, const KvCacheView& kv) const {
  const ModelConfig& c = config();
  const int64_t T = b.num_tokens();
  const int S = b.num_seqs();
  if (b.positions.size() != b.tokens.size() || b.slots.size() != b.tokens.size()) {
    return absl::InvalidArgumentError("forward batch: tokens, positions and slots differ in length");
  }
  if (static_cast<int>(b.query_start.size()) != S + 1 || b.query_start.front() != 0 ||
      b.query_start.back() != T) {
    return absl::InvalidArgumentError("forward batch: query_start must run from 0 to the token count");
  }
  if (b.block_tables.size() != static_cast<size_t>(S) * b.max_blocks_per_seq) {
    return absl::InvalidArgumentError("forward batch: block_tables size != seqs * max_blocks_per_seq");
  }
  if (static_cast<int>(kv.k.size()) != c.num_layers || static_cast<int>(kv.v.size()) != c.num_layers) {
    return absl::InvalidArgumentError("forward batch: KV cache view has the wrong layer count");
  }
  if (kv.type != backend_->kv_cache_type()) {
    return absl::InvalidArgumentError(absl::StrCat("forward batch: a ", kernels::DTypeName(kv.type),
                                                   " KV cache on ", backend_->spec().ToString(),
                                                   ", which keeps ",
                                                   kernels::DTypeName(backend_->kv_cache_type())));
  }
  for (int32_t t : b.tokens) {
    if (t < 0 || t >= c.vocab_size) {
      return absl::InvalidArgumentError(
          absl::StrCat("token id ", t, " is outside the vocabulary [0, ", c.vocab_size, ")"));
    }
  }
  for (int32_t p : b.positions) {
    if (p < 0 || p >= c.max_position_embeddings) {
      return absl::InvalidArgumentError(absl::StrCat("position ", p, " exceeds max_position_embeddings ",
                                                     c.max_position_embeddings));
    }
  }
  for (int s = 0; s < S; ++s) {
    const int32_t q_len = b.query_start[s + 1] - b.query_start[s];
    if (q_len < 0 || b.context_lens[s] < q_len ||
        b.context_lens[s] > static_cast<int64_t>(b.max_blocks_per_seq) * kv.block_size) {
      return absl::InvalidArgumentError(absl::StrCat("forward batch: sequence ", s,
                                                     " has inconsistent query/context lengths"));
    }
  }
  const int64_t slots = kv.num_blocks * kv.block_size;
  for (int64_t slot : b.slots) {
    if (slot < 0 || slot >= slots) {
      return absl::InvalidArgumentError(absl::StrCat("forward batch: KV slot ", slot, " out of range"));
    }
  }
  for (int32_t block : b.block_tables) {
    if (block < 0 || block >= kv.num_blocks) {
      return absl::InvalidArgumentError(absl::StrCat("forward batch: KV block ", block, " out of range"));
    }
  }
  for (int32_t r : b.logit_rows) {
    if (r < 0 || r >= T) return absl::InvalidArgumentError("forward batch: logit row out of range");
  }
  return absl::OkStatus();
}

// An empty batch (no sequences, query_start = {0}) is valid: every layer
// runs over zero tokens and still calls the expert executor, which is how an
// idle expert-parallel rank joins a step (worker/ep/lockstep.h).
absl::Status Model::Forward(const ForwardBatch& b, const KvCacheView& kv, float* logits,
                            StepSampling* sampling) {
  RETURN_IF_ERROR(Validate(b, kv));
  const int64_t R = static_cast<int64_t>(b.logit_rows.size());
  if (sampling != nullptr && (static_cast<int64_t>(sampling->temperature.size()) != R ||
                              static_cast<int64_t>(sampling->uniform.size()) != R)) {
    return absl::InvalidArgumentError("forward batch: sampling must have one entry per logit row");
  }
  if (auto [graph, bucket] = DecodeGraphFor(b, kv); graph != nullptr) {
    RETURN_IF_ERROR(workspace_.Stage(*backend_, b, DecodeShape(bucket), sampling));
    RETURN_IF_ERROR(graph->Launch());
    ++graph_replays_;
    return ReturnResults(R, logits, sampling);
  }
  const StepShape step{.tokens = b.num_tokens(), .seqs = b.num_seqs(),
                       .blocks_per_seq = b.max_blocks_per_seq, .logit_rows = R,
                       .max_context_len = int64_t{b.max_blocks_per_seq} * kv.block_size};
  RETURN_IF_ERROR(Reserve(step));
  RETURN_IF_ERROR(workspace_.Stage(*backend_, b, step, sampling));
  const bool host = backend_->device_memory_is_host();
  RETURN_IF_ERROR(Run(step, /*padded=*/false, kv, host ? logits : workspace_.activations().logits));
  return ReturnResults(R, logits, sampling);
}

absl::Status Model::ReturnResults(int64_t rows, float* logits, StepSampling* sampling) {
  const StepActivations& a = workspace_.activations();
  const size_t row_bytes = static_cast<size_t>(config().vocab_size) * sizeof(float);
  auto host_row = [&](int64_t r) { return sampling == nullptr || sampling->temperature[r] < 0.0f; };
  if (!backend_->device_memory_is_host()) {
    // Runs of the host's rows, one copy each (usually one run, or none).
    for (int64_t r = 0; r < rows;) {
      if (!host_row(r)) {
        ++r;
        continue;
      }
      int64_t end = r + 1;
      while (end < rows && host_row(end)) ++end;
      RETURN_IF_ERROR(backend_->CopyAsync(logits + r * config().vocab_size,
                                          a.logits + r * config().vocab_size, (end - r) * row_bytes));
      r = end;
    }
  }
  if (sampling != nullptr) {
    sampling->tokens.resize(rows);
    RETURN_IF_ERROR(backend_->CopyAsync(sampling->tokens.data(), a.tokens, rows * sizeof(int32_t)));
  }
  // Also where nothing comes back: a fault inside any kernel of the step
  // surfaces here, as this step's error, naming the device.
  return Annotate(backend_->Synchronize(), backend_->spec().ToString());
}

StepShape Model::DecodeShape(int64_t bucket) const {
  const StepShape& r = workspace_.shape();
  return {.tokens = bucket, .seqs = bucket, .blocks_per_seq = r.blocks_per_seq,
          .logit_rows = bucket, .max_context_len = r.max_context_len};
}

namespace {

// A graph holds every layer's cache address and the cache's geometry: a new
// cache at a reused address (a freed range that cudaMalloc hands out again)
// with another block count or size must not replay it.
bool SameCache(const KvCacheView& a, const KvCacheView& b) {
  return a.block_size == b.block_size && a.num_blocks == b.num_blocks && a.type == b.type &&
         a.k == b.k && a.v == b.v;
}

}  // namespace

std::pair<device::Graph*, int64_t> Model::DecodeGraphFor(const ForwardBatch& b,
                                                         const KvCacheView& kv) {
  const int64_t T = b.num_tokens();
  if (decode_graphs_.empty() || T == 0 || experts_ != nullptr || kv.k.empty() ||
      !SameCache(kv, graph_kv_) || b.max_blocks_per_seq > workspace_.shape().blocks_per_seq ||
      b.num_seqs() != T || static_cast<int64_t>(b.logit_rows.size()) != T) {
    return {nullptr, 0};
  }
  for (int64_t t = 0; t < T; ++t) {  // one token per sequence, every row sampled in order
    if (b.query_start[t + 1] != t + 1 || b.logit_rows[t] != t) return {nullptr, 0};
  }
  auto it = decode_graphs_.lower_bound(T);
  if (it == decode_graphs_.end()) return {nullptr, 0};
  return {it->second.get(), it->first};
}

absl::StatusOr<std::vector<int>> Model::CaptureDecodeGraphs(const KvCacheView& kv, int max_seqs) {
  std::vector<int> captured;
  if (!cuda_graphs_ || !backend_->SupportsGraphs() || max_seqs < 1 || experts_ != nullptr) {
    return captured;
  }
  // Buckets 1, 2, 4, 8, then every 8 up to 64 and every 32 beyond (a step
  // runs at the smallest bucket that holds it, padding the rest), and the
  // largest batch itself.
  std::vector<int> buckets;
  for (int b = 1; b < max_seqs; b = b < 8 ? 2 * b : b < 64 ? b + 8 : b + 32) buckets.push_back(b);
  buckets.push_back(max_seqs);
  // Block tables as wide as the reservation says (the engine's longest
  // sequence), else the model's context.
  int64_t width = workspace_.shape().blocks_per_seq;
  if (width == 0) width = (config().max_position_embeddings + kv.block_size - 1) / kv.block_size;
  RETURN_IF_ERROR(Reserve({.tokens = max_seqs, .seqs = max_seqs, .blocks_per_seq = width,
                           .logit_rows = max_seqs, .max_context_len = width * kv.block_size}));
  decode_graphs_.clear();
  const ForwardBatch padding_only{.query_start = {0}};
  float* logits = workspace_.activations().logits;
  for (int bucket : buckets) {
    const StepShape shape = DecodeShape(bucket);
    // The same launches eagerly first, over padding only (no KV slot, no
    // context, no routed token): cuBLASLt picks its algorithms and every
    // kernel loads, which capture cannot do, and a failing launch shows its
    // own error.
    RETURN_IF_ERROR(workspace_.Stage(*backend_, padding_only, shape));
    RETURN_IF_ERROR(Annotate(Run(shape, /*padded=*/true, kv, logits),
                             absl::StrCat("warming up the decode step of batch ", bucket)));
    RETURN_IF_ERROR(backend_->Synchronize());
    RETURN_IF_ERROR(backend_->BeginCapture());
    const absl::Status run = Run(shape, /*padded=*/true, kv, logits);
    absl::StatusOr<std::unique_ptr<device::Graph>> graph = backend_->EndCapture();
    RETURN_IF_ERROR(Annotate(run, absl::StrCat("capturing the decode graph of batch ", bucket)));
    RETURN_IF_ERROR(graph.status());
    decode_graphs_[bucket] = *std::move(graph);
    captured.push_back(bucket);
  }
  graph_kv_ = kv;
  return captured;
}

absl::Status Model::Run(const StepShape& step, bool padded, const KvCacheView& kv, float* logits) {
  const ModelConfig& c = config();
  const StepMetadata& m = workspace_.metadata();
  const StepActivations& a = workspace_.activations();
  const int64_t T = step.tokens;
  const int64_t H = c.hidden_size;
  const DeviceWeights& w = *device_weights_;
  RETURN_IF_ERROR(backend_->Embedding({.tokens = m.tokens, .count = T, .table = w.embed_tokens().w,
                                       .table_type = w.embed_tokens().type, .hidden = H,
                                       .out = a.x}));
  for (int layer = 0; layer < c.num_layers; ++layer) {
    RETURN_IF_ERROR(Annotate(Layer(layer, step, padded, kv), absl::StrCat("layer ", layer)));
  }
  // Final norm and lm_head only for the rows whose logits are wanted.
  const int64_t R = step.logit_rows;
  if (R == 0) return absl::OkStatus();
  RETURN_IF_ERROR(backend_->GatherRows({.in = a.x, .in_type = kernels::RowType::kF32,
                                        .in_stride_bytes = H * 4, .index = m.logit_rows,
                                        .out = a.final, .out_type = kernels::RowType::kF32,
                                        .out_stride_bytes = H * 4, .rows = R, .hidden = H}));
  RETURN_IF_ERROR(backend_->RmsNorm({.x = a.final, .weight = w.final_norm(), .out = a.final,
                                     .rows = R, .cols = H, .eps = c.rms_norm_eps}));
  const LinearView& head = w.lm_head();
  RETURN_IF_ERROR(backend_->Gemm({.x = a.final, .m = R, .k = H, .w = head.w, .w_type = head.type,
                                  .n = c.vocab_size, .y = logits, .workspace = a.gemm_workspace}));
  return backend_->Sample({.logits = logits, .rows = R, .vocab = c.vocab_size,
                           .temperature = m.temperature, .uniform = m.uniform,
                           .tokens = a.tokens});
}

absl::Status Model::Layer(int layer, const StepShape& step, bool padded, const KvCacheView& kv) {
  const ModelConfig& c = config();
  const LayerView& L = device_weights_->layers()[layer];
  const StepMetadata& m = workspace_.metadata();
  const StepActivations& a = workspace_.activations();
  device::Backend& dev = *backend_;
  RETURN_IF_ERROR(dev.RmsNorm({.x = a.x, .weight = L.input_norm, .out = a.h, .rows = step.tokens,
                               .cols = c.hidden_size, .eps = c.rms_norm_eps}));
  if (c.UsesMla()) {
    RETURN_IF_ERROR(RunMlaAttention(dev, c, L, mla_.layer(layer),
                                    {.meta = m, .shape = step, .act = a, .cache = kv.k[layer],
                                     .cache_type = kv.type, .block_size = kv.block_size,
                                     .cos = rope_cos_, .sin = rope_sin_}));
  } else {
    RETURN_IF_ERROR(GroupedQueryAttention(layer, step, kv));
  }
  return FeedForward(layer, step, padded);
}

absl::Status Model::GroupedQueryAttention(int layer, const StepShape& step, const KvCacheView& kv) {
  const ModelConfig& c = config();
  const LayerView& L = device_weights_->layers()[layer];
  const StepMetadata& m = workspace_.metadata();
  const StepActivations& a = workspace_.activations();
  device::Backend& dev = *backend_;
  const int64_t T = step.tokens;
  const int64_t H = c.hidden_size;
  const int D = c.head_dim;
  const int Hq = c.num_attention_heads;
  const int Hk = c.num_key_value_heads;
  auto project = [&](const LinearView& l, float* out) {
    return dev.Gemm(LinearGemm(l, a.h, T, out, a.gemm_workspace));
  };
  RETURN_IF_ERROR(project(L.q_proj, a.q));
  RETURN_IF_ERROR(project(L.k_proj, a.k));
  RETURN_IF_ERROR(project(L.v_proj, a.v));
  if (c.qk_norm) {
    RETURN_IF_ERROR(dev.RmsNorm({.x = a.q, .weight = L.q_norm, .out = a.q, .rows = T * Hq,
                                 .cols = D, .eps = c.rms_norm_eps}));
    RETURN_IF_ERROR(dev.RmsNorm({.x = a.k, .weight = L.k_norm, .out = a.k, .rows = T * Hk,
                                 .cols = D, .eps = c.rms_norm_eps}));
  }
  RETURN_IF_ERROR(dev.Rope({.q = a.q, .k = a.k, .positions = m.positions, .tokens = T,
                            .num_q_heads = Hq, .num_kv_heads = Hk, .head_dim = D,
                            .cos = rope_cos_, .sin = rope_sin_}));
  RETURN_IF_ERROR(dev.KvCacheWrite({.k = a.k, .v = a.v, .slots = m.slots, .tokens = T,
                                    .num_kv_heads = Hk, .head_dim = D, .k_cache = kv.k[layer],
                                    .v_cache = kv.v[layer], .cache_type = kv.type}));
  RETURN_IF_ERROR(dev.PagedAttention(
      {.q = a.q, .out = a.attn, .num_q_heads = Hq, .num_kv_heads = Hk, .head_dim = D,
       .scale = 1.0f / std::sqrt(static_cast<float>(D)), .k_cache = kv.k[layer],
       .v_cache = kv.v[layer], .cache_type = kv.type, .block_size = kv.block_size,
       .num_seqs = static_cast<int>(step.seqs), .query_start = m.query_start,
       .context_lens = m.context_lens, .block_tables = m.block_tables,
       .max_blocks_per_seq = static_cast<int>(step.blocks_per_seq),
       .sliding_window = c.sliding_window, .num_tokens = T,
       .max_context_len = step.max_context_len, .workspace = a.attention_workspace}));
  // Residual add fused into the output projection.
  return dev.Gemm({.x = a.attn, .m = T, .k = int64_t{Hq} * D, .w = L.o_proj.w,
                   .w_type = L.o_proj.type, .n = H, .y = a.x, .accumulate = true,
                   .workspace = a.gemm_workspace});
}

absl::Status Model::FeedForward(int layer, const StepShape& step, bool padded) {
  const ModelConfig& c = config();
  const LayerView& L = device_weights_->layers()[layer];
  const StepMetadata& m = workspace_.metadata();
  const StepActivations& a = workspace_.activations();
  device::Backend& dev = *backend_;
  const int64_t T = step.tokens;
  const int64_t H = c.hidden_size;
  RETURN_IF_ERROR(dev.RmsNorm({.x = a.x, .weight = L.post_attention_norm, .out = a.h, .rows = T,
                               .cols = H, .eps = c.rms_norm_eps}));
  ExpertExecutor& experts = experts_ != nullptr ? *experts_ : *local_experts_;
  const FeedForwardBuffers buffers{.mlp_scratch = a.mlp_scratch, .shared = a.shared,
                                   .router_logits = a.router_logits, .topk_ids = a.topk_ids,
                                   .topk_weights = a.topk_weights, .gate_logit = a.gate_logit,
                                   .gemm_workspace = a.gemm_workspace,
                                   .valid_tokens = padded ? m.valid_tokens : nullptr};
  RETURN_IF_ERROR(RunFeedForward(dev, c, L, layer, experts, a.h, T, buffers, a.mlp_out));
  return dev.Add({.y = a.x, .x = a.mlp_out, .n = T * H});
}

}  // namespace joule
