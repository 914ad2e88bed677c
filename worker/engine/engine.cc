#include "worker/engine/engine.h"

#include <algorithm>
#include <limits>
#include <random>
#include <span>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/logging.h"
#include "common/status.h"

namespace joule {

std::string_view FinishReasonName(FinishReason r) {
  switch (r) {
    case FinishReason::kNone: return "none";
    case FinishReason::kStop: return "stop";
    case FinishReason::kLength: return "length";
    case FinishReason::kCancelled: return "cancelled";
  }
  return "?";
}

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(Model* model, const EngineOptions& options) {
  if (options.max_batch_tokens < 1 || options.max_running < 1 || options.max_prefill_chunk < 1 ||
      options.prompt_logprob_rows < 1) {
    return absl::InvalidArgumentError(
        "engine: max_batch_tokens, max_running, max_prefill_chunk and prompt_logprob_rows must be "
        "positive");
  }
  const ModelConfig& c = model->config();
  if (options.block_size <= 0) return absl::InvalidArgumentError("engine: block_size must be positive");
  if (options.max_model_len < 0 || options.max_model_len > c.max_position_embeddings) {
    return absl::InvalidArgumentError(absl::StrCat("engine: max_model_len ", options.max_model_len,
                                                   " must be in [0, max_position_embeddings ",
                                                   c.max_position_embeddings, "]"));
  }
  const int64_t max_len = options.max_model_len > 0 ? options.max_model_len : c.max_position_embeddings;
  const int64_t width = (max_len + options.block_size - 1) / options.block_size;
  RETURN_IF_ERROR(model->Reserve({.tokens = options.max_batch_tokens, .seqs = options.max_running,
                                  .blocks_per_seq = width,
                                  .logit_rows = options.max_running + options.prompt_logprob_rows,
                                  .max_context_len = width * options.block_size}));
  ASSIGN_OR_RETURN(const int64_t budget, KvBudget(*model, options));
  ASSIGN_OR_RETURN(auto kv, PagedKvCache::Create(model->backend(), c, options.block_size, budget,
                                                 options.prefix_caching));
  const int64_t blocks = kv->allocator().num_blocks();
  JOULE_LOG(Info) << "KV cache on " << model->backend().spec().ToString() << ": " << blocks
                  << " blocks of " << options.block_size << " tokens = "
                  << blocks * options.block_size << " tokens ("
                  << absl::StrFormat("%.2f", blocks * kv->BytesPerBlock() / double(1 << 30))
                  << " GiB " << kernels::DTypeName(kv->view().type) << "), prefix caching "
                  << (options.prefix_caching ? "on" : "off");
  ASSIGN_OR_RETURN(const std::vector<int> graphs,
                   model->CaptureDecodeGraphs(kv->view(), options.max_running));
  if (!graphs.empty()) {
    JOULE_LOG(Info) << "captured " << graphs.size() << " decode graphs, batch sizes "
                    << absl::StrJoin(graphs, ",");
  }
  auto engine = std::unique_ptr<Engine>(new Engine(model, std::move(kv), options));
  engine->max_model_len_ = max_len;
  return engine;
}

absl::StatusOr<int64_t> Engine::KvBudget(Model& model, const EngineOptions& options) {
  device::Backend& backend = model.backend();
  if (backend.device_memory_is_host() || options.gpu_memory_utilization <= 0) {
    return options.kv_cache_bytes;
  }
  if (options.gpu_memory_utilization > 1) {
    return absl::InvalidArgumentError(absl::StrCat("engine: gpu_memory_utilization ",
                                                   options.gpu_memory_utilization,
                                                   " must be in (0, 1]"));
  }
  ASSIGN_OR_RETURN(const device::MemoryInfo memory, backend.DeviceMemory());
  const int64_t used = memory.total_bytes - memory.free_bytes;
  const int64_t allowed = static_cast<int64_t>(options.gpu_memory_utilization * memory.total_bytes);
  const int64_t block = PagedKvCache::BlockBytes(model.config(), options.block_size,
                                                 backend.kv_cache_type());
  if (allowed - used < block) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "no room for a KV cache on %s: %.2f GiB of %.2f GiB are in use (weights, workspaces, "
        "other processes) and --gpu-memory-utilization %.2f allows %.2f GiB; one KV block "
        "needs %d bytes",
        backend.spec().ToString(), used / double(1 << 30), memory.total_bytes / double(1 << 30),
        options.gpu_memory_utilization, allowed / double(1 << 30), block));
  }
  return allowed - used;
}

