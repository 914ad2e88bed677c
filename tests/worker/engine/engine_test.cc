// Continuous batching behaviour a user would notice: outputs do not depend on
// batch composition, preemption or chunking; cancellation frees memory; bad
// requests get clear errors.
#include "worker/engine/engine.h"

#include <algorithm>
#include <map>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/paths.h"

namespace joule {
namespace {

using ::testing::HasSubstr;

class EngineTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto m = Model::Load(testing::TinyModelDir("qwen3_moe-tiny"), {.num_threads = 2});
    ASSERT_TRUE(m.ok()) << m.status();
    model_ = std::move(*m);
  }

  std::unique_ptr<Engine> MakeEngine(EngineOptions opts = {}) {
    auto e = Engine::Create(model_.get(), opts);
    EXPECT_TRUE(e.ok()) << e.status();
    return std::move(*e);
  }

  static std::vector<int32_t> Prompt(int len, int salt) {
    std::vector<int32_t> p;
    for (int i = 0; i < len; ++i) p.push_back((i * 37 + salt * 11) % 256);
    return p;
  }

  static SamplingParams Sampled(uint64_t seed, int max_tokens) {
    SamplingParams s;
    s.temperature = 0.9f;
    s.top_p = 0.95f;
    s.seed = seed;
    s.max_tokens = max_tokens;
    s.ignore_eos = true;
    return s;
  }

  // Runs to completion; returns tokens per id and the total of preemptions.
  static std::map<uint64_t, std::vector<int32_t>> Drain(Engine& e, int* preemptions = nullptr,
                                                        std::map<uint64_t, FinishReason>* finish = nullptr) {
    std::map<uint64_t, std::vector<int32_t>> out;
    int steps = 0;
    while (e.HasWork() && steps++ < 10000) {
      auto r = e.Step();
      EXPECT_TRUE(r.ok()) << r.status();
      if (!r.ok()) break;
      if (preemptions) *preemptions += static_cast<int>(r->preempted.size());
      for (const TokenOutput& t : r->tokens) {
        out[t.id].push_back(t.token);
        if (finish && t.finish != FinishReason::kNone) (*finish)[t.id] = t.finish;
      }
    }
    return out;
  }

  std::unique_ptr<Model> model_;
};

TEST_F(EngineTest, OutputIndependentOfBatchAndPreemption) {
  // Reference: each request alone with plenty of memory.
  std::map<uint64_t, std::vector<int32_t>> alone;
  for (uint64_t id = 0; id < 6; ++id) {
    auto e = MakeEngine();
    ASSERT_TRUE(e->Add({.id = id, .prompt = Prompt(10 + 3 * id, id), .sampling = Sampled(100 + id, 20)}).ok());
    alone[id] = Drain(*e)[id];
    ASSERT_EQ(alone[id].size(), 20u);
  }
  // Together, in a cache so small that sequences must be preempted and recomputed.
  EngineOptions tight;
  tight.block_size = 4;
  const int64_t block_bytes = 2LL * model_->config().num_layers * 4 * model_->config().num_key_value_heads *
                              model_->config().head_dim * 4;
  tight.kv_cache_bytes = 24 * block_bytes;  // 96 slots for 6 sequences of up to 45 tokens
  tight.max_batch_tokens = 8;
  auto e = MakeEngine(tight);
  for (uint64_t id = 0; id < 6; ++id) {
    ASSERT_TRUE(e->Add({.id = id, .prompt = Prompt(10 + 3 * id, id), .sampling = Sampled(100 + id, 20)}).ok());
  }
  int preemptions = 0;
  auto together = Drain(*e, &preemptions);
  EXPECT_GT(preemptions, 0) << "the test meant to force preemption";
  EXPECT_EQ(together, alone);
  EXPECT_EQ(e->kv_cache().allocator().num_free(), e->kv_cache().allocator().num_blocks());
}

