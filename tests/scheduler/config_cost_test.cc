#include <random>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "scheduler/config.h"
#include "scheduler/cost_model.h"

namespace joule::scheduler {
namespace {

using ::testing::HasSubstr;

TEST(SchedulerConfig, EmptyObjectGivesTheDocumentedDefaults) {
  absl::StatusOr<SchedulerConfig> c = ParseSchedulerConfig("{}");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->policy, PolicyKind::kIpw);
  EXPECT_EQ(c->slo(Tier::kFast).tpot, absl::Milliseconds(25));
  EXPECT_EQ(c->slo(Tier::kFast).ttft, absl::Milliseconds(500));
  EXPECT_EQ(c->slo(Tier::kStandard).tpot, absl::Milliseconds(100));
  EXPECT_EQ(c->slo(Tier::kBatch).tpot, absl::ZeroDuration());
  EXPECT_EQ(c->batch_max_wait, absl::Seconds(30));
  EXPECT_THAT(DescribeSchedulerConfig(*c), HasSubstr("tiers.fast: ttft_ms=500 tpot_ms=25"));
}

TEST(SchedulerConfig, OverridesFromJson) {
  absl::StatusOr<SchedulerConfig> c = ParseSchedulerConfig(R"({
    "policy": "priority", "lockstep": false, "max_batch_tokens": 64, "batch_max_wait_ms": 5000,
    "tiers": {"fast": {"tpot_ms": 40, "attainment": 0.9, "queue_cap": 3}},
    "ipw": {"safety": 0.8, "valley_hold_ms": 100, "pace": 0.5, "batch_token_interval_ms": 300},
    "calibration": [{"rank": 1, "batch_tokens": 8, "context_tokens": 100,
                     "duration_ms": 5.5, "energy_joules": 1.25}]})");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->policy, PolicyKind::kPriority);
  EXPECT_FALSE(c->lockstep);
  EXPECT_EQ(c->max_batch_tokens, 64);
  EXPECT_EQ(c->batch_max_wait, absl::Seconds(5));
  EXPECT_EQ(c->slo(Tier::kFast).tpot, absl::Milliseconds(40));
  EXPECT_EQ(c->slo(Tier::kFast).ttft, absl::Milliseconds(500));  // untouched default
  EXPECT_DOUBLE_EQ(c->slo(Tier::kFast).attainment, 0.9);
  EXPECT_EQ(c->slo(Tier::kFast).queue_cap, 3);
  EXPECT_DOUBLE_EQ(c->ipw.safety, 0.8);
  EXPECT_EQ(c->ipw.valley_hold, absl::Milliseconds(100));
  EXPECT_DOUBLE_EQ(c->ipw.pace, 0.5);
  EXPECT_EQ(c->ipw.batch_token_interval, absl::Milliseconds(300));
  ASSERT_EQ(c->calibration.size(), 1u);
  EXPECT_EQ(c->calibration[0].rank, 1);
  EXPECT_EQ(c->calibration[0].sample.batch_tokens, 8);
  EXPECT_EQ(c->calibration[0].sample.duration, absl::Microseconds(5500));
}

TEST(SchedulerConfig, ErrorsNameTheField) {
  struct Case {
    const char* json;
    const char* field;
  };
  for (const Case& c : std::initializer_list<Case>{
           {R"({"policy": "random"})", "policy"},
           {R"({"tiers": {"fast": {"tpot_ms": "fast"}}})", "tiers.fast.tpot_ms"},
           {R"({"tiers": {"fast": {"tpot_ms": -1}}})", "tiers.fast.tpot_ms"},
           {R"({"tiers": {"gold": {}}})", "tiers.gold"},
           {R"({"tiers": {"batch": {"attainment": 1.5}}})", "tiers.batch.attainment"},
           {R"({"max_batch_tokens": 0})", "max_batch_tokens"},
           {R"({"max_running": 2.5})", "max_running"},
           {R"({"max_batch_token": 5})", "max_batch_token"},
           {R"({"ipw": {"safety": 0}})", "ipw.safety"},
           {R"({"ipw": {"pace": 1.5}})", "ipw.pace"},
           {R"({"ipw": {"batch_token_interval_ms": -1}})", "ipw.batch_token_interval_ms"},
           {R"({"calibration": [{"batch_tokens": 4, "energy_joules": 1}]})",
            "calibration[0].duration_ms"},
       }) {
    absl::StatusOr<SchedulerConfig> r = ParseSchedulerConfig(c.json);
    ASSERT_FALSE(r.ok()) << c.json;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(r.status().message(), HasSubstr(c.field)) << c.json;
  }
  EXPECT_THAT(ParseSchedulerConfig("{not json").status().message(), HasSubstr("not valid JSON"));
}

