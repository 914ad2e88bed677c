// Step plans (Worker.SetStepPlan) over a real server on an ephemeral port: a
// plan's preemptions preempt running requests whose output stays the same, its
// order decides who is admitted first (also for requests that arrive after
// it), its max_running holds, and stale plans and unknown ids change nothing.
// Tokens are logged in the order the step loop delivers them, so every
// assertion is about step composition, not timing.
#include <map>
#include <string>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "gmock/gmock.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "tests/worker/service/runtime_cluster.h"
#include "worker/service/starting_handler.h"
#include "worker/service/worker_grpc_service.h"

namespace joule::worker {
namespace {

using ::testing::HasSubstr;
using testing_util::Greedy;
using testing_util::Prompt;
using testing_util::ReferenceTokens;
using testing_util::RuntimeCluster;

// Every token of every request, in the order the step loop delivered them.
class TokenLog {
 public:
  RequestCallbacks Callbacks(const std::string& id) {
    return RequestCallbacks{
        .on_tokens =
            [this, id](const TokenUpdate& update) {
              absl::MutexLock lock(&mu_);
              for (int32_t t : update.tokens) {
                events_.push_back(id);
                tokens_[id].push_back(t);
              }
            },
        .on_done =
            [this, id](const RequestOutcome& outcome) {
              absl::MutexLock lock(&mu_);
              outcomes_[id] = outcome;
            },
    };
  }
  bool WaitDone(const std::string& id, absl::Duration timeout = absl::Seconds(60)) {
    absl::MutexLock lock(&mu_);
    auto done = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return outcomes_.contains(id); };
    return mu_.AwaitWithTimeout(absl::Condition(&done), timeout);
  }
  bool WaitTokens(const std::string& id, size_t n, absl::Duration timeout = absl::Seconds(60)) {
    absl::MutexLock lock(&mu_);
    auto enough = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return tokens_[id].size() >= n; };
    return mu_.AwaitWithTimeout(absl::Condition(&enough), timeout);
  }
  std::vector<int32_t> tokens(const std::string& id) {
    absl::MutexLock lock(&mu_);
    return tokens_[id];
  }
  RequestOutcome outcome(const std::string& id) {
    absl::MutexLock lock(&mu_);
    return outcomes_[id];
  }
  // Index in the delivery order of `id`'s first / last token; -1 if none.
  int First(const std::string& id) const { return Find(id, true); }
  int Last(const std::string& id) const { return Find(id, false); }
  // Tokens of `id` delivered strictly between positions `from` and `to`.
  int Between(const std::string& id, int from, int to) const {
    absl::MutexLock lock(&mu_);
    int n = 0;
    for (int i = from + 1; i < to && i < static_cast<int>(events_.size()); ++i) {
      n += events_[i] == id;
    }
    return n;
  }

 private:
  int Find(const std::string& id, bool first) const {
    absl::MutexLock lock(&mu_);
    int found = -1;
    for (int i = 0; i < static_cast<int>(events_.size()); ++i) {
      if (events_[i] != id) continue;
      found = i;
      if (first) break;
    }
    return found;
  }

  mutable absl::Mutex mu_;
  std::vector<std::string> events_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, std::vector<int32_t>> tokens_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, RequestOutcome> outcomes_ ABSL_GUARDED_BY(mu_);
};

class StepPlanTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = testing::TinyModelDir("qwen3_moe-tiny");
    service_ = std::make_unique<WorkerGrpcService>(&handler_);
    grpc::ServerBuilder builder;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port_);
    builder.RegisterService(service_.get());
    server_ = builder.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    stub_ = v1::Worker::NewStub(grpc::CreateChannel("127.0.0.1:" + std::to_string(port_),
                                                    grpc::InsecureChannelCredentials()));
  }
  void TearDown() override {
    if (cluster_) cluster_->runtime(0).Stop("test over");
    if (cluster_) cluster_->runtime(0).Join();
    server_->Shutdown();
    cluster_.reset();
  }
  void StartRuntime() {
    cluster_ = std::make_unique<RuntimeCluster>(dir_, 1, absl::Seconds(20));
    cluster_->StartAll();
    handler_.set_runtime(&cluster_->runtime(0));
  }
  WorkerRuntime& runtime() { return cluster_->runtime(0); }

  // SetStepPlan over gRPC: how many the worker preempted, or the error.
  absl::StatusOr<int> Plan(uint64_t sequence, const std::vector<std::string>& order,
                           const std::vector<std::string>& preempt, int max_running = 0) {
    v1::StepPlanRequest request;
    request.set_sequence(sequence);
    for (const std::string& id : order) request.add_order(id);
    for (const std::string& id : preempt) request.add_preempt(id);
    request.set_max_running(max_running);
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(20));
    v1::StepPlanReply reply;
    const grpc::Status s = stub_->SetStepPlan(&ctx, request, &reply);
    if (!s.ok()) {
      return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
    }
    return reply.preempted();
  }

  void Submit(const std::string& id, const std::vector<int32_t>& prompt, int max_tokens) {
    prompts_[id] = prompt;
    max_tokens_[id] = max_tokens;
    ASSERT_TRUE(runtime().Submit(id, {.prompt = prompt, .sampling = Greedy(max_tokens)},
                                 log_.Callbacks(id)).ok());
  }
  // Waits until `n` requests wait for admission in the engine.
  bool WaitWaiting(int n) {
    const absl::Time give_up = absl::Now() + absl::Seconds(30);
    while (absl::Now() < give_up) {
      if (runtime().Status().waiting == n) return true;
      absl::SleepFor(absl::Microseconds(200));
    }
    return false;
  }
  // The request's output equals a run of its own (greedy: the same tokens).
  void ExpectUnchanged(const std::string& id) {
    EXPECT_TRUE(log_.outcome(id).status.ok()) << id << ": " << log_.outcome(id).status;
    EXPECT_EQ(log_.tokens(id), ReferenceTokens(dir_, prompts_[id], Greedy(max_tokens_[id]))) << id;
  }

  std::string dir_;
  StartingHandler handler_;
  std::unique_ptr<RuntimeCluster> cluster_;
  std::unique_ptr<WorkerGrpcService> service_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<v1::Worker::Stub> stub_;
  int port_ = 0;
  TokenLog log_;
  std::map<std::string, std::vector<int32_t>> prompts_;
  std::map<std::string, int> max_tokens_;
};

