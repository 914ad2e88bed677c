// ScheduledBackend's step plans, over the Router and an in-memory worker
// (fake_worker_client.h): under priority and ipw each rank hears the
// scheduler's order (a fast request ahead of a batch one, by the ids the
// worker knows) and its preemptions once per decision, with the scheduler
// told what the worker preempted; under fcfs no plan goes out; plans to one
// rank keep the minimum interval.
#include "coordinator/http/scheduled_backend.h"

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "coordinator/cluster/fake_clock.h"
#include "coordinator/cluster/fake_worker_client.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace joule::http {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

constexpr char kFingerprint[] = "fnv1a64:0123456789abcdef";

cluster::ModelSummary TinySummary() {
  cluster::ModelSummary m;
  m.vocab_size = 100;
  m.num_layers = 2;
  m.num_experts = 4;
  m.top_k = 2;
  m.max_context = 512;
  m.moe_layer = {true, true};
  return m;
}

class NullSink final : public cluster::GenerateSink {
 public:
  bool Write(const v1::GenerateResponse&) override { return true; }
  bool ClientGone() const override { return false; }
};

class ScheduledBackendTest : public ::testing::Test {
 protected:
  // `worker_max_running`: what the worker registers (0: unknown, an older worker).
  void Make(scheduler::SchedulerConfig config, int worker_max_running = 0) {
    cluster::MembershipOptions o{.world_size = 1,
                                 .model_dir = "/m",
                                 .model_fingerprint = kFingerprint,
                                 .heartbeat_interval = absl::Milliseconds(500)};
    membership_ = *cluster::Membership::Create(o, TinySummary(), &clock_);
    v1::RegisterRequest req;
    req.set_protocol_version(v1::PROTOCOL_VERSION_1);
    req.set_model_fingerprint(kFingerprint);
    req.set_requested_rank(0);
    req.set_worker_id("w0");
    req.set_transport(v1::TRANSPORT_KIND_UCX);
    req.set_worker_endpoint("w0:1");
    req.set_max_running(worker_max_running);
    v1::RegisterReply reply;
    ASSERT_TRUE(membership_->Register(req, &reply).ok());
    v1::HeartbeatRequest hb;
    hb.set_worker_id("w0");
    hb.set_worker_secret(reply.worker_secret());
    hb.set_rank(0);
    hb.set_ready(true);
    hb.set_placement_epoch(membership_->placement_epoch());
    v1::HeartbeatReply hb_reply;
    ASSERT_TRUE(membership_->Heartbeat(hb, &hb_reply).ok());
    router_ = std::make_unique<cluster::Router>(membership_.get(), &clients_,
                                                cluster::RouterOptions{});
    auto s = scheduler::Scheduler::Create(std::move(config), &real_clock_);
    ASSERT_TRUE(s.ok()) << s.status();
    scheduler_ = *std::move(s);
    backend_ =
        std::make_unique<ScheduledBackend>(router_.get(), membership_.get(), scheduler_.get());
  }
  void TearDown() override {
    // The backend outlives the router, whose ~Router waits for every outcome.
    if (backend_) backend_->Shutdown();
    router_.reset();
    backend_.reset();
  }
  static scheduler::SchedulerConfig Config(scheduler::PolicyKind policy) {
    scheduler::SchedulerConfig c;
    c.policy = policy;
    c.ipw.valley_hold = absl::ZeroDuration();  // ipw sends batch work at once
    return c;
  }

