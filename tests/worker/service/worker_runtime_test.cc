// The worker runtime as users of a cluster see it: requests on any rank get
// the tokens the single-process engine gives, cancellation frees KV blocks, a
// lost peer fails requests with a clear error within the step timeout, stops
// and placement changes take effect on every rank at the same step.
#include "worker/service/worker_runtime.h"

#include <map>
#include <thread>

#include "absl/strings/str_cat.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/worker/service/runtime_cluster.h"
#include "worker/service/convert.h"
#include "worker/service/placement_loader.h"
#include "worker/service/worker_metrics.h"

namespace joule::worker {
namespace {

using ::testing::HasSubstr;
using testing_util::Collector;
using testing_util::Greedy;
using testing_util::Prompt;
using testing_util::ReferenceTokens;
using testing_util::RuntimeCluster;

struct EpCase {
  std::string family;
  int world;
};

class RuntimeMatchesEngine : public ::testing::TestWithParam<EpCase> {};

TEST_P(RuntimeMatchesEngine, GreedyTokensOnEveryRank) {
  const std::string dir = testing::TinyModelDir(GetParam().family + "-tiny");
  const int world = GetParam().world;
  RuntimeCluster cluster(dir, world, absl::Seconds(20));
  cluster.StartAll();
  // Fewer requests than ranks for world 4: idle ranks must still serve their experts.
  const int num_requests = world == 4 ? 3 : 4;
  std::vector<std::unique_ptr<Collector>> collectors;
  std::vector<std::vector<int32_t>> prompts;
  for (int i = 0; i < num_requests; ++i) {
    prompts.push_back(Prompt(5 + 4 * i, i));
    collectors.push_back(std::make_unique<Collector>());
    const int rank = i % world;
    ASSERT_TRUE(cluster.runtime(rank)
                    .Submit(absl::StrCat("req-", i),
                            {.prompt = prompts[i], .sampling = Greedy(10 + i)},
                            collectors[i]->callbacks())
                    .ok());
  }
  for (int i = 0; i < num_requests; ++i) {
    ASSERT_TRUE(collectors[i]->WaitDone()) << "request " << i;
    const RequestOutcome outcome = collectors[i]->outcome();
    ASSERT_TRUE(outcome.status.ok()) << outcome.status;
    EXPECT_EQ(outcome.finish, FinishReason::kLength);
    EXPECT_EQ(outcome.prompt_tokens, static_cast<int>(prompts[i].size()));
    EXPECT_EQ(outcome.completion_tokens, 10 + i);
    EXPECT_EQ(collectors[i]->tokens(), ReferenceTokens(dir, prompts[i], Greedy(10 + i)))
        << "request " << i << " on rank " << i % world;
  }
  // Every rank ran the same number of lockstep rounds at some point; each
  // reports its own status.
  for (int r = 0; r < world; ++r) {
    const WorkerStatus s = cluster.runtime(r).Status();
    EXPECT_EQ(s.rank, r);
    EXPECT_TRUE(s.ready);
    EXPECT_GT(s.steps, 0u);
    EXPECT_GT(s.resident_bytes, 0);
  }
  // Tokens were routed to experts, and the counts are handed out once.
  int64_t routed = 0;
  for (int r = 0; r < world; ++r) {
    for (const auto& layer : cluster.runtime(r).TakeExpertLoad()) {
      for (int64_t n : layer) routed += n;
    }
  }
  EXPECT_GT(routed, 0);
  for (int r = 0; r < world; ++r) {
    for (const auto& layer : cluster.runtime(r).TakeExpertLoad()) {
      for (int64_t n : layer) EXPECT_EQ(n, 0);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Families, RuntimeMatchesEngine,
                         ::testing::Values(EpCase{"qwen3_moe", 2}, EpCase{"qwen3_moe", 4},
                                           EpCase{"qwen2_moe", 2}, EpCase{"mixtral", 2},
                                           EpCase{"mixtral", 4}),
                         [](const auto& info) {
                           return info.param.family + "_ep" + std::to_string(info.param.world);
                         });

TEST(WorkerRuntime, CancelFreesKvBlocks) {
  RuntimeCluster cluster(testing::TinyModelDir("qwen3_moe-tiny"), 2, absl::Seconds(20));
  cluster.StartAll();
  const int64_t total = cluster.runtime(1).Status().kv_total_blocks;
  ASSERT_GT(total, 0);
  Collector c;
  ASSERT_TRUE(cluster.runtime(1).Submit("long", {.prompt = Prompt(40, 1), .sampling = Greedy(400)},
                                        c.callbacks()).ok());
  ASSERT_TRUE(c.WaitTokens(3));
  EXPECT_LT(cluster.runtime(1).Status().kv_free_blocks, total);
  // The same id again while it runs is refused, and nothing else happens.
  Collector dup;
  EXPECT_EQ(cluster.runtime(1).Submit("long", {.prompt = Prompt(4, 2), .sampling = Greedy(4)},
                                      dup.callbacks()).code(),
            absl::StatusCode::kAlreadyExists);
  EXPECT_TRUE(cluster.runtime(1).Cancel("long"));
  ASSERT_TRUE(c.WaitDone());
  const RequestOutcome outcome = c.outcome();
  EXPECT_TRUE(outcome.status.ok()) << outcome.status;
  EXPECT_EQ(outcome.finish, FinishReason::kCancelled);
  EXPECT_LT(outcome.completion_tokens, 400);
  EXPECT_EQ(outcome.completion_tokens, static_cast<int>(c.tokens().size()));
  EXPECT_FALSE(dup.done());
  EXPECT_FALSE(cluster.runtime(1).Cancel("long"));  // no longer live
  // Blocks come back as of the next published round.
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  while (cluster.runtime(1).Status().kv_free_blocks != total && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(5));
  }
  EXPECT_EQ(cluster.runtime(1).Status().kv_free_blocks, total);
  EXPECT_EQ(cluster.runtime(1).Status().running, 0);
}

// A meter whose every read is one joule later than the previous one: each
// metered interval (a step, or the gap between steps) costs exactly 1 J.
// With instant_watts >= 0 it also has an instant power reading, as NVML does.
class TickingMeter final : public telemetry::EnergyMeter {
 public:
  explicit TickingMeter(double instant_watts = -1) : instant_watts_(instant_watts) {}
  absl::StatusOr<double> ReadPowerWatts() override {
    if (instant_watts_ < 0) return absl::UnimplementedError("no instant power");
    return instant_watts_;
  }
  absl::StatusOr<double> ReadJoules() override {
    absl::MutexLock lock(&mu_);
    return static_cast<double>(++reads_);
  }
  std::string_view source() const override { return "ticks"; }
  std::string Describe() const override { return "one joule per read"; }
  double last() const {
    absl::MutexLock lock(&mu_);
    return static_cast<double>(reads_);
  }

 private:
  const double instant_watts_;
  mutable absl::Mutex mu_;
  int64_t reads_ ABSL_GUARDED_BY(mu_) = 0;
};

TEST(WorkerRuntime, StepEnergyIsChargedToRequestsByTokenShareAndAddsUpToTheMeter) {
  TickingMeter m0(/*instant_watts=*/245.5), m1;
  RuntimeCluster cluster(testing::TinyModelDir("qwen3_moe-tiny"), 2, absl::Seconds(20),
                         testing_util::SmallEngine(), {&m0, &m1});
  cluster.StartAll();
  Collector a, b;
  // a has the longer prompt and 4 more tokens: b, submitted right after it,
  // cannot outlast it, so b never runs a step alone (with the same lengths it
  // could: a prefilled alone, then b decoded its last token alone).
  ASSERT_TRUE(cluster.runtime(0).Submit("a", {.prompt = Prompt(12, 1), .sampling = Greedy(10)},
                                        a.callbacks()).ok());
  ASSERT_TRUE(cluster.runtime(0).Submit("b", {.prompt = Prompt(3, 2), .sampling = Greedy(6)},
                                        b.callbacks()).ok());
  ASSERT_TRUE(a.WaitDone());
  ASSERT_TRUE(b.WaitDone());
  const RequestOutcome oa = a.outcome(), ob = b.outcome();
  EXPECT_EQ(oa.energy_source, "ticks");
  // Each request took part in at least its 10 or 6 steps, each worth at most 1 J.
  EXPECT_GT(oa.energy_joules, 0);
  EXPECT_GT(ob.energy_joules, 0);
  EXPECT_LE(oa.energy_joules + ob.energy_joules, 16.0 + 1e-9);
  // b shared every step it ran in with a, each split by token share: a paid
  // more (the larger share of the prefill, half of each shared decode step,
  // all of its own last steps).
  EXPECT_GT(oa.energy_joules, ob.energy_joules);
  // Past the first power window (1 s) of idle rounds, which the meter also charges.
  absl::SleepFor(absl::Milliseconds(1200));
  cluster.runtime(0).Stop("test done");
  cluster.runtime(0).Join();
  cluster.runtime(1).Join();
  const WorkerStatus s0 = cluster.runtime(0).Status();
  const WorkerStatus s1 = cluster.runtime(1).Status();
  // Rank 0's requests were charged everything attributed on rank 0.
  EXPECT_NEAR(s0.energy_attributed_joules, oa.energy_joules + ob.energy_joules, 1e-9);
  // Rank 1 served only rank 0's tokens (experts): nothing attributed there.
  EXPECT_EQ(s1.energy_attributed_joules, 0);
  EXPECT_GT(s1.energy_unattributed_joules, 0);
  for (const WorkerStatus* s : {&s0, &s1}) {
    EXPECT_EQ(s->energy_source, "ticks");
    EXPECT_NEAR(s->energy_joules, s->energy_attributed_joules + s->energy_idle_joules +
                                      s->energy_unattributed_joules, 1e-9);
    EXPECT_GT(s->energy_idle_joules, 0);
  }
  // Every interval between the meter's first and last read is in some bucket.
  EXPECT_NEAR(s0.energy_joules, m0.last() - 1, 1.0);

  // The steps rank 0 reports for the cost model: its tokens, each step's
  // whole energy (1 J here), adding up to what its requests were charged.
  const std::vector<scheduler::StepSample> steps0 = cluster.runtime(0).TakeStepSamples();
  int64_t tokens = 0;
  double joules = 0;
  for (const scheduler::StepSample& st : steps0) {
    tokens += st.batch_tokens;
    joules += st.energy_joules;
    EXPECT_DOUBLE_EQ(st.energy_joules, 1.0);
    EXPECT_GT(st.duration, absl::ZeroDuration());
  }
  EXPECT_EQ(tokens, 12 + 3 + 9 + 5);  // both prefills, then 9 and 5 decodes
  EXPECT_NEAR(joules, s0.energy_attributed_joules, 1e-9);
  EXPECT_TRUE(cluster.runtime(1).TakeStepSamples().empty()) << "rank 1 had no tokens of its own";
  EXPECT_TRUE(cluster.runtime(0).TakeStepSamples().empty()) << "each step is taken once";

  // Power over the last window, exchange counters and per-expert load.
  ModelConfig config = *LoadModelConfig(testing::TinyModelDir("qwen3_moe-tiny"));
  int moe_layers = 0;
  for (int l = 0; l < config.num_layers; ++l) moe_layers += config.IsMoeLayer(l);
  for (const WorkerStatus* s : {&s0, &s1}) {
    EXPECT_GT(s->power_watts, 0) << "rank " << s->rank;
    // The meter's own reading where it has one (rank 0's), none elsewhere.
    EXPECT_DOUBLE_EQ(s->power_instant_watts, s == &s0 ? 245.5 : -1) << "rank " << s->rank;
    EXPECT_GT(s->busy_steps, 0u);
    EXPECT_GT(s->dispatch_seconds_total + s->combine_seconds_total, 0);
  }
  // Rank 0's tokens went to rank 1's experts too; rank 1 only sent results back.
  EXPECT_GT(s0.dispatch_bytes_total, 0u);
  EXPECT_GT(s1.combine_bytes_total, 0u);
  int64_t routed = 0;
  for (const auto& layer : s0.expert_tokens_total) {
    for (int64_t n : layer) routed += n;
  }
  EXPECT_EQ(routed, tokens * config.num_experts_per_tok * moe_layers);
  for (const auto& layer : s1.expert_tokens_total) {
    for (int64_t n : layer) EXPECT_EQ(n, 0);
  }
}

TEST(WorkerRuntime, BadRequestGetsClearErrorAndOthersRun) {
  RuntimeCluster cluster(testing::TinyModelDir("qwen3_moe-tiny"), 2, absl::Seconds(20));
  cluster.StartAll();
  Collector bad, good;
  ASSERT_TRUE(cluster.runtime(0).Submit("bad", {.prompt = {1, 2, 100000}, .sampling = Greedy(4)},
                                        bad.callbacks()).ok());
  ASSERT_TRUE(cluster.runtime(0).Submit("good", {.prompt = Prompt(6, 3), .sampling = Greedy(4)},
                                        good.callbacks()).ok());
  ASSERT_TRUE(bad.WaitDone());
  EXPECT_EQ(bad.outcome().status.code(), absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(good.WaitDone());
  EXPECT_TRUE(good.outcome().status.ok()) << good.outcome().status;
  EXPECT_EQ(good.tokens().size(), 4u);
}

TEST(WorkerRuntime, KilledPeerFailsRequestsWithinStepTimeout) {
  const absl::Duration timeout = absl::Seconds(2);
  RuntimeCluster cluster(testing::TinyModelDir("qwen3_moe-tiny"), 2, timeout);
  cluster.StartAll();
  Collector c;
  ASSERT_TRUE(cluster.runtime(0).Submit("victim", {.prompt = Prompt(10, 4), .sampling = Greedy(400)},
                                        c.callbacks()).ok());
  ASSERT_TRUE(c.WaitTokens(2));
  const absl::Time killed = absl::Now();
  cluster.group().Kill(1);  // as if rank 1's process crashed
  ASSERT_TRUE(c.WaitDone(timeout + absl::Seconds(5)));
  EXPECT_LE(absl::Now() - killed, timeout + absl::Seconds(1));
  const RequestOutcome outcome = c.outcome();
  EXPECT_EQ(outcome.status.code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(std::string(outcome.status.message()), HasSubstr("expert-parallel step failed"));
  EXPECT_GT(outcome.completion_tokens, 0);
  ASSERT_TRUE(cluster.runtime(0).WaitForExit(timeout + absl::Seconds(5)));
  EXPECT_EQ(cluster.runtime(0).exit_status().code(), absl::StatusCode::kUnavailable);
  // The rank stops serving, and says why.
  const WorkerStatus s = cluster.runtime(0).Status();
  EXPECT_FALSE(s.ready);
  EXPECT_THAT(s.error, HasSubstr("expert-parallel step failed"));
  EXPECT_EQ(s.kv_free_blocks, s.kv_total_blocks);
  Collector late;
  const absl::Status refused =
      cluster.runtime(0).Submit("late", {.prompt = Prompt(3, 5), .sampling = Greedy(2)}, late.callbacks());
  EXPECT_EQ(refused.code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(std::string(refused.message()), HasSubstr("expert-parallel step failed"));
}

TEST(WorkerRuntime, SilentPeerTimesOutWithinStepTimeout) {
  // Rank 1 never runs its step loop (a hung process): rank 0's first
  // collective gives up after the step timeout instead of hanging.
  const absl::Duration timeout = absl::Milliseconds(500);
  RuntimeCluster cluster(testing::TinyModelDir("qwen3_moe-tiny"), 2, timeout);
  Collector c;
  cluster.runtime(0).Start();
  const absl::Time start = absl::Now();
  ASSERT_TRUE(cluster.runtime(0).Submit("r", {.prompt = Prompt(8, 6), .sampling = Greedy(8)},
                                        c.callbacks()).ok());
  ASSERT_TRUE(c.WaitDone(timeout + absl::Seconds(5)));
  EXPECT_LE(absl::Now() - start, timeout + absl::Seconds(1));
  EXPECT_EQ(c.outcome().status.code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(std::string(c.outcome().status.message()), HasSubstr("expert-parallel step failed"));
}

TEST(WorkerRuntime, StopOnOneRankStopsEveryRankAtTheSameRound) {
  RuntimeCluster cluster(testing::TinyModelDir("qwen3_moe-tiny"), 2, absl::Seconds(20));
  cluster.StartAll();
  Collector c;
  ASSERT_TRUE(cluster.runtime(1).Submit("r", {.prompt = Prompt(8, 7), .sampling = Greedy(400)},
                                        c.callbacks()).ok());
  ASSERT_TRUE(c.WaitTokens(2));
  cluster.runtime(0).Stop("SIGTERM");
  // No timeout involved: both loops end promptly.
  ASSERT_TRUE(cluster.runtime(0).WaitForExit(absl::Seconds(5)));
  ASSERT_TRUE(cluster.runtime(1).WaitForExit(absl::Seconds(5)));
  ASSERT_TRUE(c.WaitDone(absl::Seconds(1)));
  EXPECT_EQ(c.outcome().status.code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(std::string(c.outcome().status.message()),
              HasSubstr("worker shutting down: rank 0 is shutting down"));
  EXPECT_TRUE(cluster.runtime(0).exit_status().ok()) << cluster.runtime(0).exit_status();
  EXPECT_EQ(cluster.runtime(1).exit_status().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(cluster.runtime(0).Status().steps, cluster.runtime(1).Status().steps);
}

TEST(WorkerRuntime, PlacementChangeAppliedBetweenStepsWithoutDroppingRequests) {
  const std::string dir = testing::TinyModelDir("qwen3_moe-tiny");
  RuntimeCluster cluster(dir, 2, absl::Seconds(20));
  auto config = LoadModelConfig(dir);
  ASSERT_TRUE(config.ok());
  // Epoch 2: every expert on both ranks (each rank must load the other half);
  // epoch 3: back to contiguous (nothing to load, SetPlacement).
  Placement replicated = cluster.placement();
  for (auto& layer : replicated.replicas) {
    for (auto& ranks : layer) ranks = {0, 1};
  }
  std::vector<std::unique_ptr<PlacementLoader>> loaders;
  for (int r = 0; r < 2; ++r) {
    loaders.push_back(std::make_unique<PlacementLoader>(dir, *config, r, 2, cluster.placement()));
  }
  cluster.StartAll();
  std::vector<std::unique_ptr<Collector>> cs;
  std::vector<std::vector<int32_t>> prompts;
  for (int i = 0; i < 2; ++i) {
    prompts.push_back(Prompt(9 + i, 10 + i));
    cs.push_back(std::make_unique<Collector>());
    ASSERT_TRUE(cluster.runtime(i).Submit(absl::StrCat("p", i),
                                          {.prompt = prompts[i], .sampling = Greedy(200)},
                                          cs[i]->callbacks()).ok());
  }
  ASSERT_TRUE(cs[0]->WaitTokens(2));
  {
    auto p0 = loaders[0]->Prepare(PlacementToProto(replicated, 2));
    ASSERT_TRUE(p0.ok()) << p0.status();
    EXPECT_NE(p0->weights, nullptr);  // rank 0 had to load experts
    cluster.runtime(0).OfferPlacement(*std::move(p0));
  }
  // Only rank 0 has it: nobody applies it yet.
  absl::SleepFor(absl::Milliseconds(50));
  EXPECT_EQ(cluster.runtime(0).Status().placement_epoch, 1u);
  {
    auto p1 = loaders[1]->Prepare(PlacementToProto(replicated, 2));
    ASSERT_TRUE(p1.ok()) << p1.status();
    cluster.runtime(1).OfferPlacement(*std::move(p1));
  }
  const absl::Time deadline = absl::Now() + absl::Seconds(20);
  while ((cluster.runtime(0).Status().placement_epoch != 2 ||
          cluster.runtime(1).Status().placement_epoch != 2) && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(2));
  }
  EXPECT_EQ(cluster.runtime(0).Status().placement_epoch, 2u);
  EXPECT_EQ(cluster.runtime(1).Status().placement_epoch, 2u);
  for (int r = 0; r < 2; ++r) {
    auto p = loaders[r]->Prepare(PlacementToProto(cluster.placement(), 3));
    ASSERT_TRUE(p.ok()) << p.status();
    EXPECT_EQ(p->weights, nullptr);  // already holds every expert it needs
    cluster.runtime(r).OfferPlacement(*std::move(p));
  }
  for (int i = 0; i < 2; ++i) {
    ASSERT_TRUE(cs[i]->WaitDone());
    ASSERT_TRUE(cs[i]->outcome().status.ok()) << cs[i]->outcome().status;
    EXPECT_EQ(cs[i]->tokens(), ReferenceTokens(dir, prompts[i], Greedy(200))) << "request " << i;
  }
  const absl::Time deadline3 = absl::Now() + absl::Seconds(20);
  while ((cluster.runtime(0).Status().placement_epoch != 3 ||
          cluster.runtime(1).Status().placement_epoch != 3) && absl::Now() < deadline3) {
    absl::SleepFor(absl::Milliseconds(2));
  }
  EXPECT_EQ(cluster.runtime(0).Status().placement_epoch, 3u);
  EXPECT_EQ(cluster.runtime(1).Status().placement_epoch, 3u);
  // And it still generates the same tokens.
  Collector after;
  ASSERT_TRUE(cluster.runtime(1).Submit("after", {.prompt = prompts[0], .sampling = Greedy(8)},
                                        after.callbacks()).ok());
  ASSERT_TRUE(after.WaitDone());
  EXPECT_EQ(after.tokens(), ReferenceTokens(dir, prompts[0], Greedy(8)));
}

// A drained rank leaves without a word to its group: the others are not
// stopped by it ("rank 0 is shutting down") but keep their requests and wait
// for the group that re-forms without it.
TEST(WorkerRuntime, ALeavingRankDoesNotStopTheOthers) {
  const std::string dir = testing::TinyModelDir("qwen3_moe-tiny");
  RuntimeCluster cluster(dir, 2, absl::Seconds(1), testing_util::SmallEngine(), {},
                         {.regroup_timeout = absl::Seconds(20)});
  cluster.StartAll();
  Collector c;
  ASSERT_TRUE(cluster.runtime(1).Submit("kept", {.prompt = Prompt(8, 7), .sampling = Greedy(400)},
                                        c.callbacks()).ok());
  ASSERT_TRUE(c.WaitTokens(2));
  cluster.runtime(0).Leave("drained (joule-cli drain)");
  ASSERT_TRUE(cluster.runtime(0).WaitForExit(absl::Seconds(5)));
  EXPECT_TRUE(cluster.runtime(0).exit_status().ok()) << cluster.runtime(0).exit_status();
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  while (!cluster.runtime(1).AwaitingGroup() && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(5));
  }
  EXPECT_TRUE(cluster.runtime(1).AwaitingGroup()) << "rank 1 stopped instead of waiting";
  EXPECT_FALSE(c.WaitDone(absl::Milliseconds(1))) << "its request is kept for the new group";
  // Ends the request while its collector lives (the cluster outlives it).
  cluster.runtime(1).Stop("test over");
  ASSERT_TRUE(c.WaitDone());
}

// A placement that gives new experts to one rank only: that rank reloads
// its weights into a new executor while the other keeps its weights. The
// executors map their shared windows collectively, so both must start
// afresh at the same round, or the new one's mapping meets the other's next
// exchange.
TEST(WorkerRuntime, APlacementThatOneRankReloadsForKeepsEveryRankInStep) {
  const std::string dir = testing::TinyModelDir("qwen3_moe-tiny");
  // BF16: rows through the in-process shared windows (tokens then need not
  // be the F32 reference's; every request must complete).
  RuntimeCluster cluster(dir, 2, absl::Seconds(5), testing_util::SmallEngine(), {}, RuntimeOptions(),
                         ep::PayloadType::kBF16);
  auto config = LoadModelConfig(dir);
  ASSERT_TRUE(config.ok());
  Placement wider = cluster.placement();  // rank 0 also holds every expert of rank 1
  for (auto& layer : wider.replicas) {
    for (auto& ranks : layer) {
      if (ranks == std::vector<int32_t>{1}) ranks = {0, 1};
    }
  }
  cluster.StartAll();
  const std::vector<int32_t> prompt = Prompt(9, 10);
  Collector before;
  ASSERT_TRUE(cluster.runtime(1).Submit("before", {.prompt = prompt, .sampling = Greedy(200)},
                                        before.callbacks()).ok());
  ASSERT_TRUE(before.WaitTokens(2));
  for (int r = 0; r < 2; ++r) {
    PlacementLoader loader(dir, *config, r, 2, cluster.placement());
    auto p = loader.Prepare(PlacementToProto(wider, 2));
    ASSERT_TRUE(p.ok()) << p.status();
    EXPECT_EQ(p->weights != nullptr, r == 0) << "only rank 0 loads experts";
    cluster.runtime(r).OfferPlacement(*std::move(p));
  }
  ASSERT_TRUE(before.WaitDone());
  ASSERT_TRUE(before.outcome().status.ok()) << before.outcome().status;
  EXPECT_EQ(before.tokens().size(), 200u);
  const absl::Time deadline = absl::Now() + absl::Seconds(20);
  while ((cluster.runtime(0).Status().placement_epoch != 2 ||
          cluster.runtime(1).Status().placement_epoch != 2) && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(2));
  }
  for (int r = 0; r < 2; ++r) EXPECT_EQ(cluster.runtime(r).Status().placement_epoch, 2u);
  for (int r = 0; r < 2; ++r) {
    Collector after;
    ASSERT_TRUE(cluster.runtime(r).Submit("after", {.prompt = prompt, .sampling = Greedy(8)},
                                          after.callbacks()).ok());
    ASSERT_TRUE(after.WaitDone());
    ASSERT_TRUE(after.outcome().status.ok()) << "rank " << r << ": " << after.outcome().status;
    EXPECT_EQ(after.tokens().size(), 8u);
  }
}

// Ranks 0 and 1 of a 3-rank cluster, after rank 2 died, in a new two-rank
// group: what the worker process does on the coordinator's group update.
class Regrouped {
 public:
  explicit Regrouped(RuntimeCluster* cluster) : cluster_(cluster) {
    auto config = LoadModelConfig(cluster->model_dir());
    EXPECT_TRUE(config.ok());
    config_ = *config;
    for (int r = 0; r < 2; ++r) {
      loaders_.push_back(std::make_unique<PlacementLoader>(cluster->model_dir(), config_, r, 3,
                                                           cluster->placement()));
    }
  }

  // Kills rank 2 and interrupts the survivors' transports; true once both wait for a group.
  bool KillRankTwo(absl::Duration within) {
    const absl::Time killed = absl::Now();
    cluster_->group().Kill(2);
    for (int r = 0; r < 2; ++r) cluster_->rank(r).transport->Interrupt("group epoch 2: rank 2 died");
    for (int r = 0; r < 2; ++r) {
      while (!cluster_->runtime(r).AwaitingGroup() && absl::Now() - killed < within) {
        absl::SleepFor(absl::Milliseconds(1));
      }
      if (!cluster_->runtime(r).AwaitingGroup()) return false;
    }
    return true;
  }

  // Installs the two-rank group (epoch 2) on ranks 0 and 1, each loading rank 2's experts it gets.
  void Install() {
    next_ = std::make_unique<ep::InProcessGroup>(2, ep::TransportOptions{.timeout = absl::Seconds(10)});
    auto two = ContiguousPlacement(2, config_.num_layers, config_.num_experts);
    ASSERT_TRUE(two.ok());
    for (int l = 0; l < config_.num_layers; ++l) {
      if (!config_.IsMoeLayer(l)) two->replicas[l].clear();
    }
    for (int r = 0; r < 2; ++r) {
      transports_.push_back(next_->Rank(r));
      loaders_[r]->Regroup(r, 2);
      auto prepared = loaders_[r]->Prepare(PlacementToProto(*two, 2));
      ASSERT_TRUE(prepared.ok()) << prepared.status();
      EXPECT_NE(prepared->weights, nullptr) << "rank " << r << " must load some of rank 2's experts";
      ASSERT_TRUE(cluster_->runtime(r)
                      .InstallGroup({.epoch = 2,
                                     .transport = transports_[r].get(),
                                     .placement = *std::move(prepared)},
                                    absl::Seconds(10))
                      .ok());
    }
  }

 private:
  RuntimeCluster* const cluster_;
  ModelConfig config_;
  std::vector<std::unique_ptr<PlacementLoader>> loaders_;
  std::unique_ptr<ep::InProcessGroup> next_;
  std::vector<std::unique_ptr<ep::Transport>> transports_;
};

// Rank 2 of 3 dies: the survivors keep their sequences while the group
// re-forms, join the new two-rank group (loading the experts rank 2 held) and
// finish every request with the single-process engine's tokens.
TEST(WorkerRuntime, SurvivorsOfADeadPeerKeepTheirRequestsThroughANewGroup) {
  const std::string dir = testing::TinyModelDir("qwen3_moe-tiny");
  const absl::Duration timeout = absl::Seconds(10);
  std::unique_ptr<Regrouped> regrouped;  // before the cluster: its transports outlive the runtimes
  RuntimeCluster cluster(dir, 3, timeout, testing_util::SmallEngine(), {},
                         {.regroup_timeout = absl::Seconds(20)});
  regrouped = std::make_unique<Regrouped>(&cluster);
  cluster.StartAll();
  std::vector<std::unique_ptr<Collector>> cs;
  std::vector<std::vector<int32_t>> prompts;
  for (int i = 0; i < 2; ++i) {
    prompts.push_back(Prompt(6 + i, 20 + i));
    cs.push_back(std::make_unique<Collector>());
    ASSERT_TRUE(cluster.runtime(i).Submit(absl::StrCat("s", i),
                                          {.prompt = prompts[i], .sampling = Greedy(60)},
                                          cs[i]->callbacks()).ok());
  }
  ASSERT_TRUE(cs[0]->WaitTokens(3));
  ASSERT_TRUE(cs[1]->WaitTokens(3));
  ASSERT_TRUE(regrouped->KillRankTwo(absl::Seconds(5)))
      << "the interrupt, not the step timeout, ends the step";
  EXPECT_FALSE(cs[0]->done());
  EXPECT_FALSE(cs[1]->done());
  regrouped->Install();
  for (int i = 0; i < 2; ++i) {
    ASSERT_TRUE(cs[i]->WaitDone());
    ASSERT_TRUE(cs[i]->outcome().status.ok()) << cs[i]->outcome().status;
    EXPECT_EQ(cs[i]->tokens(), ReferenceTokens(dir, prompts[i], Greedy(60))) << "request " << i;
  }
  const WorkerStatus s = cluster.runtime(0).Status();
  EXPECT_EQ(s.group_epoch, 2u);
  EXPECT_EQ(s.regroups, 1u);
  EXPECT_TRUE(s.ready);
}

// The same when the failure hits the control all-gather (every round has one
// here, and idle ranks wait in it): the ranks start the new group's rounds
// together and serve a new request.
TEST(WorkerRuntime, AFailedControlRoundAlsoWaitsForTheNewGroup) {
  const std::string dir = testing::TinyModelDir("qwen3_moe-tiny");
  std::unique_ptr<Regrouped> regrouped;
  RuntimeCluster cluster(dir, 3, absl::Seconds(10), testing_util::SmallEngine(), {},
                         {.control_interval = 1, .regroup_timeout = absl::Seconds(20)});
  regrouped = std::make_unique<Regrouped>(&cluster);
  cluster.StartAll();
  absl::SleepFor(absl::Milliseconds(50));  // idle rounds
  ASSERT_TRUE(regrouped->KillRankTwo(absl::Seconds(5)));
  regrouped->Install();
  Collector c;
  const std::vector<int32_t> prompt = Prompt(5, 31);
  ASSERT_TRUE(cluster.runtime(1).Submit("after", {.prompt = prompt, .sampling = Greedy(12)},
                                        c.callbacks()).ok());
  ASSERT_TRUE(c.WaitDone());
  ASSERT_TRUE(c.outcome().status.ok()) << c.outcome().status;
  EXPECT_EQ(c.tokens(), ReferenceTokens(dir, prompt, Greedy(12)));
  EXPECT_FALSE(cluster.runtime(0).WaitForExit(absl::ZeroDuration())) << "rank 0 must still serve";
}

// Two requests with one long prompt on a rank of a 2-rank cluster: the
// second reports the prompt's cached full blocks, the counters and the
// metrics say so, and both get the tokens a rank without prefix caching gives.
TEST(WorkerRuntime, ASecondRequestWithTheSamePromptReportsItsCachedTokens) {
  const std::string dir = testing::TinyModelDir("qwen3_moe-tiny");
  const std::vector<int32_t> prompt = Prompt(70, 3);  // 4 full blocks of 16, and 6 tokens
  std::map<bool, std::vector<RequestOutcome>> outcomes;
  std::map<bool, std::vector<std::vector<int32_t>>> tokens;
  std::map<bool, WorkerStatus> status;
  for (bool on : {false, true}) {
    EngineOptions engine = testing_util::SmallEngine();
    engine.prefix_caching = on;
    RuntimeCluster cluster(dir, 2, absl::Seconds(20), engine);
    cluster.StartAll();
    for (int i = 0; i < 2; ++i) {
      Collector c;
      ASSERT_TRUE(cluster.runtime(0)
                      .Submit(absl::StrCat("shared-", i), {.prompt = prompt, .sampling = Greedy(8)},
                              c.callbacks())
                      .ok());
      ASSERT_TRUE(c.WaitDone());
      ASSERT_TRUE(c.outcome().status.ok()) << c.outcome().status;
      outcomes[on].push_back(c.outcome());
      tokens[on].push_back(c.tokens());
    }
    status[on] = cluster.runtime(0).Status();
  }
  EXPECT_EQ(tokens[true], tokens[false]);
  EXPECT_EQ(tokens[true][0], tokens[true][1]);
  EXPECT_EQ(outcomes[true][0].cached_tokens, 0);
  EXPECT_EQ(outcomes[true][1].cached_tokens, 64);
  EXPECT_EQ(outcomes[false][1].cached_tokens, 0);
  EXPECT_EQ(status[true].prefix_cache_queries_total, 2u * 70);
  EXPECT_EQ(status[true].prefix_cache_hits_total, 64u);
  EXPECT_EQ(status[true].prompt_tokens_total, 70u + 6);
  EXPECT_GE(status[true].prefix_cache_blocks, 4);
  EXPECT_EQ(status[false].prefix_cache_hits_total, 0u);
  EXPECT_EQ(status[false].prefix_cache_blocks, 0);
  EXPECT_EQ(status[false].prompt_tokens_total, 2u * 70);
  std::map<std::string, double> m;
  for (const prometheus::MetricFamily& f : WorkerMetricFamilies(status[true])) {
    m[f.name] = f.type == prometheus::MetricType::Counter ? f.metric[0].counter.value
                                                           : f.metric[0].gauge.value;
  }
  EXPECT_EQ(m["joule_prefix_cache_queries_total"], 140);
  EXPECT_EQ(m["joule_prefix_cache_hits_total"], 64);
  EXPECT_EQ(m["joule_prefix_cache_blocks"], status[true].prefix_cache_blocks);
}

}  // namespace
}  // namespace joule::worker