Engine::Engine(Model* model, std::unique_ptr<PagedKvCache> kv, const EngineOptions& options)
    : model_(model), kv_(std::move(kv)), options_(options),
      max_model_len_(model->config().max_position_embeddings) {}

absl::Status Engine::Add(GenerationRequest r) {
  const ModelConfig& c = model_->config();
  if (absl::Status s = r.sampling.Validate(c.vocab_size); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("sampling.", s.message()));
  }
  if (r.prompt.empty()) return absl::InvalidArgumentError("prompt must contain at least one token");
  for (int32_t t : r.prompt) {
    if (t < 0 || t >= c.vocab_size) {
      return absl::InvalidArgumentError(
          absl::StrCat("prompt token id ", t, " is outside the vocabulary [0, ", c.vocab_size, ")"));
    }
  }
  if (static_cast<int64_t>(r.resumed.size()) >= r.sampling.max_tokens) {
    return absl::InvalidArgumentError(absl::StrCat("resumed_token_ids: ", r.resumed.size(),
                                                   " tokens leave nothing of max_tokens ",
                                                   r.sampling.max_tokens));
  }
  for (int32_t t : r.resumed) {
    if (t < 0 || t >= c.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat(
          "resumed token id ", t, " is outside the vocabulary [0, ", c.vocab_size, ")"));
    }
  }
  const int64_t total = static_cast<int64_t>(r.prompt.size()) + r.sampling.max_tokens;
  if (total > max_model_len_) {
    return absl::InvalidArgumentError(absl::StrCat(
        "prompt (", r.prompt.size(), " tokens) + max_tokens (", r.sampling.max_tokens,
        ") exceeds the model's context length of ", max_model_len_));
  }
  const int64_t blocks = (total + kv_->block_size() - 1) / kv_->block_size();
  if (blocks > kv_->allocator().num_blocks()) {
    return absl::ResourceExhaustedError(absl::StrCat("request needs ", blocks,
                                                     " KV blocks; the cache has only ",
                                                     kv_->allocator().num_blocks()));
  }
  if (sequences_.contains(r.id)) {
    return absl::AlreadyExistsError(absl::StrCat("request id ", r.id, " is already in the engine"));
  }
  auto seq = std::make_unique<Sequence>();
  seq->id = r.id;
  seq->tokens = std::move(r.prompt);
  seq->tokens.insert(seq->tokens.end(), r.resumed.begin(), r.resumed.end());
  seq->generated = static_cast<int>(r.resumed.size());
  seq->prompt_len = static_cast<int>(seq->tokens.size()) - seq->generated;
  seq->sampling = std::move(r.sampling);
  if (seq->sampling.ProcessesLogits()) {
    // Resumed tokens were generated (on the rank that died).
    seq->history.AddPrompt(std::span(seq->tokens).first(seq->prompt_len));
    for (int32_t t : r.resumed) seq->history.AddGenerated(t);
  }
  // A resumed request reported its prompt logprobs with its first token.
  if (seq->sampling.prompt_logprobs && r.resumed.empty()) {
    seq->prompt_logprobs_due = true;
    seq->prompt_logprobs.push_back(
        {.token = seq->tokens[0], .logprob = std::numeric_limits<float>::quiet_NaN()});
  }
  seq->priority = r.priority;
  seq->token_interval = std::max(absl::ZeroDuration(), r.token_interval);
  seq->step_token_cap = std::max(0, r.step_token_cap);
  seq->arrival = ++arrivals_;
  // Unseeded requests still get distinct, reproducible-per-process streams.
  seq->rng = SamplerRng(seq->sampling.seed.value_or(0x6a6f756c65ull ^ (++unseeded_counter_ * 0x9e3779b97f4a7c15ull) ^
                                                    std::random_device{}()));
  // Every token a sampler drew (not greedy) took one uniform.
  if (DrawsPerToken(seq->sampling) > 0) {
    for (size_t i = 0; i < r.resumed.size(); ++i) seq->rng.Uniform();
  }
  waiting_.push_back(seq.get());
  sequences_.emplace(seq->id, std::move(seq));
  return absl::OkStatus();
}

