// The heartbeat against a scripted coordinator: it reports what the
// coordinator needs (readiness, load, per-expert tokens, measured steps), applies a new
// placement, and stops the worker when asked or when the coordinator is gone.
#include "worker/service/heartbeat.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/worker/service/runtime_cluster.h"
#include "worker/service/convert.h"
#include "worker/service/fake_coordinator_client.h"

namespace joule::worker {
namespace {

using ::testing::HasSubstr;
using testing_util::Collector;
using testing_util::Greedy;
using testing_util::Prompt;
using testing_util::RuntimeCluster;

class HeartbeatTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = testing::TinyModelDir("qwen3_moe-tiny");
    cluster_ = std::make_unique<RuntimeCluster>(dir_, 1, absl::Seconds(20));
    auto config = LoadModelConfig(dir_);
    ASSERT_TRUE(config.ok());
    config_ = *config;
    loader_ = std::make_unique<PlacementLoader>(dir_, config_, 0, 1, cluster_->placement());
    cluster_->StartAll();
  }

  std::unique_ptr<HeartbeatLoop> MakeLoop(int max_missed = 2) {
    return std::make_unique<HeartbeatLoop>(
        &coordinator_, &cluster_->runtime(0), loader_.get(),
        HeartbeatOptions{.worker_id = "host:1:abc", .rank = 0,
                         .interval = absl::Milliseconds(10), .max_missed = max_missed},
        [this](absl::Status why) {
          absl::MutexLock lock(&mu_);
          ++stops_;
          stop_status_ = why;
        });
  }

  int stops() {
    absl::MutexLock lock(&mu_);
    return stops_;
  }

  std::string dir_;
  ModelConfig config_;
  std::unique_ptr<RuntimeCluster> cluster_;
  std::unique_ptr<PlacementLoader> loader_;
  FakeCoordinatorClient coordinator_;
  absl::Mutex mu_;
  int stops_ ABSL_GUARDED_BY(mu_) = 0;
  absl::Status stop_status_ ABSL_GUARDED_BY(mu_);
};

TEST_F(HeartbeatTest, ReportsReadinessLoadAndExpertTokens) {
  Collector c;
  ASSERT_TRUE(cluster_->runtime(0).Submit("a", {.prompt = Prompt(12, 1), .sampling = Greedy(5)},
                                          c.callbacks()).ok());
  ASSERT_TRUE(c.WaitDone());
  auto loop = MakeLoop();
  ASSERT_TRUE(loop->Beat().ok());
  const auto beats = coordinator_.heartbeats();
  ASSERT_EQ(beats.size(), 1u);
  const v1::HeartbeatRequest& hb = beats[0];
  EXPECT_EQ(hb.worker_id(), "host:1:abc");
  EXPECT_EQ(hb.rank(), 0);
  EXPECT_TRUE(hb.ready());
  EXPECT_EQ(hb.running(), 0);
  EXPECT_EQ(hb.placement_epoch(), 1u);
  EXPECT_GT(hb.kv_free_blocks(), 0);
  int64_t tokens = 0;
  for (const v1::ExpertLoad& l : hb.expert_load()) {
    EXPECT_TRUE(config_.IsMoeLayer(l.layer())) << l.layer();
    for (int64_t n : l.tokens()) tokens += n;
  }
  // (12 prompt + 4 decode tokens) x top_k per MoE layer.
  int moe_layers = 0;
  for (int l = 0; l < config_.num_layers; ++l) moe_layers += config_.IsMoeLayer(l);
  EXPECT_EQ(tokens, int64_t{16} * config_.num_experts_per_tok * moe_layers);

  // The steps it ran, for the coordinator's cost model: every token once, in order.
  int64_t step_tokens = 0;
  int64_t last_end = 0;
  ASSERT_GE(hb.steps_size(), 2);  // the prefill, then the decodes
  for (const v1::StepRecord& r : hb.steps()) {
    step_tokens += r.batch_tokens();
    EXPECT_GT(r.seconds(), 0);
    EXPECT_GT(r.context_tokens(), 0);
    EXPECT_GE(r.ended_unix_micros(), last_end);
    last_end = r.ended_unix_micros();
  }
  EXPECT_EQ(step_tokens, 16);
  EXPECT_EQ(hb.steps(0).batch_tokens(), 12);
  ASSERT_TRUE(loop->Beat().ok());
  EXPECT_EQ(coordinator_.heartbeats()[1].steps_size(), 0) << "each step is reported once";
}