TEST_F(EngineTest, WaitingSequencesAreAdmittedByPriorityThenArrival) {
  auto e = MakeEngine({.max_running = 1});
  SamplingParams s = Sampled(1, 2);
  ASSERT_TRUE(e->Add({.id = 1, .prompt = Prompt(5, 1), .sampling = s, .priority = 3}).ok());
  ASSERT_TRUE(e->Add({.id = 2, .prompt = Prompt(5, 2), .sampling = s, .priority = 0}).ok());
  ASSERT_TRUE(e->Add({.id = 3, .prompt = Prompt(5, 3), .sampling = s, .priority = 0}).ok());
  std::vector<uint64_t> first_token_order;
  while (e->HasWork()) {
    auto r = e->Step();
    ASSERT_TRUE(r.ok()) << r.status();
    for (const TokenOutput& t : r->tokens) {
      if (std::find(first_token_order.begin(), first_token_order.end(), t.id) ==
          first_token_order.end()) {
        first_token_order.push_back(t.id);
      }
    }
  }
  EXPECT_EQ(first_token_order, (std::vector<uint64_t>{2, 3, 1}));
}

TEST_F(EngineTest, DirectivesCapTheStepOrderTheBudgetAndPreemptWithoutChangingOutput) {
  std::map<uint64_t, std::vector<int32_t>> alone;
  for (uint64_t id = 1; id <= 3; ++id) {
    auto e = MakeEngine();
    ASSERT_TRUE(e->Add({.id = id, .prompt = Prompt(6 + id, id), .sampling = Sampled(7 + id, 10)}).ok());
    alone[id] = Drain(*e)[id];
  }
  auto e = MakeEngine();
  for (uint64_t id = 1; id <= 3; ++id) {
    ASSERT_TRUE(e->Add({.id = id, .prompt = Prompt(6 + id, id), .sampling = Sampled(7 + id, 10)}).ok());
  }
  // A cap of 9 tokens with sequence 3 first: only 3's prefill (9 tokens) runs.
  e->SetStepDirectives({.max_batch_tokens = 9, .order = {3}});
  EXPECT_EQ(e->PlanStep(), 9);
  std::map<uint64_t, std::vector<int32_t>> got;
  auto collect = [&](const StepResult& r) {
    for (const TokenOutput& t : r.tokens) got[t.id].push_back(t.token);
  };
  auto r = e->Step();
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->tokens.size(), 1u);
  EXPECT_EQ(r->tokens[0].id, 3u);
  collect(*r);
  // Lift the cap: 1 and 2 are admitted next to 3's decode.
  e->SetStepDirectives({});
  r = e->Step();
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->num_seqs, 3);
  collect(*r);
  // Preempt 2 (say, batch work under pressure): freed now, recomputed later.
  const int free_before = e->kv_cache().allocator().num_free();
  e->SetStepDirectives({.preempt = {2}});
  EXPECT_EQ(e->PlanStep(), 2);  // decodes of 1 and 3 only
  EXPECT_GT(e->kv_cache().allocator().num_free(), free_before);
  r = e->Step();
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->preempted, (std::vector<uint64_t>{2}));
  collect(*r);
  while (e->HasWork()) {
    r = e->Step();
    ASSERT_TRUE(r.ok()) << r.status();
    collect(*r);
  }
  EXPECT_EQ(got, alone);
  EXPECT_EQ(e->kv_cache().allocator().num_free(), e->kv_cache().allocator().num_blocks());
}

