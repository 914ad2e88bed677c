// Scheduler decisions on a fake clock: queue caps and 429 hints, tier order,
// the ipw step budget, batch deferral and filling, preemption, the batch
// starvation bound and SLO accounting.
#include "scheduler/scheduler.h"

#include <algorithm>
#include <deque>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "scheduler/fake_clock.h"

namespace joule::scheduler {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

ClusterView Ranks(int n) {
  ClusterView v;
  for (int r = 0; r < n; ++r) v.ranks.push_back({r, true});
  return v;
}

// One ready rank whose worker allows `max_running` sequences and
// `max_batch_tokens` tokens per step (0: unknown).
ClusterView RankAllowing(int max_running, int max_batch_tokens) {
  ClusterView v;
  v.ranks.push_back({.rank = 0, .ready = true, .engine = {max_running, max_batch_tokens}});
  return v;
}

std::vector<uint64_t> Ids(const std::vector<Assignment>& a) {
  std::vector<uint64_t> ids;
  for (const Assignment& x : a) ids.push_back(x.id);
  return ids;
}

// Step cost known exactly: 10 ms + 0.1 ms per token, 400 W.
SchedulerConfig Config(PolicyKind policy) {
  SchedulerConfig c;
  c.policy = policy;
  for (int tokens : {1, 100, 200, 400}) {
    for (int rep = 0; rep < 10; ++rep) {
      const double t = 10e-3 + 100e-6 * tokens;
      c.calibration.push_back({0, {tokens, 0, absl::Seconds(t), 400 * t}});
    }
  }
  return c;
}

class SchedulerTest : public ::testing::Test {
 protected:
  std::unique_ptr<Scheduler> Make(const SchedulerConfig& c) {
    auto s = Scheduler::Create(c, &clock_);
    EXPECT_TRUE(s.ok()) << s.status();
    return std::move(*s);
  }
  // `n` tokens at `interval` each, advancing the clock.
  void Tokens(Scheduler& s, uint64_t id, int n, absl::Duration interval) {
    for (int i = 0; i < n; ++i) {
      clock_.Advance(interval);
      s.OnTokens(id, 1);
    }
  }
  FakeClock clock_;
};

TEST_F(SchedulerTest, RejectsBadRequestsNamingTheField) {
  auto s = Make(Config(PolicyKind::kFcfs));
  absl::Status st = s->Submit({1, Tier::kFast, 0, 10});
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(st.message(), HasSubstr("prompt_tokens"));
  st = s->Submit({1, Tier::kFast, 5, 0});
  EXPECT_THAT(st.message(), HasSubstr("max_tokens"));
  ASSERT_TRUE(s->Submit({1, Tier::kFast, 5, 5}).ok());
  EXPECT_EQ(s->Submit({1, Tier::kFast, 5, 5}).code(), absl::StatusCode::kAlreadyExists);
}

TEST_F(SchedulerTest, QueueCapGivesResourceExhaustedWithRetryAfter) {
  SchedulerConfig c = Config(PolicyKind::kPriority);
  c.slo(Tier::kFast).queue_cap = 2;
  auto s = Make(c);
  ASSERT_TRUE(s->Submit({1, Tier::kFast, 5, 5}).ok());
  ASSERT_TRUE(s->Submit({2, Tier::kFast, 5, 5}).ok());
  absl::Status full = s->Submit({3, Tier::kFast, 5, 5});
  EXPECT_EQ(full.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(full.message(), HasSubstr("tier fast"));
  ASSERT_TRUE(RetryAfter(full).has_value());
  EXPECT_GE(*RetryAfter(full), absl::Seconds(1));
  EXPECT_FALSE(RetryAfter(absl::OkStatus()).has_value());
  // Other tiers have their own caps.
  EXPECT_TRUE(s->Submit({4, Tier::kStandard, 5, 5}).ok());
  // Dispatched but not started still waits; a first token frees the place.
  EXPECT_EQ(s->Dispatch(Ranks(1)).size(), 3u);
  EXPECT_EQ(s->Submit({3, Tier::kFast, 5, 5}).code(), absl::StatusCode::kResourceExhausted);
  s->OnTokens(1, 1);
  EXPECT_TRUE(s->Submit({3, Tier::kFast, 5, 5}).ok());
  SchedulerSnapshot snap = s->Snapshot();
  EXPECT_EQ(snap.tiers[0].stats.rejected, 2);
  EXPECT_EQ(snap.tiers[0].stats.submitted, 5);
}

TEST_F(SchedulerTest, FcfsIgnoresTiers) {
  SchedulerConfig c = Config(PolicyKind::kFcfs);
  c.max_inflight_per_rank = 1;
  auto s = Make(c);
  ASSERT_TRUE(s->Submit({1, Tier::kBatch, 5, 5}).ok());
  ASSERT_TRUE(s->Submit({2, Tier::kStandard, 5, 5}).ok());
  ASSERT_TRUE(s->Submit({3, Tier::kFast, 5, 5}).ok());
  std::vector<uint64_t> order;
  for (int i = 0; i < 3; ++i) {
    std::vector<Assignment> a = s->Dispatch(Ranks(1));
    ASSERT_EQ(a.size(), 1u);
    order.push_back(a[0].id);
    EXPECT_TRUE(s->StepLimitsFor(0).order.empty());  // the engine's own FCFS
    EXPECT_EQ(s->StepLimitsFor(0).max_batch_tokens, c.max_batch_tokens);
    s->OnFinished(a[0].id);
  }
  EXPECT_THAT(order, ElementsAre(1, 2, 3));
}

TEST_F(SchedulerTest, PriorityServesStrictlyInTierOrder) {
  SchedulerConfig c = Config(PolicyKind::kPriority);
  c.max_inflight_per_rank = 1;
  auto s = Make(c);
  ASSERT_TRUE(s->Submit({1, Tier::kBatch, 5, 5}).ok());
  ASSERT_TRUE(s->Submit({2, Tier::kStandard, 5, 5}).ok());
  ASSERT_TRUE(s->Submit({3, Tier::kPriority, 5, 5}).ok());
  ASSERT_TRUE(s->Submit({4, Tier::kFast, 5, 5}).ok());
  ASSERT_TRUE(s->Submit({5, Tier::kFast, 5, 5}).ok());
  std::vector<uint64_t> order;
  for (int i = 0; i < 5; ++i) {
    std::vector<Assignment> a = s->Dispatch(Ranks(1));
    ASSERT_EQ(a.size(), 1u);
    order.push_back(a[0].id);
    s->OnFinished(a[0].id);
  }
  EXPECT_THAT(order, ElementsAre(4, 5, 3, 2, 1));
}

TEST_F(SchedulerTest, PriorityOrdersTheStepAndPreemptsLowerTiersForSlots) {
  SchedulerConfig c = Config(PolicyKind::kPriority);
  c.max_running = 2;
  auto s = Make(c);
  ASSERT_TRUE(s->Submit({1, Tier::kBatch, 5, 50}).ok());
  ASSERT_TRUE(s->Submit({2, Tier::kStandard, 5, 50}).ok());
  s->Dispatch(Ranks(1));
  s->OnTokens(1, 1);
  s->OnTokens(2, 1);
  EXPECT_THAT(s->StepLimitsFor(0).preempt, IsEmpty());
  ASSERT_TRUE(s->Submit({3, Tier::kFast, 5, 50}).ok());
  s->Dispatch(Ranks(1));
  StepLimits l = s->StepLimitsFor(0);
  EXPECT_THAT(l.order, ElementsAre(3, 2, 1));
  EXPECT_THAT(l.preempt, ElementsAre(1));  // the batch one, not the standard one
}

TEST_F(SchedulerTest, EveryPolicyPlansARankWithinWhatItsWorkerAllows) {
  for (PolicyKind policy : {PolicyKind::kFcfs, PolicyKind::kPriority, PolicyKind::kIpw}) {
    SCOPED_TRACE(PolicyName(policy));
    SchedulerConfig c = Config(policy);  // max_running 128, max_batch_tokens 512
    auto s = Make(c);
    s->Dispatch(RankAllowing(64, 256));
    StepLimits l = s->StepLimitsFor(0);
    EXPECT_EQ(l.max_running, 64);
    EXPECT_EQ(l.max_batch_tokens, 256);
    // A worker's limits only lower the config's; unknown (0) leaves them.
    s->Dispatch(RankAllowing(1000, 0));
    l = s->StepLimitsFor(0);
    EXPECT_EQ(l.max_running, c.max_running);
    EXPECT_EQ(l.max_batch_tokens, c.max_batch_tokens);
  }
}

// The config allows 128 running sequences, the worker 64: with 64 batch
// sequences running the rank is full, so a waiting fast one takes the newest
// one's slot instead of waiting behind all of them.
TEST_F(SchedulerTest, PriorityPreemptsForSlotsWhenTheWorkersRunningLimitIsFull) {
  for (int worker_limit : {64, 0}) {
    SCOPED_TRACE(worker_limit == 0 ? "worker limit unknown" : "worker allows 64");
    auto s = Make(Config(PolicyKind::kPriority));
    const ClusterView view = RankAllowing(worker_limit, 0);
    for (uint64_t id = 1; id <= 64; ++id) ASSERT_TRUE(s->Submit({id, Tier::kBatch, 5, 50}).ok());
    ASSERT_EQ(s->Dispatch(view).size(), 64u);
    for (uint64_t id = 1; id <= 64; ++id) s->OnTokens(id, 1);
    ASSERT_TRUE(s->Submit({65, Tier::kFast, 5, 50}).ok());
    ASSERT_THAT(Ids(s->Dispatch(view)), ElementsAre(65));
    const StepLimits l = s->StepLimitsFor(0);
    if (worker_limit == 0) {
      EXPECT_THAT(l.preempt, IsEmpty()) << "128 slots by the config: room for it";
    } else {
      EXPECT_THAT(l.preempt, ElementsAre(64));
      EXPECT_EQ(l.max_running, 64);
    }
    EXPECT_EQ(l.order.front(), 65u);
  }
}

TEST_F(SchedulerTest, IpwFillsAndPreemptsWithinTheWorkersRunningLimit) {
  SchedulerConfig c = Config(PolicyKind::kIpw);  // max_running 128
  c.ipw.valley_hold = absl::ZeroDuration();
  auto s = Make(c);
  const ClusterView view = RankAllowing(64, 0);
  // Batch fills the worker's 64 running slots, not the config's 128.
  for (uint64_t id = 1; id <= 70; ++id) ASSERT_TRUE(s->Submit({id, Tier::kBatch, 10, 100}).ok());
  ASSERT_EQ(s->Dispatch(view).size(), 64u);
  for (uint64_t id = 1; id <= 64; ++id) s->OnTokens(id, 1);
  EXPECT_THAT(s->StepLimitsFor(0).preempt, IsEmpty());
  ASSERT_TRUE(s->Submit({71, Tier::kFast, 10, 100}).ok());
  ASSERT_THAT(Ids(s->Dispatch(view)), ElementsAre(71));
  const StepLimits l = s->StepLimitsFor(0);
  EXPECT_THAT(l.preempt, ElementsAre(64));  // the newest running batch sequence
  EXPECT_EQ(l.max_running, 64);
}

TEST_F(SchedulerTest, IpwStepCapStaysWithinAWorkerThatAllowsFewerThanTheMinimumStep) {
  SchedulerConfig c = Config(PolicyKind::kIpw);  // ipw.min_step_tokens 16
  auto s = Make(c);
  ASSERT_TRUE(s->Submit({1, Tier::kFast, 10, 50}).ok());
  ASSERT_THAT(Ids(s->Dispatch(RankAllowing(0, 8))), ElementsAre(1));
  EXPECT_EQ(s->StepLimitsFor(0).max_batch_tokens, 8);
  EXPECT_EQ(s->StepTokenCapFor(0, Tier::kFast), 8);
}

TEST_F(SchedulerTest, IpwCapsTheStepWhileAFastRequestIsInFlight) {
  SchedulerConfig c = Config(PolicyKind::kIpw);
  c.batch_max_wait = absl::Seconds(1);
  auto s = Make(c);
  ASSERT_TRUE(s->Submit({1, Tier::kBatch, 100, 50}).ok());
  clock_.Advance(absl::Seconds(1));  // starts at its maximum wait
  ASSERT_THAT(Ids(s->Dispatch(Ranks(2))), ElementsAre(1));
  StepLimits alone = s->StepLimitsFor(0);
  EXPECT_EQ(alone.max_batch_tokens, c.max_batch_tokens);
  EXPECT_EQ(alone.step_time_budget, absl::InfiniteDuration());

  ASSERT_TRUE(s->Submit({2, Tier::kFast, 10, 50}).ok());
  ASSERT_THAT(Ids(s->Dispatch(Ranks(2))), ElementsAre(2));
  // Lockstep: both ranks' steps are bounded by the fast tier's 25 ms TPOT:
  // 0.9 * 25 ms = 22.5 ms = 10 ms + 125 * 0.1 ms (before any context).
  for (int rank : {0, 1}) {
    StepLimits capped = s->StepLimitsFor(rank);
    EXPECT_NEAR(absl::ToDoubleMilliseconds(capped.step_time_budget), 22.5, 1e-6) << rank;
    EXPECT_LE(capped.max_batch_tokens, 125) << rank;
    EXPECT_GE(capped.max_batch_tokens, 110) << rank;
  }
  s->OnFinished(2);
  EXPECT_EQ(s->StepLimitsFor(0).max_batch_tokens, c.max_batch_tokens);
}

TEST_F(SchedulerTest, IpwStepTokenCapFollowsTheRequestsOwnTier) {
  SchedulerConfig c = Config(PolicyKind::kIpw);
  c.slo(Tier::kStandard).tpot = absl::Milliseconds(50);
  auto s = Make(c);
  // Each tier's own TPOT: 0.9 * 25 ms = 10 ms + 125 * 0.1 ms for fast, 0.9 *
  // 50 ms = 10 ms + 350 * 0.1 ms for standard, whatever else is in flight.
  ASSERT_TRUE(s->Submit({1, Tier::kFast, 10, 50}).ok());
  ASSERT_THAT(Ids(s->Dispatch(Ranks(1))), ElementsAre(1));
  const int64_t fast = s->StepTokenCapFor(0, Tier::kFast);
  const int64_t standard = s->StepTokenCapFor(0, Tier::kStandard);
  EXPECT_GE(fast, 110);
  EXPECT_LE(fast, 125);
  EXPECT_GE(standard, 330);
  EXPECT_LE(standard, 350);
  EXPECT_EQ(s->StepTokenCapFor(0, Tier::kBatch), 0) << "no TPOT target, no cap";
  // Pacing: a token every 0.8 * TPOT target, batch every 200 ms (the defaults).
  EXPECT_EQ(s->TokenIntervalFor(Tier::kFast), absl::Milliseconds(20));
  EXPECT_EQ(s->TokenIntervalFor(Tier::kStandard), absl::Milliseconds(40));
  EXPECT_EQ(s->TokenIntervalFor(Tier::kBatch), absl::Milliseconds(200));
  c.ipw.pace = 0;
  EXPECT_EQ(Make(c)->TokenIntervalFor(Tier::kFast), absl::ZeroDuration()) << "pace 0: off";
  for (PolicyKind p : {PolicyKind::kFcfs, PolicyKind::kPriority}) {
    EXPECT_EQ(Make(Config(p))->StepTokenCapFor(0, Tier::kFast), 0) << "only ipw caps steps";
    EXPECT_EQ(Make(Config(p))->TokenIntervalFor(Tier::kBatch), absl::ZeroDuration()) << "nor paces";
  }
}

TEST_F(SchedulerTest, IpwDefersBatchWhenFastHeadroomIsLowAndFillsWhenHigh) {
  for (bool tight : {true, false}) {
    SCOPED_TRACE(tight ? "fast tier near its TPOT target" : "fast tier with headroom");
    auto s = Make(Config(PolicyKind::kIpw));
    ASSERT_TRUE(s->Submit({1, Tier::kFast, 10, 100}).ok());
    ASSERT_THAT(Ids(s->Dispatch(Ranks(1))), ElementsAre(1));
    // 24.5 ms per token is within 2% of the 25 ms target; 12 ms is far.
    Tokens(*s, 1, 10, tight ? absl::Microseconds(24500) : absl::Milliseconds(12));
    ASSERT_TRUE(s->Submit({2, Tier::kBatch, 10, 100}).ok());
    ASSERT_TRUE(s->Submit({3, Tier::kBatch, 10, 100}).ok());
    std::vector<Assignment> a = s->Dispatch(Ranks(1));
    if (tight) {
      EXPECT_THAT(a, IsEmpty());
    } else {
      EXPECT_THAT(Ids(a), ElementsAre(2, 3));
    }
  }
}

TEST_F(SchedulerTest, IpwHoldsLoneBatchForAnEfficientStepOrValleyHold) {
  SchedulerConfig c = Config(PolicyKind::kIpw);
  c.ipw.valley_hold = absl::Seconds(5);
  auto s = Make(c);
  // A few batch requests alone would run steps of a few tokens: held.
  for (uint64_t id = 1; id <= 3; ++id) ASSERT_TRUE(s->Submit({id, Tier::kBatch, 10, 100}).ok());
  EXPECT_THAT(s->Dispatch(Ranks(1)), IsEmpty());
  ASSERT_TRUE(s->NextWakeup().has_value());
  clock_.Advance(absl::Seconds(4));
  EXPECT_THAT(s->Dispatch(Ranks(1)), IsEmpty());
  // After valley_hold all of it starts together.
  clock_.Advance(absl::Seconds(1));
  EXPECT_THAT(Ids(s->Dispatch(Ranks(1))), ElementsAre(1, 2, 3));
}

TEST_F(SchedulerTest, IpwStartsLoneBatchAtOnceWhenThereIsEnoughForAnEfficientStep) {
  auto s = Make(Config(PolicyKind::kIpw));
  // 10 ms fixed + 0.1 ms/token at 400 W: 4 J per step + 40 mJ per token; at
  // the 128-sequence cap 71.25 mJ/token; within 25% (89.06 mJ) from 82 on.
  for (uint64_t id = 1; id <= 81; ++id) ASSERT_TRUE(s->Submit({id, Tier::kBatch, 10, 100}).ok());
  EXPECT_THAT(s->Dispatch(Ranks(1)), IsEmpty());
  ASSERT_TRUE(s->Submit({82, Tier::kBatch, 10, 100}).ok());
  EXPECT_EQ(s->Dispatch(Ranks(1)).size(), 82u);
}

TEST_F(SchedulerTest, IpwPreemptsNewestBatchForWaitingInteractiveWork) {
  SchedulerConfig c = Config(PolicyKind::kIpw);
  c.max_running = 3;
  c.ipw.valley_hold = absl::ZeroDuration();
  auto s = Make(c);
  for (uint64_t id = 1; id <= 3; ++id) ASSERT_TRUE(s->Submit({id, Tier::kBatch, 10, 100}).ok());
  ASSERT_EQ(s->Dispatch(Ranks(1)).size(), 3u);
  for (uint64_t id = 1; id <= 3; ++id) s->OnTokens(id, 1);
  EXPECT_THAT(s->StepLimitsFor(0).preempt, IsEmpty());
  ASSERT_TRUE(s->Submit({4, Tier::kFast, 10, 100}).ok());
  ASSERT_TRUE(s->Submit({5, Tier::kStandard, 10, 100}).ok());
  s->Dispatch(Ranks(1));
  StepLimits l = s->StepLimitsFor(0);
  EXPECT_THAT(l.preempt, ElementsAre(3, 2));  // newest first, one per waiting request
  EXPECT_THAT(l.order, ElementsAre(4, 5, 1, 2, 3));
  // After the engine preempts them they wait behind the interactive work and
  // resume (recomputed) when slots free up.
  s->OnPreempted(3);
  s->OnPreempted(2);
  s->OnTokens(4, 1);
  s->OnTokens(5, 1);
  EXPECT_THAT(s->StepLimitsFor(0).preempt, IsEmpty());
  s->OnFinished(4);
  s->OnFinished(5);
  l = s->StepLimitsFor(0);
  EXPECT_THAT(l.preempt, IsEmpty());
  EXPECT_THAT(l.order, ElementsAre(1, 2, 3));
}

TEST_F(SchedulerTest, BatchNeverWaitsPastItsMaximumUnderSustainedFastLoad) {
  for (PolicyKind policy : {PolicyKind::kIpw, PolicyKind::kPriority}) {
    SCOPED_TRACE(PolicyName(policy));
    SchedulerConfig c = Config(policy);
    c.batch_max_wait = absl::Seconds(10);
    c.max_inflight_per_rank = 4;
    auto s = Make(c);
    const absl::Time start = clock_.Now();
    ASSERT_TRUE(s->Submit({1000, Tier::kBatch, 10, 100}).ok());
    std::optional<absl::Time> started;
    std::deque<uint64_t> fast_in_flight;
    uint64_t next = 1;
    // Fast requests keep every slot busy for a minute; one finishes every
    // 100 ms and another takes its place.
    for (int tick = 0; tick < 600 && !started; ++tick) {
      while (s->Submit({next, Tier::kFast, 10, 100}).ok()) ++next;
      for (const Assignment& a : s->Dispatch(Ranks(1))) {
        if (a.id == 1000) {
          started = clock_.Now();
        } else {
          fast_in_flight.push_back(a.id);
        }
      }
      clock_.Advance(absl::Milliseconds(100));
      ASSERT_FALSE(fast_in_flight.empty());
      s->OnTokens(fast_in_flight.front(), 4);
      s->OnFinished(fast_in_flight.front());
      fast_in_flight.pop_front();
    }
    ASSERT_TRUE(started.has_value());
    EXPECT_GE(*started - start, c.batch_max_wait);
    EXPECT_LE(*started - start, c.batch_max_wait + absl::Milliseconds(100));
    // It then goes first in its rank's step.
    StepLimits l = s->StepLimitsFor(0);
    ASSERT_FALSE(l.order.empty());
    EXPECT_EQ(l.order.front(), 1000u);
  }
}

TEST_F(SchedulerTest, CountsSloHitsAndMissesPerTier) {
  auto s = Make(Config(PolicyKind::kFcfs));
  // Fast: TTFT 500 ms, TPOT 25 ms.
  ASSERT_TRUE(s->Submit({1, Tier::kFast, 10, 10}).ok());  // meets both
  ASSERT_TRUE(s->Submit({2, Tier::kFast, 10, 10}).ok());  // TPOT 30 ms: miss
  ASSERT_TRUE(s->Submit({3, Tier::kFast, 10, 10}).ok());  // TTFT 600 ms: miss
  ASSERT_TRUE(s->Submit({4, Tier::kFast, 10, 10}).ok());  // cancelled: neither
  ASSERT_TRUE(s->Submit({5, Tier::kStandard, 10, 1}).ok());  // one token: no TPOT
  ASSERT_EQ(s->Dispatch(Ranks(1)).size(), 5u);
  clock_.Advance(absl::Milliseconds(200));
  s->OnTokens(1, 1);
  s->OnTokens(2, 1);
  s->OnTokens(5, 1);
  s->OnFinished(5);
  for (int i = 0; i < 4; ++i) {  // 20 ms per token
    clock_.Advance(absl::Milliseconds(20));
    s->OnTokens(1, 1);
  }
  s->OnFinished(1);
  clock_.Advance(absl::Milliseconds(320));  // 600 ms after submission
  s->OnTokens(3, 1);
  for (int i = 0; i < 4; ++i) {
    clock_.Advance(absl::Milliseconds(20));
    s->OnTokens(3, 1);
  }
  s->OnFinished(3);
  // Request 2: five more tokens in one message 480 ms after its first:
  // 96 ms per token, a TPOT miss.
  s->OnTokens(2, 5);
  s->OnFinished(2);
  s->OnCancelled(4);
  s->OnFinished(4);  // late message after the outcome: ignored

  const SchedulerSnapshot snap = s->Snapshot();
  const TierStats& fast = snap.tiers[static_cast<int>(Tier::kFast)].stats;
  EXPECT_EQ(fast.finished, 3);
  EXPECT_EQ(fast.cancelled, 1);
  EXPECT_EQ(fast.attained, 1);
  EXPECT_EQ(fast.ttft_met, 2);
  EXPECT_NEAR(fast.attainment(), 1.0 / 3, 1e-9);
  const TierStats& standard = snap.tiers[static_cast<int>(Tier::kStandard)].stats;
  EXPECT_EQ(standard.finished, 1);
  EXPECT_EQ(standard.attained, 1);
  EXPECT_EQ(standard.output_tokens, 1);
}

// A lost rank's requests leave it without an outcome; resumed on another rank
// they count there, and their SLO outcome is their final one.
TEST_F(SchedulerTest, ARequestResumedOnAnotherRankKeepsItsSloAccounting) {
  auto s = Make(Config(PolicyKind::kFcfs));
  ASSERT_TRUE(s->Submit({1, Tier::kFast, 10, 10}).ok());
  ASSERT_TRUE(s->Submit({2, Tier::kFast, 10, 10}).ok());
  const std::vector<Assignment> a = s->Dispatch(Ranks(2));
  ASSERT_EQ(a.size(), 2u);
  const int lost = a[0].rank;
  const int other = a[1].rank;
  ASSERT_NE(lost, other);
  s->OnTokens(a[0].id, 1);
  auto in_flight = [&](int rank) {
    for (const RankSnapshot& r : s->Snapshot().ranks) {
      if (r.rank == rank) return r.in_flight;
    }
    return int64_t{0};
  };
  EXPECT_EQ(in_flight(lost), 1);
  s->OnRankLost(lost);
  EXPECT_EQ(in_flight(lost), 0);
  EXPECT_EQ(s->Snapshot().tiers[static_cast<int>(Tier::kFast)].stats.cancelled, 0)
      << "not an outcome yet";
  s->OnMoved(a[0].id, other);
  EXPECT_EQ(in_flight(other), 2);
  for (int i = 0; i < 9; ++i) {
    clock_.Advance(absl::Milliseconds(10));
    s->OnTokens(a[0].id, 1);
  }
  s->OnFinished(a[0].id);
  const TierStats fast = s->Snapshot().tiers[static_cast<int>(Tier::kFast)].stats;  // a copy: Snapshot() is a value
  EXPECT_EQ(fast.finished, 1);
  EXPECT_EQ(fast.cancelled, 0);
  EXPECT_EQ(in_flight(other), 1);
}

TEST_F(SchedulerTest, StepsFeedTheCostModelAndAttributeEnergyByTier) {
  auto s = Make(Config(PolicyKind::kIpw));
  ASSERT_TRUE(s->Submit({1, Tier::kFast, 10, 10}).ok());
  s->Dispatch(Ranks(1));
  // The rank got 50% slower than calibrated.
  for (int i = 0; i < 2000; ++i) {
    const int tokens = 1 + (i * 37) % 300;
    const double t = 1.5 * (10e-3 + 100e-6 * tokens);
    clock_.Advance(absl::Seconds(t));
    s->OnStep(0, {tokens, 0, absl::Seconds(t), 400 * t}, {tokens / 4, 0, 0, tokens - tokens / 4});
  }
  const SchedulerSnapshot snap = s->Snapshot();
  ASSERT_EQ(snap.ranks.size(), 1u);
  EXPECT_NEAR(snap.ranks[0].cost.time[1], 150e-6, 10e-6);
  const TierStats& fast = snap.tiers[static_cast<int>(Tier::kFast)].stats;
  const TierStats& batch = snap.tiers[static_cast<int>(Tier::kBatch)].stats;
  EXPECT_GT(fast.energy_joules, 0);
  EXPECT_NEAR(fast.energy_joules + batch.energy_joules, snap.step_energy_joules,
              1e-6 * snap.step_energy_joules);
  EXPECT_NEAR(batch.energy_joules / fast.energy_joules, 3.0, 0.1);
  // The budget follows: 22.5 ms at 15 ms + 0.15 ms/token is 50 tokens.
  EXPECT_NEAR(s->StepLimitsFor(0).max_batch_tokens, 50, 3);
}

}  // namespace
}  // namespace joule::scheduler