bool Engine::EnsureBlocks(Sequence* seq, int num_tokens) {
  const int bs = kv_->block_size();
  const size_t need = static_cast<size_t>((num_tokens + bs - 1) / bs);
  while (seq->blocks.size() < need) {
    int32_t b = kv_->allocator().Allocate();
    if (b < 0) return false;
    seq->blocks.push_back(b);
  }
  return true;
}

int Engine::ChunkOf(const Sequence& seq, int budget) const {
  const int remaining = static_cast<int>(seq.tokens.size()) - seq.num_computed;
  return std::min({remaining, budget, options_.max_prefill_chunk});
}

void Engine::FreeBlocks(Sequence* seq) {
  // Last block first: a released prefix is then evicted from its tail, and
  // the blocks other prompts are likeliest to share stay longest.
  for (auto it = seq->blocks.rbegin(); it != seq->blocks.rend(); ++it) kv_->allocator().Free(*it);
  seq->blocks.clear();
  seq->num_published = 0;
}

const BlockHash& Engine::BlockHashAt(Sequence* seq, int i) {
  const int bs = kv_->block_size();
  while (static_cast<int>(seq->block_hashes.size()) <= i) {
    const size_t k = seq->block_hashes.size();
    const BlockHash parent = k == 0 ? kRootBlockHash : seq->block_hashes[k - 1];
    seq->block_hashes.push_back(HashBlock(parent, std::span(seq->tokens).subspan(k * bs, bs)));
  }
  return seq->block_hashes[i];
}

bool Engine::LooksUpPrefix(const Sequence& seq) const {
  return kv_->allocator().prefix_caching() && !seq.prompt_logprobs_due;
}

std::vector<int32_t> Engine::FindCachedPrefix(Sequence* seq) {
  std::vector<int32_t> hits;
  const BlockAllocator& blocks = kv_->allocator();
  if (!LooksUpPrefix(*seq)) return hits;
  const int bs = kv_->block_size();
  const int eligible = (static_cast<int>(seq->tokens.size()) - 1) / bs;
  for (int i = 0; i < eligible; ++i) {
    const int32_t b = blocks.Find(BlockHashAt(seq, i), std::span(seq->tokens).subspan(i * bs, bs));
    if (b < 0) break;
    hits.push_back(b);
  }
  return hits;
}

void Engine::NoteComputing(Sequence* seq, absl::flat_hash_set<BlockHash>& computing) {
  const int bs = kv_->block_size();
  const int full = static_cast<int>(seq->tokens.size()) / bs;
  for (int i = seq->num_computed / bs; i < full; ++i) computing.insert(BlockHashAt(seq, i));
}

void Engine::PublishComputedBlocks(Sequence* seq) {
  BlockAllocator& blocks = kv_->allocator();
  if (!blocks.prefix_caching()) return;
  const int bs = kv_->block_size();
  for (; seq->num_published < seq->num_computed / bs; ++seq->num_published) {
    const int i = seq->num_published;
    blocks.Publish(seq->blocks[i], BlockHashAt(seq, i), std::span(seq->tokens).subspan(i * bs, bs));
  }
}

Engine::Admission Engine::Admit(Sequence* seq, int budget,
                                const absl::flat_hash_set<BlockHash>* computing, int* chunk) {
  const int bs = kv_->block_size();
  const int len = static_cast<int>(seq->tokens.size());
  std::vector<int32_t> hits = FindCachedPrefix(seq);
  const int cached = static_cast<int>(hits.size());
  if (computing != nullptr && LooksUpPrefix(*seq) && cached < (len - 1) / bs &&
      computing->contains(BlockHashAt(seq, cached))) {
    return Admission::kDeferred;
  }
  for (int32_t b : hits) kv_->allocator().Share(b);
  seq->blocks = std::move(hits);
  seq->num_computed = cached * bs;
  seq->num_published = cached;
  *chunk = ChunkOf(*seq, budget);
  // Checked first so that a request that does not fit evicts no cached block.
  const int64_t needed = (seq->num_computed + *chunk + bs - 1) / bs - cached;
  if (needed > kv_->allocator().num_free() || !EnsureBlocks(seq, seq->num_computed + *chunk)) {
    FreeBlocks(seq);
    seq->num_computed = 0;
    return Admission::kNoBlocks;
  }
  if (seq->cached_tokens < 0) {  // first admission: a preempted one would count its own blocks
    seq->cached_tokens = std::min(seq->num_computed, len - seq->generated);
    if (LooksUpPrefix(*seq)) {
      plan_result_.prefix_cache_queries += len;
      plan_result_.prefix_cache_hits += seq->num_computed;
    }
  }
  waiting_.erase(std::find(waiting_.begin(), waiting_.end(), seq));
  running_.push_back(seq);
  seq->running = true;
  return Admission::kAdmitted;
}