TEST_F(HeartbeatTest, AppliesPlacementFromReply) {
  v1::HeartbeatReply reply;
  *reply.mutable_placement() = PlacementToProto(cluster_->placement(), 5);
  coordinator_.set_heartbeat_reply(reply);
  auto loop = MakeLoop();
  loop->Start();
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  while (cluster_->runtime(0).Status().placement_epoch != 5 && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(5));
  }
  EXPECT_EQ(cluster_->runtime(0).Status().placement_epoch, 5u);
  // Later heartbeats say so.
  absl::SleepFor(absl::Milliseconds(50));
  loop->Stop();
  EXPECT_EQ(coordinator_.heartbeats().back().placement_epoch(), 5u);
  absl::MutexLock lock(&mu_);
  EXPECT_EQ(stops_, 0);
}

TEST_F(HeartbeatTest, PlacementForAnotherModelIsRefusedAndKeepsRunning) {
  Placement wrong = cluster_->placement();
  wrong.num_ranks = 3;
  v1::HeartbeatReply reply;
  *reply.mutable_placement() = PlacementToProto(wrong, 7);
  coordinator_.set_heartbeat_reply(reply);
  auto loop = MakeLoop();
  EXPECT_TRUE(loop->Beat().ok());
  absl::SleepFor(absl::Milliseconds(20));
  EXPECT_EQ(cluster_->runtime(0).Status().placement_epoch, 1u);
  EXPECT_TRUE(cluster_->runtime(0).Status().ready);
}

TEST_F(HeartbeatTest, ShutdownFromCoordinatorStopsOnce) {
  v1::HeartbeatReply reply;
  reply.set_shutdown(true);
  coordinator_.set_heartbeat_reply(reply);
  auto loop = MakeLoop();
  loop->Start();
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  while (stops() == 0 && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(5));
  absl::SleepFor(absl::Milliseconds(50));
  loop->Stop();
  absl::MutexLock lock(&mu_);
  EXPECT_EQ(stops_, 1);
  EXPECT_TRUE(stop_status_.ok());
}

TEST_F(HeartbeatTest, UnreachableCoordinatorStopsAfterMaxMissed) {
  coordinator_.set_heartbeat_status(absl::UnavailableError("connection refused"));
  auto loop = MakeLoop(/*max_missed=*/2);
  EXPECT_FALSE(loop->Beat().ok());
  EXPECT_FALSE(loop->Beat().ok());
  {
    absl::MutexLock lock(&mu_);
    EXPECT_EQ(stops_, 0);  // two misses are tolerated
  }
  EXPECT_FALSE(loop->Beat().ok());
  absl::MutexLock lock(&mu_);
  EXPECT_EQ(stops_, 1);
  EXPECT_EQ(stop_status_.code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(std::string(stop_status_.message()), HasSubstr("coordinator unreachable for 3 heartbeats"));
}

// A coordinator that answers NOT_FOUND restarted: the worker is asked to
// register again (with the time the heartbeat was sent), and such answers do
// not count toward the unreachable limit.
TEST_F(HeartbeatTest, AnUnknownWorkerIsAskedToRegisterAgain) {
  coordinator_.set_heartbeat_status(
      absl::NotFoundError("rank 0 is not held by worker host:1:abc; register again"));
  std::vector<absl::Time> asked;
  HeartbeatLoop loop(&coordinator_, &cluster_->runtime(0), loader_.get(),
                     HeartbeatOptions{.worker_id = "host:1:abc", .rank = 0,
                                      .interval = absl::Milliseconds(10), .max_missed = 1},
                     [this](absl::Status why) {
                       absl::MutexLock lock(&mu_);
                       ++stops_;
                     },
                     nullptr, [&asked](absl::Time sent) { asked.push_back(sent); });
  const absl::Time before = absl::Now();
  for (int i = 0; i < 4; ++i) EXPECT_EQ(loop.Beat().code(), absl::StatusCode::kNotFound);
  ASSERT_EQ(asked.size(), 4u);
  EXPECT_GE(asked[0], before);
  EXPECT_EQ(stops(), 0) << "a coordinator that answers is not unreachable";
}

}  // namespace
}  // namespace joule::worker
