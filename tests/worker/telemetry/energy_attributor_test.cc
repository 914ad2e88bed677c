#include "worker/telemetry/energy_attributor.h"

#include <map>
#include <random>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "worker/telemetry/fake_energy_meter.h"

namespace joule::telemetry {
namespace {

using ::testing::DoubleNear;

TEST(EnergyAttributorTest, StepEnergyGoesByTokenShareAndGapsAreIdle) {
  FakeEnergyMeter meter;
  EnergyAttributor a(&meter);
  meter.Add(100);  // before the first read: not this attributor's
  ASSERT_TRUE(a.BeginStep().ok());
  meter.Add(12);   // a step: request 1 prefills 30 tokens, request 2 decodes 1, request 3 5
  ASSERT_TRUE(a.EndStep({{1, 30}, {2, 1}, {3, 5}}).ok());
  meter.Add(4);    // waiting for work
  ASSERT_TRUE(a.BeginStep().ok());
  meter.Add(2);    // decode step, 1 token each
  ASSERT_TRUE(a.EndStep({{1, 1}, {2, 1}}).ok());

  EXPECT_DOUBLE_EQ(a.PeekRequestJoules(1), 12.0 * 30 / 36 + 1);
  EXPECT_DOUBLE_EQ(a.PeekRequestJoules(2), 12.0 * 1 / 36 + 1);
  EXPECT_DOUBLE_EQ(a.TakeRequestJoules(3), 12.0 * 5 / 36);
  EXPECT_EQ(a.TakeRequestJoules(3), 0);  // taken once
  const EnergyAttributor::Totals t = a.totals();
  EXPECT_DOUBLE_EQ(t.attributed_joules, 14);
  EXPECT_DOUBLE_EQ(t.idle_joules, 4);
  EXPECT_DOUBLE_EQ(t.unattributed_joules, 0);
  EXPECT_EQ(t.steps, 2);
  EXPECT_EQ(t.tokens, 38);
}

TEST(EnergyAttributorTest, AStepWithoutLocalTokensIsUnattributed) {
  FakeEnergyMeter meter;
  EnergyAttributor a(&meter);
  ASSERT_TRUE(a.BeginStep().ok());
  meter.Add(3);  // this rank ran experts for other ranks only
  ASSERT_TRUE(a.EndStep({}).ok());
  EXPECT_DOUBLE_EQ(a.totals().unattributed_joules, 3);
  EXPECT_DOUBLE_EQ(a.totals().attributed_joules, 0);
}

TEST(EnergyAttributorTest, FailedReadsLoseTheirIntervalButNeverCorruptTotals) {
  FakeEnergyMeter meter;
  EnergyAttributor a(&meter);
  ASSERT_TRUE(a.BeginStep().ok());
  meter.Add(5);
  meter.FailReads(absl::UnavailableError("driver gone"));
  EXPECT_FALSE(a.EndStep({{1, 1}}).ok());
  meter.FailReads(absl::OkStatus());
  EXPECT_EQ(a.EndStep({{1, 1}}).code(), absl::StatusCode::kFailedPrecondition);
  meter.Add(7);  // unknown interval: not idle, not attributed
  ASSERT_TRUE(a.BeginStep().ok());
  meter.Add(2);
  ASSERT_TRUE(a.EndStep({{1, 1}}).ok());
  EXPECT_DOUBLE_EQ(a.PeekRequestJoules(1), 2);
  EXPECT_DOUBLE_EQ(a.totals().idle_joules, 0);
  EXPECT_EQ(a.totals().failed_reads, 1);
}

TEST(EnergyAttributorTest, RandomRunConservesEnergyAndChargesByTokens) {
  std::mt19937_64 rng(20240611);
  std::uniform_real_distribution<double> joules(0.0, 50.0);
  std::uniform_int_distribution<int> nreq(0, 6), ntok(0, 64), id(1, 40);
  FakeEnergyMeter meter;
  EnergyAttributor a(&meter);
  // Independent bookkeeping: per request, its share of each step it was in.
  std::map<uint64_t, double> expected;
  std::map<uint64_t, int64_t> tokens_of;
  double metered = 0, idle = 0;
  for (int step = 0; step < 2000; ++step) {
    if (step > 0) {
      const double gap = (rng() % 3 == 0) ? joules(rng) : 0;
      meter.Add(gap);
      idle += gap;
      metered += gap;
    }
    ASSERT_TRUE(a.BeginStep().ok());
    std::map<uint64_t, int64_t> in_step;
    for (int i = nreq(rng); i > 0; --i) in_step[id(rng)] += ntok(rng);
    std::vector<StepTokens> tokens;
    int64_t total = 0;
    for (auto [r, n] : in_step) {
      tokens.push_back({r, n});
      total += n;
    }
    const double e = joules(rng);
    meter.Add(e);
    metered += e;
    for (auto [r, n] : in_step) {
      if (total > 0) expected[r] += e * n / total;
      tokens_of[r] += n;
    }
    ASSERT_TRUE(a.EndStep(tokens).ok());
  }
  const EnergyAttributor::Totals t = a.totals();
  EXPECT_THAT(t.total_joules(), DoubleNear(metered, 1e-6));
  EXPECT_THAT(t.idle_joules, DoubleNear(idle, 1e-6));
  double attributed = 0;
  for (auto [r, j] : expected) {
    EXPECT_THAT(a.PeekRequestJoules(r), DoubleNear(j, 1e-6)) << "request " << r;
    attributed += a.TakeRequestJoules(r);
  }
  EXPECT_THAT(attributed + t.idle_joules + t.unattributed_joules, DoubleNear(metered, 1e-6));
  EXPECT_GT(t.unattributed_joules, 0);  // the run had steps with no tokens
}

TEST(SplitByTokensTest, ShareIsProportionalToTokens) {
  absl::flat_hash_map<uint64_t, double> out;
  EXPECT_DOUBLE_EQ(SplitByTokens(10, {{7, 3}, {8, 1}, {9, 0}, {10, -2}}, &out), 10);
  EXPECT_DOUBLE_EQ(out[7], 7.5);
  EXPECT_DOUBLE_EQ(out[8], 2.5);
  EXPECT_FALSE(out.contains(10));
  EXPECT_EQ(SplitByTokens(10, {{9, 0}}, &out), 0);
}

}  // namespace
}  // namespace joule::telemetry