TEST_F(EngineTest, AStepTokenCapBoundsEveryStepWhileItsSequenceLivesAndGoesFirst) {
  auto e = MakeEngine({.max_batch_tokens = 64});
  // Batch work with long prompts, then a fast request capped at 6 tokens per step.
  for (uint64_t id = 1; id <= 3; ++id) {
    ASSERT_TRUE(e->Add({.id = id, .prompt = Prompt(20, id), .sampling = Sampled(id, 8), .priority = 3}).ok());
  }
  ASSERT_TRUE(e->Step().ok());  // 60 prompt tokens of batch work, uncapped
  ASSERT_TRUE(e->Add({.id = 9, .prompt = Prompt(4, 9), .sampling = Sampled(9, 5), .priority = 0,
                      .step_token_cap = 6}).ok());
  EXPECT_EQ(e->LocalStepTokenCap(), 6);
  bool fast_live = true;
  int steps = 0;
  while (fast_live && steps++ < 50) {
    const int64_t planned = e->PlanStep();
    EXPECT_LE(planned, 6);
    auto r = e->Step();
    ASSERT_TRUE(r.ok()) << r.status();
    // The fast sequence is first in every step it is part of.
    ASSERT_FALSE(r->scheduled.empty());
    EXPECT_EQ(r->scheduled.front().first, 9u);
    for (const TokenOutput& t : r->tokens) {
      if (t.id == 9 && t.finish != FinishReason::kNone) fast_live = false;
    }
  }
  EXPECT_FALSE(fast_live);
  EXPECT_EQ(e->LocalStepTokenCap(), 0);
  EXPECT_GT(e->PlanStep(), 0);  // batch work carries on, uncapped
}

TEST_F(EngineTest, PacedSequencesSkipStepsUntilDueAndRideAlongOtherwise) {
  absl::Time now = absl::UnixEpoch();
  auto e = MakeEngine({.clock = [&now] { return now; }});
  std::map<uint64_t, std::vector<int32_t>> paced;
  auto step = [&]() -> StepResult {
    auto r = e->Step();
    EXPECT_TRUE(r.ok()) << r.status();
    for (const TokenOutput& t : r->tokens) paced[t.id].push_back(t.token);
    return *std::move(r);
  };
  const absl::Duration interval = absl::Milliseconds(100);
  ASSERT_TRUE(e->Add({.id = 1, .prompt = Prompt(20, 1), .sampling = Sampled(1, 6),
                      .token_interval = interval}).ok());
  ASSERT_TRUE(e->Add({.id = 2, .prompt = Prompt(9, 2), .sampling = Sampled(2, 6),
                      .token_interval = interval}).ok());
  // Prefill is never paced: both prompts, then their first tokens.
  EXPECT_EQ(step().tokens.size(), 2u);
  // Decoding and not due: no step at all.
  now += absl::Milliseconds(40);
  EXPECT_EQ(e->PlanStep(), 0);
  EXPECT_TRUE(step().tokens.empty());
  // Due: one step carries both, which keeps them in step with each other.
  now += absl::Milliseconds(60);
  EXPECT_EQ(e->PlanStep(), 2);
  EXPECT_EQ(step().tokens.size(), 2u);
  now += absl::Milliseconds(99);
  EXPECT_EQ(e->PlanStep(), 0);
  EXPECT_TRUE(step().tokens.empty());
  // A step that runs anyway (another lockstep rank has work): the resting
  // sequences take their next token in it early, and are not due again for a
  // whole interval after it.
  EXPECT_EQ(e->PlanStep(), 0);
  EXPECT_EQ(e->RideAlong(), 2);
  EXPECT_EQ(e->RideAlong(), 2);  // the plan stands
  {
    auto r = e->RunPlannedStep(/*run_empty=*/true);
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->tokens.size(), 2u);
    for (const TokenOutput& t : r->tokens) paced[t.id].push_back(t.token);
  }
  now += absl::Milliseconds(60);
  EXPECT_EQ(e->PlanStep(), 0);
  EXPECT_TRUE(step().tokens.empty());

  // An unpaced request makes steps run; the paced ones ride along after it.
  ASSERT_TRUE(e->Add({.id = 3, .prompt = Prompt(3, 3), .sampling = Sampled(3, 6)}).ok());
  const StepResult ride = step();
  ASSERT_EQ(ride.scheduled.size(), 3u);
  EXPECT_EQ(ride.scheduled.front().first, 3u);
  int steps = 0;
  while (e->HasWork() && steps++ < 1000) {
    now += absl::Milliseconds(10);
    step();
  }
  // Pacing changes when tokens come, not which.
  auto plain = MakeEngine();
  for (uint64_t id : {1, 2, 3}) {
    ASSERT_TRUE(plain->Add({.id = id, .prompt = Prompt(id == 1 ? 20 : id == 2 ? 9 : 3, static_cast<int>(id)),
                            .sampling = Sampled(id, 6)}).ok());
  }
  EXPECT_EQ(paced, Drain(*plain));
}

