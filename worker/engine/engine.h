// Continuous batching over a paged KV cache.
//
// Each Step() builds one forward batch that mixes decode tokens of running
// sequences with prefill chunks of new ones under a token budget, runs the
// model once, samples, and reports the new tokens. Sequences that cannot get
// a KV block are preempted (blocks freed, recomputed later with the same
// random stream, so their output is unchanged). With prefix caching a new
// sequence's prefill starts after the longest prefix of full KV blocks the
// cache holds (block_allocator.h), and only computed tokens use the budget.
// Penalties, logit_bias and logprobs are applied on the host to the logits
// of the sequences that ask for them (sampler.h); a prompt whose logprobs are
// wanted is computed in full, every prefill row giving logits.
#pragma once

#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <optional>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "worker/engine/kv_cache.h"
#include "worker/engine/sampler.h"
#include "worker/model/model.h"

namespace joule {

enum class FinishReason { kNone, kStop, kLength, kCancelled };
std::string_view FinishReasonName(FinishReason r);

struct GenerationRequest {
  uint64_t id = 0;
  std::vector<int32_t> prompt;
  // A request resuming after its rank died: the tokens it generated there.
  // They are recomputed as context after the prompt, count against
  // max_tokens, are not reported again, and a seeded stream continues after
  // the draws they took, so the rest equals an uninterrupted run's where the
  // arithmetic is the same.
  std::vector<int32_t> resumed;
  SamplingParams sampling;
  // Who gets a step's token budget first: lower first (running before waiting
  // within one priority). The worker sets the service tier's rank (fast 0 ...
  // batch 3) under tiered policies and 0 under FCFS.
  int priority = 0;
  // While this sequence is live, steps carry at most this many tokens (0: no
  // cap): the scheduler's way to keep a fast request's time per output token.
  int step_token_cap = 0;
  // Pacing: once decoding, the sequence needs a token only every this long
  // (0: every step). Steps run while some live sequence is unpaced, still
  // prefilling, waiting for admission or due; a paced sequence that is not
  // due rides along in steps that run anyway (after the others get the
  // budget), unless it falls due within a step's time (the engine's moving
  // average), when it needs that step. So paced work gathers into fewer,
  // fuller steps.
  absl::Duration token_interval = absl::ZeroDuration();
};

// How the scheduler (the cluster's policy, relayed by the worker) wants the
// next steps composed. The default reproduces plain continuous batching.
struct StepDirectives {
  int max_batch_tokens = 0;  // cap on tokens per step; 0: EngineOptions' value
  int max_running = 0;       // cap on running sequences; 0: EngineOptions' value
  // Sequences that get the step's token budget first, in this order (running
  // or waiting; unknown ids are ignored). Everything else follows: running
  // oldest first, then waiting by priority. A running sequence that gets no
  // budget skips the step and keeps its KV blocks.
  std::vector<uint64_t> order;
  // Running sequences to preempt once, before the next plan (blocks freed,
  // recomputed later with the same random stream, so output is unchanged).
  std::vector<uint64_t> preempt;
};

struct TokenOutput {
  uint64_t id = 0;
  int32_t token = -1;
  FinishReason finish = FinishReason::kNone;  // set on the sequence's last token
  // Prompt tokens whose K/V the prefix cache gave the sequence when it was
  // first scheduled (OpenAI's usage.prompt_tokens_details.cached_tokens).
  int cached_tokens = 0;
  // With SamplingParams::logprobs: the token's log probability and its most
  // likely alternatives (sampler.h, ComputeLogprob).
  std::optional<TokenLogprob> logprob;
  // With SamplingParams::prompt_logprobs, on the sequence's first token only:
  // one entry per prompt token (the first has logprob NaN), from the model's
  // logits as they are (no temperature, penalty or bias).
  std::vector<TokenLogprob> prompt_logprobs;
};

struct StepResult {
  std::vector<TokenOutput> tokens;
  std::vector<uint64_t> preempted;
  int64_t prefill_tokens = 0;
  int64_t decode_tokens = 0;
  int num_seqs = 0;
  // Tokens each sequence had in the step (its prefill chunk or its decode),
  // for energy attribution.
  std::vector<std::pair<uint64_t, int>> scheduled;
  int64_t context_tokens = 0;  // KV positions the step's attention read
  // Prefix cache lookups of the sequences first scheduled in this step: their
  // tokens, and how many of them the cache held (not computed).
  int64_t prefix_cache_queries = 0;
  int64_t prefix_cache_hits = 0;
};

struct EngineOptions {
  int block_size = 16;
  int64_t kv_cache_bytes = int64_t{256} << 20;
  // On a GPU (> 0): the KV cache takes what is left of this fraction of the
  // device's memory once weights and workspaces are allocated (vLLM's
  // --gpu-memory-utilization), instead of kv_cache_bytes.
  double gpu_memory_utilization = 0;
  // Longest sequence (prompt + max_tokens) a request may have; 0: the
  // model's max_position_embeddings. Sizes the step's block tables.
  int64_t max_model_len = 0;
  int max_batch_tokens = 512;   // tokens per step (decode + prefill chunks)
  int max_running = 64;         // sequences in the running batch
  int max_prefill_chunk = 256;  // longest prefill slice of one sequence per step
  // Automatic prefix caching (block_allocator.h): a request's prefill starts
  // after the longest prefix of full KV blocks the cache holds.
  bool prefix_caching = true;
  // Logit rows a step may spend on prompt_logprobs, beyond one per running
  // sequence: such a prompt is prefilled at most this many tokens per step.
  // Reserved with the step workspace (vocab_size floats each).
  int prompt_logprob_rows = 64;
  // Time for pacing (GenerationRequest::token_interval); null: absl::Now.
  std::function<absl::Time()> clock;
};

class Engine {
 public:
  // `model` is not owned and must outlive the engine. Sizes the model's step
  // workspace and the KV cache, and captures the model's decode graphs (on
  // a GPU), so the first request pays for none of it.
  static absl::StatusOr<std::unique_ptr<Engine>> Create(Model* model, const EngineOptions& options);