  // Submits a request of `tier` ("fast", "flex" = batch) and returns the
  // worker's stream for it (the n-th Generate call), with the id the worker sees.
  std::shared_ptr<cluster::FakeStream> Submit(const std::string& id, const std::string& tier,
                                              size_t n) {
    v1::GenerateRequest r;
    r.set_request_id(id);
    r.set_service_tier(tier);
    r.add_prompt_token_ids(1);
    r.add_prompt_token_ids(2);
    r.mutable_sampling()->set_max_tokens(50);
    backend_->GenerateAsync(r, absl::Now() + absl::Minutes(1), std::make_shared<NullSink>(),
                            [](absl::Status) {});
    std::shared_ptr<cluster::FakeStream> stream = worker()->WaitForStream(n);
    EXPECT_NE(stream, nullptr) << id << " never reached the worker";
    return stream;
  }
  static void Token(cluster::FakeStream& stream) {
    v1::GenerateResponse r;
    r.add_token_ids(7);
    stream.Push(r);
  }
  std::shared_ptr<cluster::FakeWorkerClient> worker() { return clients_.Get("w0:1"); }
  // Requests of `tier` the scheduler counts as running (a token came).
  int64_t Running(scheduler::Tier tier) const {
    return scheduler_->Snapshot().tiers[static_cast<int>(tier)].running;
  }
  // Polls `done` for up to 10 s.
  static bool Eventually(const std::function<bool()>& done) {
    for (const absl::Time give_up = absl::Now() + absl::Seconds(10); !done();) {
      if (absl::Now() > give_up) return false;
      absl::SleepFor(absl::Milliseconds(1));
    }
    return true;
  }
  // The first plan whose order is exactly `order`.
  std::optional<v1::StepPlanRequest> PlanWithOrder(const std::vector<std::string>& order) {
    return worker()->WaitForPlan([&](const v1::StepPlanRequest& p) {
      return std::vector<std::string>(p.order().begin(), p.order().end()) == order;
    });
  }

  cluster::FakeClock clock_;  // membership: heartbeats never expire
  scheduler::RealClock real_clock_;
  cluster::FakeWorkerClientFactory clients_;
  std::unique_ptr<cluster::Membership> membership_;
  std::unique_ptr<scheduler::Scheduler> scheduler_;
  std::unique_ptr<ScheduledBackend> backend_;
  std::unique_ptr<cluster::Router> router_;
};

class OrderByPolicy : public ScheduledBackendTest,
                      public ::testing::WithParamInterface<scheduler::PolicyKind> {};

TEST_P(OrderByPolicy, FastRequestGoesAheadOfTheBatchOneInTheRanksPlan) {
  Make(Config(GetParam()));
  std::shared_ptr<cluster::FakeStream> batch = Submit("batch-1", "flex", 1);
  ASSERT_NE(batch, nullptr);
  const std::string batch_id = batch->request().request_id();
  ASSERT_TRUE(PlanWithOrder({batch_id}).has_value());
  std::shared_ptr<cluster::FakeStream> fast = Submit("fast-1", "fast", 2);
  ASSERT_NE(fast, nullptr);
  const std::string fast_id = fast->request().request_id();
  std::optional<v1::StepPlanRequest> plan = PlanWithOrder({fast_id, batch_id});
  ASSERT_TRUE(plan.has_value()) << "no plan put " << fast_id << " ahead of " << batch_id;
  EXPECT_THAT(plan->preempt(), IsEmpty());  // room for both
  EXPECT_EQ(plan->max_running(), scheduler_->config().max_running);
  // Numbered in order, so the worker can drop one that was overtaken.
  const std::vector<v1::StepPlanRequest> plans = worker()->plans();
  for (size_t i = 1; i < plans.size(); ++i) EXPECT_GT(plans[i].sequence(), plans[i - 1].sequence());
  batch->Close(absl::OkStatus());
  fast->Close(absl::OkStatus());
}

INSTANTIATE_TEST_SUITE_P(TieredPolicies, OrderByPolicy,
                         ::testing::Values(scheduler::PolicyKind::kPriority,
                                           scheduler::PolicyKind::kIpw),
                         [](const auto& info) {
                           return info.param == scheduler::PolicyKind::kIpw ? "Ipw" : "Priority";
                         });