TEST_F(EngineTest, APacedSequenceDueWithinAStepTakesItAheadOfLowerTiers) {
  // Steps take 30 ms on this clock; one step carries at most 4 tokens.
  absl::Time now = absl::UnixEpoch();
  auto e = MakeEngine({.max_batch_tokens = 4, .clock = [&now] { return now; }});
  const absl::Duration step_time = absl::Milliseconds(30);
  ASSERT_TRUE(e->Add({.id = 1, .prompt = Prompt(3, 1), .sampling = Sampled(1, 4),
                      .token_interval = absl::Milliseconds(100)}).ok());
  ASSERT_TRUE(e->Add({.id = 2, .prompt = Prompt(200, 2), .sampling = Sampled(2, 2), .priority = 3}).ok());
  auto step = [&]() -> std::vector<uint64_t> {
    e->PlanStep();
    now += step_time;
    auto r = e->RunPlannedStep(/*run_empty=*/false);
    EXPECT_TRUE(r.ok()) << r.status();
    std::vector<uint64_t> ids;
    for (const auto& [id, chunk] : r->scheduled) ids.push_back(id);
    return ids;
  };
  EXPECT_EQ(step(), (std::vector<uint64_t>{1, 2}));  // t=0: prompt 1 whole, then its first token
  // t=30 and t=60: the next token is due at 100, after these steps end.
  EXPECT_EQ(step(), (std::vector<uint64_t>{2}));
  EXPECT_EQ(step(), (std::vector<uint64_t>{2}));
  // t=90: due before the next step could start (120), so it needs this one
  // and goes first; planned no later than at 120 its token would come at 150.
  EXPECT_EQ(step(), (std::vector<uint64_t>{1, 2}));
  EXPECT_EQ(step(), (std::vector<uint64_t>{2}));
}

TEST_F(EngineTest, RequestJoiningMidFlightGetsSameTokens) {
  SamplingParams greedy;
  greedy.temperature = 0.0f;
  greedy.max_tokens = 12;
  greedy.ignore_eos = true;
  auto solo = MakeEngine();
  ASSERT_TRUE(solo->Add({.id = 2, .prompt = Prompt(9, 5), .sampling = greedy}).ok());
  auto want = Drain(*solo)[2];

  auto e = MakeEngine();
  ASSERT_TRUE(e->Add({.id = 1, .prompt = Prompt(30, 1), .sampling = greedy}).ok());
  for (int i = 0; i < 4; ++i) ASSERT_TRUE(e->Step().ok());
  ASSERT_TRUE(e->Add({.id = 2, .prompt = Prompt(9, 5), .sampling = greedy}).ok());
  EXPECT_EQ(Drain(*e)[2], want);
}

TEST_F(EngineTest, CancelFreesBlocksQueuedOrRunning) {
  auto e = MakeEngine({.block_size = 4});
  const int64_t total = e->kv_cache().allocator().num_blocks();
  ASSERT_TRUE(e->Add({.id = 1, .prompt = Prompt(40, 1), .sampling = Sampled(1, 50)}).ok());
  ASSERT_TRUE(e->Add({.id = 2, .prompt = Prompt(5, 2), .sampling = Sampled(2, 50)}).ok());
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(e->Step().ok());
  EXPECT_LT(e->kv_cache().allocator().num_free(), total);
  EXPECT_TRUE(e->Cancel(1));
  EXPECT_TRUE(e->Cancel(2));
  EXPECT_FALSE(e->Cancel(2));
  EXPECT_FALSE(e->HasWork());
  EXPECT_EQ(e->kv_cache().allocator().num_free(), total);
  // A cancelled id can be reused.
  EXPECT_TRUE(e->Add({.id = 1, .prompt = Prompt(3, 1), .sampling = Sampled(1, 2)}).ok());
}