  // Queues a request. InvalidArgument for a bad prompt or sampling field,
  // AlreadyExists for a live id, ResourceExhausted if it could never fit the cache.
  absl::Status Add(GenerationRequest request);
  // Drops a queued or running sequence and frees its KV blocks. False if unknown.
  bool Cancel(uint64_t id);
  // Runs one engine step. With no work it returns an empty result.
  // Same as PlanStep() followed by RunPlannedStep(false).
  absl::StatusOr<StepResult> Step();

  // A step in two halves, for lockstep expert parallelism (worker/ep/lockstep.h),
  // where every rank must learn the others' token counts before any runs.
  // PlanStep() schedules the next step (admissions, preemptions, KV blocks)
  // and returns how many tokens it will run; calling it again before the step
  // runs returns the same plan. Cancel() drops a sequence from the plan.
  int64_t PlanStep();
  // For a step the ranks agreed to run anyway (another rank has work): a plan
  // that is empty only because every running sequence rests (pacing) is made
  // again with them riding along, since this rank pays for the step either way
  // and their next tokens then come with it instead of in a step of their own.
  // Returns the plan's tokens; any other plan is kept as it is.
  int64_t RideAlong();
  // How long the current plan's rest lasts: when it is empty only because
  // every running sequence rests (pacing), the time from planning until the
  // first of them falls due; otherwise zero. Idle lockstep ranks wait that
  // long (within bounds) instead of polling each other every millisecond.
  absl::Duration RestsFor() const;
  // Applies from the next PlanStep() on (a pending plan is kept). `preempt`
  // is consumed by that plan; the rest stays until replaced.
  void SetStepDirectives(StepDirectives directives);
  // The smallest step_token_cap of the live sequences (0: none has one), for
  // ranks that must agree on one cap (lockstep expert parallelism).
  int LocalStepTokenCap() const;
  // Runs the planned step (planning first if needed). With run_empty a plan
  // of zero tokens still runs the model over an empty batch, so this rank
  // joins the collectives of every MoE layer; otherwise it returns at once.
  absl::StatusOr<StepResult> RunPlannedStep(bool run_empty);

  bool HasWork() const { return !running_.empty() || !waiting_.empty(); }
  int num_running() const { return static_cast<int>(running_.size()); }
  int num_waiting() const { return static_cast<int>(waiting_.size()); }
  const PagedKvCache& kv_cache() const { return *kv_; }
  int64_t max_model_len() const { return max_model_len_; }
  Model& model() { return *model_; }

  // Test and benchmark hook: sees the model's logits for each sampled token
  // (before penalties and logit_bias).
  using LogitsObserver = std::function<void(uint64_t id, const float* logits, int64_t vocab)>;
  void set_logits_observer(LogitsObserver observer) { observer_ = std::move(observer); }

 private:
  struct Sequence {
    uint64_t id = 0;
    std::vector<int32_t> tokens;  // prompt followed by generated tokens
    int generated = 0;
    int num_computed = 0;         // tokens whose K/V are in the cache
    std::vector<int32_t> blocks;
    std::vector<BlockHash> block_hashes;  // of its full blocks, as far as computed yet
    int num_published = 0;   // leading blocks offered to the prefix cache (or taken from it)
    int cached_tokens = -1;  // prompt tokens the cache gave it when first scheduled
    SamplingParams sampling;
    SamplerRng rng{0};
    TokenHistory history;  // for penalties (SamplingParams::ProcessesLogits)
    int prompt_len = 0;
    // prompt_logprobs asked and not reported yet: the prompt is computed in
    // full (no prefix cache), every prompt row gives logits, and the entries
    // collected so far (first NaN) go out with the first token.
    bool prompt_logprobs_due = false;
    std::vector<TokenLogprob> prompt_logprobs;
    int priority = 0;
    int step_token_cap = 0;
    absl::Duration token_interval = absl::ZeroDuration();
    absl::Time last_step_at = absl::InfinitePast();  // last planned into a step
    uint64_t arrival = 0;
    bool running = false;
    uint64_t plan_mark = 0;  // == plan_epoch_ once considered by the current plan
  };
  struct Scheduled {
    Sequence* seq;
    int chunk;
  };
  enum class Admission { kAdmitted, kDeferred, kNoBlocks };
  // A logit row of the step: the next-token distribution of `seq` after one
  // of its positions; prompt_token >= 0: it gives that prompt token's
  // logprob, else the sequence samples from it.
  struct LogitRow {
    Sequence* seq;
    int prompt_token;
  };