TEST_F(StepPlanTest, RefusedBeforeTheRuntimeStartsAndWithoutASequence) {
  absl::StatusOr<int> early = Plan(1, {}, {});
  EXPECT_EQ(early.status().code(), absl::StatusCode::kUnavailable) << early.status();
  EXPECT_THAT(early.status().message(), HasSubstr("starting"));
  StartRuntime();
  absl::StatusOr<int> zero = Plan(0, {}, {});
  EXPECT_EQ(zero.status().code(), absl::StatusCode::kInvalidArgument) << zero.status();
  EXPECT_THAT(zero.status().message(), HasSubstr("sequence"));
  absl::StatusOr<int> negative = Plan(1, {}, {}, -1);
  EXPECT_EQ(negative.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(negative.status().message(), HasSubstr("max_running"));
  EXPECT_EQ(Plan(1, {}, {}).value_or(-1), 0);
}

// The batch request runs alone (max_running 1); the fast one arrives and
// waits. The plan preempts the batch one: the fast request runs to its end
// with no batch token in between, then the batch request resumes, and its
// output is what it would have been without the preemption.
TEST_F(StepPlanTest, PreemptLetsTheListedRequestRunAloneAndTheOutputIsUnchanged) {
  StartRuntime();
  ASSERT_EQ(Plan(1, {}, {}, /*max_running=*/1).value_or(-1), 0);
  Submit("batch", Prompt(12, 1), 400);
  ASSERT_TRUE(log_.WaitTokens("batch", 2));
  Submit("fast", Prompt(9, 2), 6);
  ASSERT_TRUE(WaitWaiting(1)) << "the fast request should wait: one running sequence at most";
  const uint64_t preemptions = runtime().Status().preemptions_total;

  EXPECT_EQ(Plan(2, {"fast", "batch"}, {"batch"}, 1).value_or(-1), 1);
  ASSERT_TRUE(log_.WaitDone("fast"));
  ASSERT_TRUE(log_.WaitDone("batch"));

  EXPECT_LT(log_.Last("fast"), log_.Last("batch")) << "the fast request waited for the batch one";
  EXPECT_EQ(log_.Between("batch", log_.First("fast"), log_.Last("fast")), 0)
      << "batch tokens in the fast request's steps";
  ExpectUnchanged("batch");
  ExpectUnchanged("fast");
  const WorkerStatus status = runtime().Status();
  EXPECT_EQ(status.preemptions_total, preemptions + 1);
  EXPECT_EQ(status.scheduler_preemptions_total, 1u);
}

// One running sequence at a time: the plan's order, not arrival, decides
// which waiting request is admitted when the running one ends.
TEST_F(StepPlanTest, OrderDecidesWhoIsAdmittedFirst) {
  StartRuntime();
  ASSERT_EQ(Plan(1, {}, {}, 1).value_or(-1), 0);
  Submit("long", Prompt(10, 3), 400);
  ASSERT_TRUE(log_.WaitTokens("long", 2));
  Submit("first-come", Prompt(8, 4), 4);
  Submit("listed", Prompt(8, 5), 4);
  ASSERT_TRUE(WaitWaiting(2));
  EXPECT_EQ(Plan(2, {"listed"}, {}, 1).value_or(-1), 0);
  for (const char* id : {"long", "first-come", "listed"}) ASSERT_TRUE(log_.WaitDone(id)) << id;
  EXPECT_LT(log_.Last("listed"), log_.First("first-come"));
  EXPECT_EQ(runtime().Status().preemptions_total, 0u);
  ExpectUnchanged("listed");
}

// A plan may overtake the requests it names: its order applies to them when
// they arrive.
TEST_F(StepPlanTest, OrderNamingRequestsNotYetArrivedAppliesWhenTheyDo) {
  StartRuntime();
  ASSERT_EQ(Plan(1, {"listed"}, {}, 1).value_or(-1), 0);
  Submit("long", Prompt(10, 3), 400);
  ASSERT_TRUE(log_.WaitTokens("long", 2));
  Submit("first-come", Prompt(8, 4), 4);
  Submit("listed", Prompt(8, 5), 4);
  for (const char* id : {"long", "first-come", "listed"}) ASSERT_TRUE(log_.WaitDone(id)) << id;
  EXPECT_LT(log_.Last("listed"), log_.First("first-come"));
}

TEST_F(StepPlanTest, StalePlansAndUnknownIdsChangeNothing) {
  StartRuntime();
  ASSERT_EQ(Plan(5, {}, {}).value_or(-1), 0);
  Submit("r", Prompt(12, 6), 60);
  ASSERT_TRUE(log_.WaitTokens("r", 2));
  EXPECT_EQ(Plan(3, {}, {"r"}).value_or(-1), 0) << "an older plan was applied";
  EXPECT_EQ(Plan(5, {}, {"r"}).value_or(-1), 0) << "a plan as old as the one held was applied";
  EXPECT_EQ(Plan(6, {"nobody"}, {"nobody-either"}).value_or(-1), 0);
  ASSERT_TRUE(log_.WaitDone("r"));
  ExpectUnchanged("r");
  const WorkerStatus status = runtime().Status();
  EXPECT_EQ(status.preemptions_total, 0u);
  EXPECT_EQ(status.scheduler_preemptions_total, 0u);
}

}  // namespace
}  // namespace joule::worker