TEST_F(EngineTest, FinishReasons) {
  SamplingParams greedy;
  greedy.temperature = 0.0f;
  greedy.max_tokens = 6;
  greedy.ignore_eos = true;
  auto e = MakeEngine();
  ASSERT_TRUE(e->Add({.id = 1, .prompt = Prompt(7, 3), .sampling = greedy}).ok());
  std::map<uint64_t, FinishReason> finish;
  auto first = Drain(*e, nullptr, &finish)[1];
  ASSERT_EQ(first.size(), 6u);
  EXPECT_EQ(finish[1], FinishReason::kLength);

  // Stopping on the third token ends the sequence there with reason "stop".
  SamplingParams stop = greedy;
  stop.stop_token_ids = {first[2]};
  ASSERT_TRUE(e->Add({.id = 2, .prompt = Prompt(7, 3), .sampling = stop}).ok());
  auto stopped = Drain(*e, nullptr, &finish)[2];
  const size_t first_hit = std::find(first.begin(), first.end(), first[2]) - first.begin();
  EXPECT_EQ(stopped.size(), first_hit + 1);
  EXPECT_EQ(finish[2], FinishReason::kStop);

  // EOS stops unless ignore_eos.
  SamplingParams eos = greedy;
  eos.ignore_eos = false;
  const_cast<ModelConfig&>(model_->config()).eos_token_ids = {first[0]};
  ASSERT_TRUE(e->Add({.id = 3, .prompt = Prompt(7, 3), .sampling = eos}).ok());
  EXPECT_EQ(Drain(*e, nullptr, &finish)[3].size(), 1u);
  EXPECT_EQ(finish[3], FinishReason::kStop);
}

TEST_F(EngineTest, BadRequestsGetClearErrors) {
  auto e = MakeEngine({.block_size = 16, .kv_cache_bytes = 1 << 20});
  SamplingParams ok;
  EXPECT_THAT(std::string(e->Add({.id = 1, .prompt = {}, .sampling = ok}).message()), HasSubstr("prompt"));
  absl::Status s = e->Add({.id = 1, .prompt = {1, 999}, .sampling = ok});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("999"));
  SamplingParams longgen;
  longgen.max_tokens = 100000;
  s = e->Add({.id = 1, .prompt = {1, 2}, .sampling = longgen});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("max_tokens"));
  SamplingParams bad;
  bad.top_p = 2.0f;
  EXPECT_THAT(std::string(e->Add({.id = 1, .prompt = {1}, .sampling = bad}).message()), HasSubstr("top_p"));
  ASSERT_TRUE(e->Add({.id = 7, .prompt = {1}, .sampling = ok}).ok());
  EXPECT_EQ(e->Add({.id = 7, .prompt = {1}, .sampling = ok}).code(), absl::StatusCode::kAlreadyExists);

  // A request that could never fit the KV cache is refused up front.
  auto small = MakeEngine({.block_size = 4, .kv_cache_bytes = 8 * 2 * 3 * 4 * 2 * 32 * 4});
  SamplingParams big;
  big.max_tokens = 100;
  EXPECT_EQ(small->Add({.id = 1, .prompt = Prompt(10, 1), .sampling = big}).code(),
            absl::StatusCode::kResourceExhausted);
}