  Engine(Model* model, std::unique_ptr<PagedKvCache> kv, const EngineOptions& options);
  // The KV budget: options.kv_cache_bytes, or on a GPU what the memory
  // utilization leaves once the model's buffers are allocated.
  static absl::StatusOr<int64_t> KvBudget(Model& model, const EngineOptions& options);
  bool EnsureBlocks(Sequence* seq, int num_tokens);
  // The most tokens of `seq` the next step can compute within `budget`.
  int ChunkOf(const Sequence& seq, int budget) const;
  // Moves a waiting sequence to running with its cached prefix and the blocks
  // of its first chunk (set in `chunk`). Deferred when the block after its
  // cached prefix is in `computing` (a sequence in this plan computes it: a
  // step later it is cached); kNoBlocks when the cache is full.
  Admission Admit(Sequence* seq, int budget, const absl::flat_hash_set<BlockHash>* computing,
                  int* chunk);
  // The running sequence to preempt so `seq` can grow: not yet in the plan,
  // lowest priority (highest number), newest; nullptr if there is none.
  Sequence* PickVictim(const Sequence* seq) const;
  void FreeBlocks(Sequence* seq);
  // Whether admitting `seq` looks up its prefix in the cache (not while its
  // prompt logprobs are due: every prompt position's logits are needed).
  bool LooksUpPrefix(const Sequence& seq) const;
  // Prefix caching: the hash of the sequence's full block `i`.
  const BlockHash& BlockHashAt(Sequence* seq, int i);
  // The cached blocks holding the sequence's longest cached prefix, leaving at
  // least its last token to compute (its logits give the next token).
  std::vector<int32_t> FindCachedPrefix(Sequence* seq);
  // Adds the hashes of the full blocks `seq` has yet to compute to `computing`.
  void NoteComputing(Sequence* seq, absl::flat_hash_set<BlockHash>& computing);
  // Publishes the sequence's newly computed full blocks to the prefix cache.
  void PublishComputedBlocks(Sequence* seq);
  void Preempt(Sequence* seq);
  FinishReason CheckFinished(const Sequence& seq, int32_t token) const;
  // The forward batch of `scheduled` and its logit rows (rows_).
  void BuildBatch(const std::vector<Scheduled>& scheduled, StepResult* result);
  // Room in logits_ for the batch's logit rows.
  absl::Status ReserveLogits();
  // Which rows the device samples, drawing their uniforms (undone by
  // UndoSampling if the step fails).
  void PrepareSampling();
  void UndoSampling();
  // After the forward pass: prompt logprobs, the sampled tokens, retirements.
  void TakeLogits(StepResult* result);
  // Appends the token the row gives `seq` (the device's pick, or the host's
  // from the processed logits in `row`) and reports it.
  TokenOutput SampleNext(Sequence* seq, float* row, int32_t device_token);
  void Retire(Sequence* seq);
  absl::Time Now() const { return options_.clock ? options_.clock() : absl::Now(); }

  Model* model_;
  std::unique_ptr<PagedKvCache> kv_;
  EngineOptions options_;
  int64_t max_model_len_;
  absl::flat_hash_map<uint64_t, std::unique_ptr<Sequence>> sequences_;
  std::vector<Sequence*> running_;  // admission order
  std::deque<Sequence*> waiting_;
  // The step PlanStep() scheduled and RunPlannedStep() will run.
  bool planned_ = false;
  bool plan_rested_ = false;  // the plan is empty because every sequence rests
  bool ride_along_ = false;   // planning for RideAlong(): resting is no reason to skip
  std::vector<Scheduled> plan_;
  StepResult plan_result_;  // preemptions made while planning
  ForwardBatch batch_;
  device::Buffer logits_;  // [logit rows, vocab], pinned host memory
  StepSampling sampling_;  // where each sampled row's token is picked
  std::vector<LogitRow> rows_;             // of batch_.logit_rows
  std::vector<SamplerRng> rng_before_step_;  // per logit row
  std::vector<std::pair<float, int32_t>> sample_scratch_;
  uint64_t unseeded_counter_ = 0;
  uint64_t arrivals_ = 0;
  uint64_t plan_epoch_ = 0;
  absl::Time plan_at_;                                  // when the pending plan was made
  absl::Duration step_estimate_ = absl::ZeroDuration();  // moving average, plan to result
  StepDirectives directives_;
  LogitsObserver observer_;
};

}  // namespace joule