TEST_F(ScheduledBackendTest, FcfsSendsNoPlans) {
  Make(Config(scheduler::PolicyKind::kFcfs));
  std::shared_ptr<cluster::FakeStream> batch = Submit("batch-1", "flex", 1);
  std::shared_ptr<cluster::FakeStream> fast = Submit("fast-1", "fast", 2);
  ASSERT_NE(batch, nullptr);
  ASSERT_NE(fast, nullptr);
  Token(*batch);
  Token(*fast);
  // Events enough for several passes of the dispatch loop.
  absl::SleepFor(absl::Milliseconds(100));
  EXPECT_THAT(worker()->plans(), IsEmpty());
  batch->Close(absl::OkStatus());
  fast->Close(absl::OkStatus());
}

// One running sequence per rank: the fast request takes the running batch
// request's slot. The preemption goes out once, however often the plan
// changes while the scheduler still decides it.
TEST_F(ScheduledBackendTest, PreemptionIsSentOncePerDecision) {
  scheduler::SchedulerConfig config = Config(scheduler::PolicyKind::kPriority);
  config.max_running = 1;
  Make(config);
  v1::StepPlanReply none;  // the worker preempted nothing (yet)
  worker()->SetStepPlanReply(none);
  std::shared_ptr<cluster::FakeStream> batch = Submit("batch-1", "flex", 1);
  ASSERT_NE(batch, nullptr);
  const std::string batch_id = batch->request().request_id();
  Token(*batch);  // running
  ASSERT_TRUE(Eventually([&] { return Running(scheduler::Tier::kBatch) == 1; }));
  std::shared_ptr<cluster::FakeStream> fast = Submit("fast-1", "fast", 2);
  ASSERT_NE(fast, nullptr);
  const std::string fast_id = fast->request().request_id();
  std::optional<v1::StepPlanRequest> plan = PlanWithOrder({fast_id, batch_id});
  ASSERT_TRUE(plan.has_value());
  EXPECT_THAT(plan->preempt(), ElementsAre(batch_id));
  EXPECT_EQ(plan->max_running(), 1);

  // The same decision again (another fast request changes the order): not
  // resent. (fast-1 still waits for the slot, so the decision stands throughout.)
  std::shared_ptr<cluster::FakeStream> fast2 = Submit("fast-2", "fast", 3);
  ASSERT_NE(fast2, nullptr);
  const std::string fast2_id = fast2->request().request_id();
  std::optional<v1::StepPlanRequest> later = PlanWithOrder({fast_id, fast2_id, batch_id});
  ASSERT_TRUE(later.has_value());
  EXPECT_THAT(later->preempt(), IsEmpty());
  int asked = 0;
  for (const v1::StepPlanRequest& p : worker()->plans()) asked += p.preempt_size();
  EXPECT_EQ(asked, 1);
  EXPECT_EQ(Running(scheduler::Tier::kBatch), 1) << "the worker preempted nothing";

  fast2->Close(absl::OkStatus());
  fast->Close(absl::OkStatus());
  batch->Close(absl::OkStatus());
}