// A request resumed elsewhere after its rank died: the tokens it had are
// recomputed as context, count against max_tokens and are not reported
// again, and a seeded stream continues after their draws, so what follows
// equals the uninterrupted run (the CPU's prefill and decode give a position
// the same bits). Greedy (no draws), plain temperature (device sampler's
// arithmetic) and top-p (host sampler).
TEST_F(EngineTest, AResumedRequestContinuesAsTheUninterruptedRunWould) {
  SamplingParams plain = Sampled(11, 12);
  plain.top_p = 1.0f;
  SamplingParams greedy = Sampled(0, 12);
  greedy.temperature = 0.0f;
  for (const SamplingParams& sp : {Sampled(7, 12), plain, greedy}) {
    auto whole = MakeEngine();
    ASSERT_TRUE(whole->Add({.id = 1, .prompt = Prompt(9, 3), .sampling = sp}).ok());
    const std::vector<int32_t> want = Drain(*whole)[1];
    ASSERT_EQ(want.size(), 12u);
    for (size_t cut : {size_t{1}, size_t{5}, size_t{11}}) {
      auto resumed = MakeEngine();
      GenerationRequest r{.id = 2, .prompt = Prompt(9, 3), .sampling = sp};
      r.resumed.assign(want.begin(), want.begin() + cut);
      ASSERT_TRUE(resumed->Add(std::move(r)).ok());
      const std::vector<int32_t> rest = Drain(*resumed)[2];
      EXPECT_EQ(rest, std::vector<int32_t>(want.begin() + cut, want.end()))
          << "cut after " << cut << " tokens, temperature " << sp.temperature;
    }
  }
}

TEST_F(EngineTest, ResumedTokensAreCheckedNamingTheField) {
  auto e = MakeEngine();
  GenerationRequest all{.id = 1, .prompt = Prompt(4, 1), .sampling = Sampled(1, 3)};
  all.resumed = {1, 2, 3};
  absl::Status s = e->Add(std::move(all));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("resumed_token_ids"));
  GenerationRequest bad{.id = 2, .prompt = Prompt(4, 1), .sampling = Sampled(1, 3)};
  bad.resumed = {100000};
  EXPECT_THAT(std::string(e->Add(std::move(bad)).message()), HasSubstr("resumed token id 100000"));
}

// An expert executor that fails the next `failures` calls: a step that
// fails (a peer died mid-step) does not happen, and its redo draws the same
// uniforms, so the tokens are an uninterrupted run's.
class FailingExperts : public ExpertExecutor {
 public:
  explicit FailingExperts(ExpertExecutor* real) : real_(real) {}
  int failures = 0;
  absl::Status Run(int layer, const float* x, int64_t tokens, const int32_t* ids,
                   const float* weights, float* out) override {
    if (failures > 0) {
      --failures;
      return absl::UnavailableError("peer lost");
    }
    return real_->Run(layer, x, tokens, ids, weights, out);
  }

 private:
  ExpertExecutor* real_;
};

TEST_F(EngineTest, AFailedStepIsRedoneWithTheSameRandomDraws) {
  SamplingParams plain = Sampled(5, 10);
  plain.top_p = 1.0f;
  auto whole = MakeEngine();
  ASSERT_TRUE(whole->Add({.id = 1, .prompt = Prompt(6, 2), .sampling = plain}).ok());
  ASSERT_TRUE(whole->Add({.id = 2, .prompt = Prompt(8, 4), .sampling = Sampled(6, 10)}).ok());
  const auto want = Drain(*whole);

  FailingExperts failing(&model_->local_experts());
  model_->set_expert_executor(&failing);
  auto e = MakeEngine();
  ASSERT_TRUE(e->Add({.id = 1, .prompt = Prompt(6, 2), .sampling = plain}).ok());
  ASSERT_TRUE(e->Add({.id = 2, .prompt = Prompt(8, 4), .sampling = Sampled(6, 10)}).ok());
  std::map<uint64_t, std::vector<int32_t>> got;
  int failed = 0;
  for (int step = 0; e->HasWork() && step < 200; ++step) {
    if (step % 3 == 1) failing.failures = 1;  // every third step fails once
    auto r = e->Step();
    if (!r.ok()) {
      ++failed;
      continue;
    }
    for (const TokenOutput& t : r->tokens) got[t.id].push_back(t.token);
  }
  model_->set_expert_executor(nullptr);
  EXPECT_GT(failed, 2);
  EXPECT_EQ(got, want);
}

}  // namespace
}  // namespace joule
