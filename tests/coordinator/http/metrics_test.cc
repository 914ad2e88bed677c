// The coordinator's metrics that are not counted per HTTP exchange: tokens
// per joule from finished requests' energy, the scheduler's state (SLO
// attainment and outcomes by tier, queues, the learned step cost model), and
// the cluster's failures and recoveries.
#include <limits>
#include <map>
#include <string>

#include "coordinator/http/cluster_metrics.h"
#include "coordinator/http/http_metrics.h"
#include "coordinator/http/scheduler_metrics.h"
#include "gtest/gtest.h"
#include "prometheus/registry.h"
#include "scheduler/fake_clock.h"

namespace joule::http {
namespace {

using scheduler::Tier;

// "name{k=v,...}" -> value of every sample of the families.
std::map<std::string, double> Values(const std::vector<prometheus::MetricFamily>& families) {
  std::map<std::string, double> out;
  for (const prometheus::MetricFamily& f : families) {
    for (const prometheus::ClientMetric& m : f.metric) {
      std::string key = f.name + "{";
      for (size_t i = 0; i < m.label.size(); ++i) {
        key += (i ? "," : "") + m.label[i].name + "=" + m.label[i].value;
      }
      key += "}";
      out[key] = f.type == prometheus::MetricType::Counter ? m.counter.value : m.gauge.value;
    }
  }
  return out;
}

TEST(HttpMetricsTest, TokensPerJouleFollowsFinishedRequestsEnergy) {
  prometheus::Registry registry;
  HttpMetrics metrics(registry);
  EXPECT_EQ(Values(registry.Collect())["joule_tokens_per_joule{tier=fast}"], 0);
  metrics.AddRequestEnergy(Tier::kFast, 2.0, 10);
  metrics.AddRequestEnergy(Tier::kFast, 3.0, 5);
  metrics.AddRequestEnergy(Tier::kBatch, 1.0, 40);
  auto v = Values(registry.Collect());
  EXPECT_DOUBLE_EQ(v["joule_tokens_per_joule{tier=fast}"], 15.0 / 5.0);
  EXPECT_DOUBLE_EQ(v["joule_tokens_per_joule{tier=batch}"], 40.0);
  EXPECT_DOUBLE_EQ(v["joule_request_energy_joules_total{tier=fast}"], 5.0);
  EXPECT_DOUBLE_EQ(v["joule_tokens_per_joule{tier=standard}"], 0);
}

TEST(SchedulerMetricsTest, AttainmentOutcomesQueuesAndTheLearnedCostModel) {
  scheduler::FakeClock clock;
  scheduler::SchedulerConfig config;
  config.policy = scheduler::PolicyKind::kPriority;
  config.slo(Tier::kFast) = {.ttft = absl::Milliseconds(100), .tpot = absl::Milliseconds(20),
                             .attainment = 0.99, .queue_cap = 1};
  auto s = scheduler::Scheduler::Create(config, &clock);
  ASSERT_TRUE(s.ok()) << s.status();
  scheduler::Scheduler& sched = **s;
  const scheduler::ClusterView one_rank{{{0, true}}};

  // Request 1 meets its targets, request 2 is too slow, request 3 is refused
  // (the queue holds one waiting fast request), request 4 waits in the queue.
  ASSERT_TRUE(sched.Submit({.id = 1, .tier = Tier::kFast, .prompt_tokens = 4, .max_tokens = 3}).ok());
  ASSERT_EQ(sched.Dispatch(one_rank).size(), 1u);
  for (int i = 0; i < 3; ++i) {
    clock.Advance(absl::Milliseconds(10));
    sched.OnTokens(1, 1);
  }
  sched.OnFinished(1);
  ASSERT_TRUE(sched.Submit({.id = 2, .tier = Tier::kFast, .prompt_tokens = 4, .max_tokens = 3}).ok());
  ASSERT_EQ(sched.Dispatch(one_rank).size(), 1u);
  for (int i = 0; i < 3; ++i) {
    clock.Advance(absl::Milliseconds(200));
    sched.OnTokens(2, 1);
  }
  sched.OnFinished(2);
  ASSERT_TRUE(sched.Submit({.id = 4, .tier = Tier::kFast, .prompt_tokens = 4, .max_tokens = 3}).ok());
  EXPECT_FALSE(sched.Submit({.id = 3, .tier = Tier::kFast, .prompt_tokens = 4, .max_tokens = 3}).ok());

  // Steps measured on rank 0: 5 ms + 0.1 ms per token, 2 J + 0.01 J per token.
  for (int i = 0; i < 64; ++i) {
    const int64_t tokens = 1 + (i % 8) * 16;
    sched.OnStep(0, {.batch_tokens = tokens,
                     .context_tokens = 0,
                     .duration = absl::Seconds(5e-3 + 1e-4 * tokens),
                     .energy_joules = 2.0 + 0.01 * tokens});
  }

  auto v = Values(SchedulerMetricFamilies(sched.Snapshot()));
  EXPECT_DOUBLE_EQ(v["joule_slo_attainment{tier=fast}"], 0.5);
  EXPECT_DOUBLE_EQ(v["joule_slo_attainment{tier=batch}"], 1.0) << "nothing finished, nothing missed";
  EXPECT_DOUBLE_EQ(v["joule_slo_attainment_target{tier=fast}"], 0.99);
  EXPECT_DOUBLE_EQ(v["joule_slo_requests_total{tier=fast,outcome=attained}"], 1);
  EXPECT_DOUBLE_EQ(v["joule_slo_requests_total{tier=fast,outcome=missed}"], 1);
  EXPECT_DOUBLE_EQ(v["joule_slo_requests_total{tier=fast,outcome=rejected}"], 1);
  EXPECT_DOUBLE_EQ(v["joule_scheduler_queued_requests{tier=fast}"] +
                       v["joule_scheduler_dispatched_requests{tier=fast}"],
                   1);
  EXPECT_NEAR(v["joule_step_cost_seconds{rank=0,term=fixed}"], 5e-3, 1e-4);
  EXPECT_NEAR(v["joule_step_cost_seconds{rank=0,term=per_batch_token}"], 1e-4, 1e-6);
  EXPECT_NEAR(v["joule_step_cost_joules{rank=0,term=fixed}"], 2.0, 0.05);
  EXPECT_NEAR(v["joule_step_cost_joules{rank=0,term=per_batch_token}"], 0.01, 1e-3);
  EXPECT_EQ(v["joule_step_cost_samples{rank=0}"], 64);
}

TEST(SchedulerMetricsTest, IpwStepCapsFollowTheLearnedModel) {
  scheduler::FakeClock clock;
  scheduler::SchedulerConfig config;  // ipw; fast TPOT 25 ms, standard 100 ms, safety 0.9
  auto s = scheduler::Scheduler::Create(config, &clock);
  ASSERT_TRUE(s.ok()) << s.status();
  scheduler::Scheduler& sched = **s;
  ASSERT_TRUE(sched.Submit({.id = 1, .tier = Tier::kBatch, .prompt_tokens = 4, .max_tokens = 3}).ok());
  clock.Advance(config.batch_max_wait);  // starved: dispatched now, so rank 0 is known
  ASSERT_EQ(sched.Dispatch({{{0, true}}}).size(), 1u);
  auto caps = [&] { return Values(SchedulerMetricFamilies(sched.Snapshot())); };
  // The prior (10 ms + 20 us per token): fast's 22.5 ms budget holds 625 tokens, over the cap.
  EXPECT_EQ(caps()["joule_scheduler_step_token_cap{rank=0,tier=fast}"], 512);
  // Learned: 5 ms + 0.1 ms per token. Fast: (22.5 - 5) / 0.1 = 175; standard: 850 -> 512.
  for (int i = 0; i < 64; ++i) {
    const int64_t tokens = 1 + (i % 8) * 16;
    sched.OnStep(0, {.batch_tokens = tokens, .duration = absl::Seconds(5e-3 + 1e-4 * tokens)});
  }
  auto v = caps();
  EXPECT_NEAR(v["joule_scheduler_step_token_cap{rank=0,tier=fast}"], 175, 1);
  EXPECT_EQ(v["joule_scheduler_step_token_cap{rank=0,tier=standard}"], 512);
  EXPECT_EQ(v["joule_scheduler_step_token_cap{rank=0,tier=batch}"], 0) << "no TPOT target";
}

TEST(ClusterMetricsTest, EpochFailuresResumesAndTheRecoveryHistogram) {
  const cluster::MembershipStats membership{
      .group_epoch = 3, .rank_failures = 2, .heartbeats_late = 4, .recovery_seconds = {0.3, 1.5}};
  const cluster::RouterStats router{.requests_resumed = 7, .resumed_tokens = 120, .parked = 1};
  const std::vector<prometheus::MetricFamily> families = ClusterMetricFamilies(membership, router, {});
  std::map<std::string, double> v = Values(families);
  EXPECT_EQ(v["joule_membership_epoch{}"], 3);
  EXPECT_EQ(v["joule_rank_failures_total{}"], 2);
  EXPECT_EQ(v["joule_heartbeat_late_total{}"], 4);
  EXPECT_EQ(v["joule_requests_resumed_total{}"], 7);
  EXPECT_EQ(v["joule_resumed_tokens_total{}"], 120);
  EXPECT_EQ(v["joule_requests_waiting_to_resume{}"], 1);
  const prometheus::MetricFamily* recovery = nullptr;
  for (const auto& f : families) {
    if (f.name == "joule_recovery_seconds") recovery = &f;
  }
  ASSERT_NE(recovery, nullptr);
  const prometheus::ClientMetric::Histogram& h = recovery->metric.at(0).histogram;
  EXPECT_EQ(h.sample_count, 2u);
  EXPECT_DOUBLE_EQ(h.sample_sum, 1.8);
  std::map<double, uint64_t> cumulative;
  for (const auto& b : h.bucket) cumulative[b.upper_bound] = b.cumulative_count;
  EXPECT_EQ(cumulative[0.25], 0u);
  EXPECT_EQ(cumulative[0.5], 1u);
  EXPECT_EQ(cumulative[1], 1u);
  EXPECT_EQ(cumulative[2], 2u);
  EXPECT_EQ(cumulative[std::numeric_limits<double>::infinity()], 2u);
}

TEST(ClusterMetricsTest, EveryRanksMeterAndTheLoadImbalance) {
  cluster::MembershipStats membership;
  membership.metered = {{.rank = 0, .energy_joules = 100, .power_watts = 20, .energy_source = "nvml"},
                        {.rank = 2, .energy_joules = 50, .power_watts = 10, .energy_source = "model"}};
  std::map<std::string, double> v = Values(ClusterMetricFamilies(membership, {}, {}));
  EXPECT_EQ(v["joule_rank_power_watts{rank=0,source=nvml}"], 20);
  EXPECT_EQ(v["joule_rank_power_watts{rank=2,source=model}"], 10);
  EXPECT_EQ(v["joule_rank_energy_joules_total{rank=0,source=nvml}"], 100);
  EXPECT_EQ(v["joule_cluster_energy_joules_total{}"], 150);
  EXPECT_EQ(v.count("joule_ep_load_imbalance{}"), 0u) << "no load yet: no sample";
  membership.ep_load_imbalance = 1.5;
  v = Values(ClusterMetricFamilies(membership, {}, {}));
  EXPECT_EQ(v["joule_ep_load_imbalance{}"], 1.5);
}

// What the scheduler plans each rank within, by rank; an older worker's 0 is
// unknown and gets no sample, not a limit of zero.
TEST(ClusterMetricsTest, EveryRanksEngineLimits) {
  const std::vector<cluster::RankInfo> ranks = {
      {.rank = 0, .state = cluster::RankState::kReady, .max_running = 7, .max_batch_tokens = 333},
      {.rank = 1, .state = cluster::RankState::kRegistered},
      {.rank = 2, .state = cluster::RankState::kReady, .max_running = 5, .max_batch_tokens = 111}};
  std::map<std::string, double> v = Values(ClusterMetricFamilies({}, {}, ranks));
  EXPECT_EQ(v["joule_rank_max_running{rank=0}"], 7);
  EXPECT_EQ(v["joule_rank_max_batch_tokens{rank=0}"], 333);
  EXPECT_EQ(v["joule_rank_max_running{rank=2}"], 5);
  EXPECT_EQ(v["joule_rank_max_batch_tokens{rank=2}"], 111);
  EXPECT_EQ(v.count("joule_rank_max_running{rank=1}"), 0u);
  EXPECT_EQ(v.count("joule_rank_max_batch_tokens{rank=1}"), 0u);
}

}  // namespace
}  // namespace joule::http