void Engine::Preempt(Sequence* seq) {
  FreeBlocks(seq);
  seq->num_computed = 0;
  seq->running = false;
  running_.erase(std::find(running_.begin(), running_.end(), seq));
  waiting_.push_front(seq);
}

Engine::Sequence* Engine::PickVictim(const Sequence* seq) const {
  Sequence* victim = nullptr;
  for (Sequence* r : running_) {  // oldest first: ties go to the newer one
    if (r == seq || r->plan_mark == plan_epoch_) continue;
    if (victim == nullptr || r->priority >= victim->priority) victim = r;
  }
  return victim;
}

void Engine::SetStepDirectives(StepDirectives directives) { directives_ = std::move(directives); }

int Engine::LocalStepTokenCap() const {
  int cap = 0;
  for (const auto& [id, seq] : sequences_) {
    if (seq->step_token_cap > 0 && (cap == 0 || seq->step_token_cap < cap)) cap = seq->step_token_cap;
  }
  return cap;
}

void Engine::Retire(Sequence* seq) {
  FreeBlocks(seq);
  // A cancelled sequence leaves a pending plan (lockstep: planned, not yet run).
  plan_.erase(std::remove_if(plan_.begin(), plan_.end(),
                             [seq](const Scheduled& s) { return s.seq == seq; }),
              plan_.end());
  auto it = std::find(running_.begin(), running_.end(), seq);
  if (it != running_.end()) running_.erase(it);
  auto wt = std::find(waiting_.begin(), waiting_.end(), seq);
  if (wt != waiting_.end()) waiting_.erase(wt);
  sequences_.erase(seq->id);
}

bool Engine::Cancel(uint64_t id) {
  auto it = sequences_.find(id);
  if (it == sequences_.end()) return false;
  Retire(it->second.get());
  return true;
}

FinishReason Engine::CheckFinished(const Sequence& seq, int32_t token) const {
  const ModelConfig& c = model_->config();
  if (!seq.sampling.ignore_eos &&
      std::find(c.eos_token_ids.begin(), c.eos_token_ids.end(), token) != c.eos_token_ids.end()) {
    return FinishReason::kStop;
  }
  const auto& stops = seq.sampling.stop_token_ids;
  if (std::find(stops.begin(), stops.end(), token) != stops.end()) return FinishReason::kStop;
  if (seq.generated >= seq.sampling.max_tokens) return FinishReason::kLength;
  if (static_cast<int64_t>(seq.tokens.size()) >= max_model_len_) return FinishReason::kLength;
  return FinishReason::kNone;
}

absl::StatusOr<StepResult> Engine::Step() {
  PlanStep();
  return RunPlannedStep(/*run_empty=*/false);
}