// The worker allows two running sequences, the scheduler's config 128: with
// two batch requests running the rank is full, so the fast request takes the
// newer one's slot; the coordinator says once that the rank caps its config.
TEST_F(ScheduledBackendTest, PlansARankWithinTheRunningLimitItsWorkerRegistered) {
  const LogLevel level = MinLogLevel();
  SetMinLogLevel(LogLevel::kInfo);
  ::testing::internal::CaptureStderr();
  Make(Config(scheduler::PolicyKind::kPriority), /*worker_max_running=*/2);
  v1::StepPlanReply none;
  worker()->SetStepPlanReply(none);
  std::shared_ptr<cluster::FakeStream> batch1 = Submit("batch-1", "flex", 1);
  std::shared_ptr<cluster::FakeStream> batch2 = Submit("batch-2", "flex", 2);
  ASSERT_NE(batch1, nullptr);
  ASSERT_NE(batch2, nullptr);
  Token(*batch1);
  Token(*batch2);
  ASSERT_TRUE(Eventually([&] { return Running(scheduler::Tier::kBatch) == 2; }));
  std::shared_ptr<cluster::FakeStream> fast = Submit("fast-1", "fast", 3);
  ASSERT_NE(fast, nullptr);
  const std::string fast_id = fast->request().request_id();
  const std::string batch1_id = batch1->request().request_id();
  const std::string batch2_id = batch2->request().request_id();
  std::optional<v1::StepPlanRequest> plan = PlanWithOrder({fast_id, batch1_id, batch2_id});
  const std::string log = ::testing::internal::GetCapturedStderr();
  SetMinLogLevel(level);
  ASSERT_TRUE(plan.has_value());
  EXPECT_THAT(plan->preempt(), ElementsAre(batch2_id));
  EXPECT_EQ(plan->max_running(), 2);
  const std::string capped =
      "rank 0 runs at most 2 sequences (--max-running); the scheduler's max_running 128 is "
      "capped to it";
  EXPECT_THAT(log, HasSubstr(capped));
  EXPECT_EQ(log.find(capped), log.rfind(capped)) << "logged more than once:\n" << log;
  fast->Close(absl::OkStatus());
  batch2->Close(absl::OkStatus());
  batch1->Close(absl::OkStatus());
}

TEST_F(ScheduledBackendTest, WhatTheWorkerPreemptedGoesBackToTheScheduler) {
  scheduler::SchedulerConfig config = Config(scheduler::PolicyKind::kPriority);
  config.max_running = 1;
  Make(config);
  v1::StepPlanReply one;
  one.set_preempted(1);
  worker()->SetStepPlanReply(one);
  std::shared_ptr<cluster::FakeStream> batch = Submit("batch-1", "flex", 1);
  ASSERT_NE(batch, nullptr);
  Token(*batch);
  ASSERT_TRUE(Eventually([&] { return Running(scheduler::Tier::kBatch) == 1; }));
  std::shared_ptr<cluster::FakeStream> fast = Submit("fast-1", "fast", 2);
  ASSERT_NE(fast, nullptr);
  ASSERT_TRUE(worker()
                  ->WaitForPlan([](const v1::StepPlanRequest& p) { return p.preempt_size() == 1; })
                  .has_value());
  // OnPreempted: running -> dispatched (waiting on its rank).
  EXPECT_TRUE(Eventually([&] { return Running(scheduler::Tier::kBatch) == 0; }))
      << "the scheduler still counts the batch request as running";
  EXPECT_EQ(scheduler_->Snapshot().tiers[static_cast<int>(scheduler::Tier::kBatch)].dispatched, 1);
  batch->Close(absl::OkStatus());
  fast->Close(absl::OkStatus());
}

TEST_F(ScheduledBackendTest, PlansToARankKeepTheMinimumInterval) {
  Make(Config(scheduler::PolicyKind::kPriority));
  // Every arrival changes the rank's order.
  std::vector<std::shared_ptr<cluster::FakeStream>> streams;
  for (int i = 0; i < 20; ++i) {
    streams.push_back(Submit(absl::StrCat("r", i), i % 2 ? "fast" : "flex", i + 1));
    ASSERT_NE(streams.back(), nullptr);
  }
  // The last arrival's plan still goes out (held back, not dropped).
  ASSERT_TRUE(worker()
                  ->WaitForPlan([](const v1::StepPlanRequest& p) { return p.order_size() == 20; })
                  .has_value());
  const std::vector<absl::Time> times = worker()->plan_times();
  ASSERT_GE(times.size(), 2u);
  for (size_t i = 1; i < times.size(); ++i) {
    // The loop's clock reading precedes the call by a little; allow 1 ms.
    EXPECT_GE(times[i] - times[i - 1], ScheduledBackend::kMinPlanInterval - absl::Milliseconds(1))
        << "plans " << i - 1 << " and " << i;
  }
  for (auto& s : streams) s->Close(absl::OkStatus());
}

}  // namespace
}  // namespace joule::http