// Synthetic steps: time = 8 ms + 30 us/token + 5 ns/context token, energy =
// 3 J + 12 mJ/token + 2 uJ/context token, each with 2% noise.
std::vector<StepSample> Synthetic(int n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  auto uniform = [&] { return static_cast<double>(rng() >> 11) * 0x1.0p-53; };
  std::vector<StepSample> out;
  for (int i = 0; i < n; ++i) {
    const int64_t tokens = 1 + static_cast<int64_t>(uniform() * 511);
    const int64_t context = static_cast<int64_t>(uniform() * 200000);
    const double noise_t = 1 + 0.02 * (2 * uniform() - 1);
    const double noise_e = 1 + 0.02 * (2 * uniform() - 1);
    const double t = (8e-3 + 30e-6 * tokens + 5e-9 * context) * noise_t;
    const double e = (3.0 + 12e-3 * tokens + 2e-6 * context) * noise_e;
    out.push_back({tokens, context, absl::Seconds(t), e});
  }
  return out;
}

TEST(StepCostModel, RecoversCoefficientsFromNoisySteps) {
  StepCostModel model;
  model.Calibrate(0, Synthetic(2000, 1));
  const StepCostCoefficients c = model.Coefficients(0);
  EXPECT_NEAR(c.time[0], 8e-3, 0.4e-3);
  EXPECT_NEAR(c.time[1], 30e-6, 1.5e-6);
  EXPECT_NEAR(c.time[2], 5e-9, 0.5e-9);
  EXPECT_NEAR(c.energy[0], 3.0, 0.15);
  EXPECT_NEAR(c.energy[1], 12e-3, 0.6e-3);
  EXPECT_NEAR(c.energy[2], 2e-6, 0.2e-6);
  const StepCost p = model.Predict(0, 256, 100000);
  EXPECT_NEAR(p.seconds, 8e-3 + 30e-6 * 256 + 5e-9 * 100000, 0.5e-3);
}

TEST(StepCostModel, FollowsDriftWithForgetting) {
  StepCostModel model;
  model.Calibrate(0, Synthetic(1000, 2));
  // The rank slows down by half (e.g. clocks throttled): new samples win.
  std::vector<StepSample> slow = Synthetic(3000, 3);
  for (StepSample& s : slow) s.duration = s.duration * 1.5;
  model.Calibrate(0, slow);
  EXPECT_NEAR(model.Coefficients(0).time[1], 45e-6, 3e-6);
}

TEST(StepCostModel, PriorThenPooledThenOwnFit) {
  StepCostModelOptions options;
  options.min_samples = 10;
  StepCostModel model(options);
  EXPECT_DOUBLE_EQ(model.Coefficients(3).time[0], options.prior.time[0]);
  model.Calibrate(0, Synthetic(100, 4));
  // Rank 3 has no samples: it borrows the pooled fit (rank 0's data).
  EXPECT_NEAR(model.Coefficients(3).time[0], 8e-3, 1e-3);
  // Empty steps (idle lockstep ranks) carry no information.
  model.Observe(3, {0, 0, absl::Milliseconds(50), 20});
  EXPECT_EQ(model.Samples(3), 0);
}

TEST(StepCostModel, LargestBatchWithinBudgetAndEfficientBatch) {
  StepCostModelOptions options;
  options.prior = {{10e-3, 100e-6, 0}, {4.0, 10e-3, 0}, 0};
  StepCostModel model(options);
  // 10 ms + 0.1 ms/token within 22.5 ms: 125 tokens.
  EXPECT_EQ(model.MaxTokensWithin(0, absl::Microseconds(22500), 0, 512), 125);
  EXPECT_EQ(model.MaxTokensWithin(0, absl::Milliseconds(5), 0, 512), 0);
  EXPECT_EQ(model.MaxTokensWithin(0, absl::Seconds(10), 0, 512), 512);
  // J/token at 128 = 4/128 + 0.01 = 0.04125; within 25%: 4/n <= 0.0415625 -> n >= 97.
  EXPECT_EQ(model.EfficientBatch(0, 0, 128, 0.25), 97);
  EXPECT_EQ(model.EfficientBatch(0, 0, 128, 0.0), 128);
}

}  // namespace
}  // namespace joule::scheduler