int64_t Engine::PlanStep() {
  auto tokens = [this]() {
    int64_t n = 0;
    for (const Scheduled& s : plan_) n += s.chunk;
    return n;
  };
  if (planned_) return tokens();
  planned_ = true;
  plan_rested_ = false;
  plan_.clear();
  plan_result_ = StepResult();
  StepResult& result = plan_result_;
  std::vector<Scheduled>& scheduled = plan_;
  ++plan_epoch_;
  auto capped = [](int option, int directive) {
    return directive > 0 ? std::min(option, directive) : option;
  };
  int budget = capped(capped(options_.max_batch_tokens, directives_.max_batch_tokens),
                      LocalStepTokenCap());
  const int max_running = capped(options_.max_running, directives_.max_running);

  // 0. Preemptions the scheduler asked for.
  for (uint64_t id : directives_.preempt) {
    auto it = sequences_.find(id);
    if (it == sequences_.end() || !it->second->running) continue;
    result.preempted.push_back(id);
    Preempt(it->second.get());
    it->second->plan_mark = plan_epoch_;  // not re-admitted by this same plan
  }
  directives_.preempt.clear();

  // Pacing: with every live sequence paced, decoding and not due, no step.
  const absl::Time now = Now();
  plan_at_ = now;
  auto resting_for = [&](const Sequence* seq, absl::Duration horizon) {
    return seq->running && seq->token_interval > absl::ZeroDuration() && seq->generated > 0 &&
           seq->num_computed + 1 == static_cast<int>(seq->tokens.size()) &&
           now + horizon - seq->last_step_at < seq->token_interval;
  };
  // Whether to run a step at all is decided on who is due now; once a step
  // runs, a sequence that falls due before the next one could start needs
  // this one, or under a step token cap it would wait a whole extra step.
  auto resting = [&](const Sequence* seq) { return resting_for(seq, step_estimate_); };
  if (!ride_along_ && waiting_.empty() && !running_.empty() &&
      std::all_of(running_.begin(), running_.end(),
                  [&](const Sequence* seq) { return resting_for(seq, absl::ZeroDuration()); })) {
    plan_rested_ = true;
    return 0;
  }

  // Candidates in the order they get the budget: the scheduler's order, then
  // by priority; within one priority running sequences (oldest first) before
  // waiting ones (by arrival; a preempted sequence keeps its original arrival).
  // With every priority equal this is plain continuous batching.
  std::vector<Sequence*> candidates;
  candidates.reserve(running_.size() + waiting_.size());
  for (uint64_t id : directives_.order) {
    auto it = sequences_.find(id);
    if (it != sequences_.end()) candidates.push_back(it->second.get());
  }
  const size_t first_rest = candidates.size();
  candidates.insert(candidates.end(), running_.begin(), running_.end());
  candidates.insert(candidates.end(), waiting_.begin(), waiting_.end());
  std::stable_sort(candidates.begin() + first_rest, candidates.end(),
                   [](const Sequence* a, const Sequence* b) {
                     if (a->priority != b->priority) return a->priority < b->priority;
                     if (a->running != b->running) return a->running;
                     // Running ones keep their admission order (stable sort).
                     return !a->running && a->arrival < b->arrival;
                   });
  // Resting paced sequences only ride along, after everything that needs the step.
  std::stable_partition(candidates.begin(), candidates.end(),
                        [&](const Sequence* s) { return !resting(s); });

  // Prefix caching: the full blocks the plan's sequences are computing, so
  // that requests sharing a prompt compute its blocks once (Admit).
  absl::flat_hash_set<BlockHash> computing;
  const bool dedupe = kv_->allocator().prefix_caching() && !waiting_.empty();
  bool admitting = true;  // stops at the first waiting sequence that does not fit
  int prompt_rows = options_.prompt_logprob_rows;  // logit rows left for prompt logprobs
  for (Sequence* seq : candidates) {
    if (budget <= 0) break;
    if (seq->plan_mark == plan_epoch_) continue;
    // A prompt whose logprobs are due spends a logit row per token.
    const int seq_budget = seq->prompt_logprobs_due ? std::min(budget, prompt_rows) : budget;
    if (seq_budget <= 0) continue;
    int chunk = ChunkOf(*seq, seq_budget);
    if (seq->running) {
      // Decodes and unfinished prefills. When the cache is full a lower-priority
      // (then newer) running sequence that is not in this plan yields its blocks.
      while (!EnsureBlocks(seq, seq->num_computed + chunk)) {
        Sequence* victim = PickVictim(seq);
        if (victim == nullptr) break;
        result.preempted.push_back(victim->id);
        Preempt(victim);
        victim->plan_mark = plan_epoch_;
      }
      if (!EnsureBlocks(seq, seq->num_computed + chunk)) {
        // Alone and still short of blocks (only if the cache is tiny): start over later.
        if (scheduled.empty() && running_.size() == 1) {
          result.preempted.push_back(seq->id);
          Preempt(seq);
        }
        seq->plan_mark = plan_epoch_;
        continue;
      }
    } else {
      if (!admitting || static_cast<int>(running_.size()) >= max_running) continue;
      const Admission admission = Admit(seq, seq_budget, dedupe ? &computing : nullptr, &chunk);
      if (admission == Admission::kDeferred) continue;
      if (admission == Admission::kNoBlocks) {
        admitting = false;
        continue;
      }
    }
    seq->plan_mark = plan_epoch_;
    seq->last_step_at = now;
    scheduled.push_back({seq, chunk});
    budget -= chunk;
    if (seq->prompt_logprobs_due) prompt_rows -= chunk;
    if (dedupe) NoteComputing(seq, computing);
  }
  return tokens();
}

int64_t Engine::RideAlong() {
  if (!planned_ || !plan_rested_) return PlanStep();
  // A rested plan made no preemptions (those leave sequences waiting), so
  // planning again loses nothing.
  planned_ = false;
  ride_along_ = true;
  const int64_t tokens = PlanStep();
  ride_along_ = false;
  return tokens;
}

absl::Duration Engine::RestsFor() const {
  if (!planned_ || !plan_rested_ || running_.empty()) return absl::ZeroDuration();
  absl::Duration rest = absl::InfiniteDuration();
  for (const Sequence* seq : running_) {
    rest = std::min(rest, seq->last_step_at + seq->token_interval - plan_at_);
  }
  return std::max(rest, absl::ZeroDuration());
}

absl::StatusOr<StepResult> Engine::RunPlannedStep(bool run_empty) {
  PlanStep();
  planned_ = false;
  StepResult result = std::move(plan_result_);
  plan_result_ = StepResult();
  const std::vector<Scheduled> scheduled = std::move(plan_);
  plan_.clear();
  if (scheduled.empty() && !run_empty) return result;

  // 3. One forward batch.
  BuildBatch(scheduled, &result);
  RETURN_IF_ERROR(ReserveLogits());
  PrepareSampling();
  if (absl::Status s = model_->Forward(batch_, kv_->view(), logits_.as<float>(), &sampling_);
      !s.ok()) {
    // The step did not happen: the next one draws the same uniforms again,
    // so its tokens are what this step's would have been.
    UndoSampling();
    return s;
  }
  for (const Scheduled& s : scheduled) {
    s.seq->num_computed += s.chunk;
    PublishComputedBlocks(s.seq);
  }
  // Plan to end of the forward pass (in lockstep that includes the token
  // count exchange and waiting for the slowest rank).
  const absl::Duration took = std::max(absl::ZeroDuration(), Now() - plan_at_);
  step_estimate_ = step_estimate_ == absl::ZeroDuration() ? took : (3 * step_estimate_ + took) / 4;

  // 4. Sample and retire finished sequences.
  TakeLogits(&result);
  return result;
}

void Engine::BuildBatch(const std::vector<Scheduled>& scheduled, StepResult* result) {
  ForwardBatch& b = batch_;
  b.tokens.clear();
  b.positions.clear();
  b.slots.clear();
  b.query_start.assign(1, 0);
  b.context_lens.clear();
  b.logit_rows.clear();
  rows_.clear();
  int max_blocks = 0;
  for (const Scheduled& s : scheduled) max_blocks = std::max<int>(max_blocks, s.seq->blocks.size());
  b.max_blocks_per_seq = max_blocks;
  b.block_tables.assign(scheduled.size() * max_blocks, 0);
  const int bs = kv_->block_size();
  for (size_t si = 0; si < scheduled.size(); ++si) {
    const Scheduled& s = scheduled[si];
    Sequence* seq = s.seq;
    for (int j = 0; j < s.chunk; ++j) {
      const int pos = seq->num_computed + j;
      b.tokens.push_back(seq->tokens[pos]);
      b.positions.push_back(pos);
      b.slots.push_back(static_cast<int64_t>(seq->blocks[pos / bs]) * bs + pos % bs);
      // The logits after `pos` give prompt token pos + 1's logprob, once.
      const int next = pos + 1;
      if (seq->prompt_logprobs_due && next < seq->prompt_len &&
          next >= static_cast<int>(seq->prompt_logprobs.size())) {
        b.logit_rows.push_back(static_cast<int32_t>(b.tokens.size()) - 1);
        rows_.push_back({seq, next});
      }
    }
    b.query_start.push_back(static_cast<int32_t>(b.tokens.size()));
    b.context_lens.push_back(seq->num_computed + s.chunk);
    std::copy(seq->blocks.begin(), seq->blocks.end(), b.block_tables.begin() + si * max_blocks);
    if (seq->num_computed + s.chunk == static_cast<int>(seq->tokens.size())) {
      b.logit_rows.push_back(static_cast<int32_t>(b.tokens.size()) - 1);
      rows_.push_back({seq, -1});
    }
    if (s.chunk == 1 && seq->generated > 0 && seq->num_computed + 1 == static_cast<int>(seq->tokens.size())) {
      result->decode_tokens += 1;
    } else {
      result->prefill_tokens += s.chunk;
    }
  }
  result->num_seqs = static_cast<int>(scheduled.size());
  result->scheduled.clear();
  for (const Scheduled& s : scheduled) {
    result->scheduled.emplace_back(s.seq->id, s.chunk);
    result->context_tokens += s.seq->num_computed + s.chunk;
  }
}

absl::Status Engine::ReserveLogits() {
  // Pinned memory: a GPU copies the host's rows' logits straight into it.
  const size_t logit_bytes = batch_.logit_rows.size() * model_->config().vocab_size * sizeof(float);
  if (logits_.bytes() < logit_bytes) {
    ASSIGN_OR_RETURN(logits_, model_->backend().Allocate(device::MemoryKind::kPinned,
                                                         std::max(logit_bytes, 2 * logits_.bytes())));
  }
  return absl::OkStatus();
}

void Engine::PrepareSampling() {
  // Greedy and plain temperature sampling happen where the logits are (on a
  // GPU only the tokens come back); prompt rows, top-k, top-p, penalties,
  // logprobs and a logits observer need the logits here. The uniform is drawn
  // now, from the sequence's stream, as the host sampler would.
  const int64_t vocab = model_->config().vocab_size;
  rng_before_step_.clear();
  for (const LogitRow& row : rows_) rng_before_step_.push_back(row.seq->rng);
  StepSampling& sampling = sampling_;
  sampling.temperature.assign(rows_.size(), -1.0f);
  sampling.uniform.assign(rows_.size(), 0.0);
  if (observer_) return;
  for (size_t r = 0; r < rows_.size(); ++r) {
    const SamplingParams& p = rows_[r].seq->sampling;
    if (rows_[r].prompt_token >= 0 || !SamplesOnDevice(p, vocab)) continue;
    sampling.temperature[r] = DeviceTemperature(p);
    if (sampling.temperature[r] > 0.0f) sampling.uniform[r] = rows_[r].seq->rng.Uniform();
  }
}

void Engine::UndoSampling() {
  for (size_t r = 0; r < rows_.size(); ++r) rows_[r].seq->rng = rng_before_step_[r];
}

void Engine::TakeLogits(StepResult* result) {
  const int64_t vocab = model_->config().vocab_size;
  for (size_t r = 0; r < rows_.size(); ++r) {
    Sequence* seq = rows_[r].seq;
    float* row = logits_.as<float>() + r * vocab;
    if (const int prompt_token = rows_[r].prompt_token; prompt_token >= 0) {
      seq->prompt_logprobs.push_back(ComputeLogprob(row, vocab, /*temperature=*/0.0f,
                                                    seq->tokens[prompt_token],
                                                    seq->sampling.top_logprobs, &sample_scratch_));
      continue;
    }
    // A sequence's sampling row is its last in the step: retiring it is safe.
    result->tokens.push_back(SampleNext(seq, row, sampling_.tokens[r]));
    if (result->tokens.back().finish != FinishReason::kNone) Retire(seq);
  }
}

TokenOutput Engine::SampleNext(Sequence* seq, float* row, int32_t device_token) {
  const int64_t vocab = model_->config().vocab_size;
  const SamplingParams& p = seq->sampling;
  if (observer_) observer_(seq->id, row, vocab);
  int32_t token = device_token;  // a device-sampled row's logits never came back
  if (token < 0) {
    if (p.ProcessesLogits()) ProcessLogits(row, vocab, p, seq->history);
    token = SampleToken(row, vocab, p, &seq->rng, &sample_scratch_);
  }
  TokenOutput out{.id = seq->id, .token = token, .cached_tokens = std::max(0, seq->cached_tokens)};
  if (p.logprobs) {
    out.logprob = ComputeLogprob(row, vocab, p.temperature, token, p.top_logprobs, &sample_scratch_);
  }
  if (seq->prompt_logprobs_due) {
    out.prompt_logprobs = std::exchange(seq->prompt_logprobs, {});
    seq->prompt_logprobs_due = false;
  }
  seq->tokens.push_back(token);
  ++seq->generated;
  if (p.ProcessesLogits()) seq->history.AddGenerated(token);
  out.finish = CheckFinished(*seq, token);
  return out;
}

}  // namespace joule
