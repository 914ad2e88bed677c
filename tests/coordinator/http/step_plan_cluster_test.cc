// The scheduler's step plans end to end: ScheduledBackend and the Router in
// front of a real worker (WorkerGrpcService over a WorkerRuntime on the tiny
// model) over gRPC on ephemeral ports. Under the priority policy with one
// running sequence per rank, a fast request that arrives while a batch request
// decodes takes its place: the batch request is preempted and sits out every
// step of the fast one, then resumes with the output it would have had anyway.
// Without plans the batch request keeps decoding in the fast request's steps.
// Step composition is read from the order in which the worker's step loop
// produced tokens, not from when they reached the coordinator.
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "coordinator/cluster/fake_clock.h"
#include "coordinator/cluster/grpc_worker_client.h"
#include "coordinator/cluster/model_summary.h"
#include "coordinator/http/scheduled_backend.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "tests/worker/service/runtime_cluster.h"
#include "worker/service/worker_grpc_service.h"

namespace joule::http {
namespace {

using worker::testing_util::Greedy;
using worker::testing_util::Prompt;
using worker::testing_util::ReferenceTokens;
using worker::testing_util::RuntimeCluster;

constexpr char kFingerprint[] = "fnv1a64:0123456789abcdef";

// What each request's client received, and its outcome.
class ArrivalLog {
 public:
  class Sink final : public cluster::GenerateSink {
   public:
    Sink(ArrivalLog* log, std::string id) : log_(log), id_(std::move(id)) {}
    bool Write(const v1::GenerateResponse& response) override {
      absl::MutexLock lock(&log_->mu_);
      for (int32_t t : response.token_ids()) log_->tokens_[id_].push_back(t);
      return true;
    }
    bool ClientGone() const override { return false; }

   private:
    ArrivalLog* const log_;
    const std::string id_;
  };

  std::function<void(absl::Status)> Done(const std::string& id) {
    return [this, id](absl::Status s) {
      absl::MutexLock lock(&mu_);
      outcomes_[id] = std::move(s);
    };
  }
  bool WaitDone(const std::string& id) {
    absl::MutexLock lock(&mu_);
    auto done = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return outcomes_.contains(id); };
    return mu_.AwaitWithTimeout(absl::Condition(&done), absl::Seconds(60));
  }
  bool WaitTokens(const std::string& id, size_t n) {
    absl::MutexLock lock(&mu_);
    auto enough = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return tokens_[id].size() >= n; };
    return mu_.AwaitWithTimeout(absl::Condition(&enough), absl::Seconds(60));
  }
  absl::Status outcome(const std::string& id) {
    absl::MutexLock lock(&mu_);
    return outcomes_[id];
  }
  std::vector<int32_t> tokens(const std::string& id) {
    absl::MutexLock lock(&mu_);
    return tokens_[id];
  }

 private:
  absl::Mutex mu_;
  std::map<std::string, std::vector<int32_t>> tokens_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, absl::Status> outcomes_ ABSL_GUARDED_BY(mu_);
};

// The worker's handler with a log of the order in which its step loop
// produced tokens (step by step), by request: the n-th request to arrive is
// named names[n].
class ProductionLog final : public worker::WorkerHandler {
 public:
  ProductionLog(worker::WorkerHandler* runtime, std::vector<std::string> names)
      : runtime_(runtime), names_(std::move(names)) {}

  absl::Status Submit(const std::string& request_id, GenerationRequest request,
                      worker::RequestCallbacks callbacks) override {
    std::string name;
    {
      absl::MutexLock lock(&mu_);
      name = arrivals_ < names_.size() ? names_[arrivals_] : request_id;
      ++arrivals_;
    }
    auto on_tokens = std::move(callbacks.on_tokens);
    callbacks.on_tokens = [this, name, on_tokens](const worker::TokenUpdate& update) {
      {
        absl::MutexLock lock(&mu_);
        events_.insert(events_.end(), update.tokens.size(), name);
      }
      on_tokens(update);
    };
    return runtime_->Submit(request_id, std::move(request), std::move(callbacks));
  }
  bool Cancel(const std::string& request_id) override { return runtime_->Cancel(request_id); }
  worker::WorkerStatus Status() override { return runtime_->Status(); }
  void SetStepPlan(worker::StepPlan plan, worker::StepPlanDone done) override {
    runtime_->SetStepPlan(std::move(plan), std::move(done));
  }

  int First(const std::string& name) { return Find(name, true); }
  int Last(const std::string& name) { return Find(name, false); }
  // Tokens of `name` produced strictly between positions `from` and `to`.
  int Between(const std::string& name, int from, int to) {
    absl::MutexLock lock(&mu_);
    int n = 0;
    for (int i = from + 1; i < to && i < static_cast<int>(events_.size()); ++i) {
      n += events_[i] == name;
    }
    return n;
  }

 private:
  int Find(const std::string& name, bool first) {
    absl::MutexLock lock(&mu_);
    int found = -1;
    for (int i = 0; i < static_cast<int>(events_.size()); ++i) {
      if (events_[i] != name) continue;
      found = i;
      if (first) break;
    }
    return found;
  }

  worker::WorkerHandler* const runtime_;
  const std::vector<std::string> names_;
  absl::Mutex mu_;
  size_t arrivals_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<std::string> events_ ABSL_GUARDED_BY(mu_);
};

class StepPlanClusterTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = testing::TinyModelDir("qwen3_moe-tiny");
    // The worker.
    worker_cluster_ = std::make_unique<RuntimeCluster>(dir_, 1, absl::Seconds(20));
    worker_cluster_->StartAll();
    production_ = std::make_unique<ProductionLog>(&worker_cluster_->runtime(0),
                                                  std::vector<std::string>{"batch", "fast"});
    service_ = std::make_unique<worker::WorkerGrpcService>(production_.get());
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    builder.RegisterService(service_.get());
    server_ = builder.BuildAndStart();
    ASSERT_NE(server_, nullptr);

    // The coordinator: membership with the worker as its one ready rank.
    absl::StatusOr<cluster::ModelSummary> model = cluster::ReadModelSummary(dir_);
    ASSERT_TRUE(model.ok()) << model.status();
    membership_ = *cluster::Membership::Create({.world_size = 1,
                                                .model_dir = dir_,
                                                .model_fingerprint = kFingerprint,
                                                .heartbeat_interval = absl::Milliseconds(500)},
                                               *model, &clock_);
    v1::RegisterRequest req;
    req.set_protocol_version(v1::PROTOCOL_VERSION_1);
    req.set_model_fingerprint(kFingerprint);
    req.set_requested_rank(0);
    req.set_worker_id("w0");
    req.set_transport(v1::TRANSPORT_KIND_UCX);
    req.set_worker_endpoint("127.0.0.1:" + std::to_string(port));
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
  }
  void StartScheduler(scheduler::PolicyKind policy) {
    scheduler::SchedulerConfig config;
    config.policy = policy;
    config.max_running = 1;  // a fast request needs the batch request's slot
    auto s = scheduler::Scheduler::Create(std::move(config), &real_clock_);
    ASSERT_TRUE(s.ok()) << s.status();
    scheduler_ = *std::move(s);
    backend_ =
        std::make_unique<ScheduledBackend>(router_.get(), membership_.get(), scheduler_.get());
  }
  void TearDown() override {
    if (backend_) backend_->Shutdown();
    router_.reset();
    backend_.reset();
    server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
    worker_cluster_->runtime(0).Stop("test over");
    worker_cluster_->runtime(0).Join();
  }

  void Submit(const std::string& id, const std::string& tier, const std::vector<int32_t>& prompt,
              int max_tokens) {
    prompts_[id] = prompt;
    max_tokens_[id] = max_tokens;
    v1::GenerateRequest r;
    r.set_request_id(id);
    r.set_service_tier(tier);
    r.mutable_prompt_token_ids()->Add(prompt.begin(), prompt.end());
    r.mutable_sampling()->set_temperature(0);
    r.mutable_sampling()->set_max_tokens(max_tokens);
    r.mutable_sampling()->set_ignore_eos(true);
    backend_->GenerateAsync(r, absl::Now() + absl::Minutes(1),
                            std::make_shared<ArrivalLog::Sink>(&log_, id), log_.Done(id));
  }
  void ExpectUnchanged(const std::string& id) {
    EXPECT_TRUE(log_.outcome(id).ok()) << id << ": " << log_.outcome(id);
    EXPECT_EQ(log_.tokens(id), ReferenceTokens(dir_, prompts_[id], Greedy(max_tokens_[id]))) << id;
  }

  std::string dir_;
  std::unique_ptr<ProductionLog> production_;
  std::unique_ptr<RuntimeCluster> worker_cluster_;
  std::unique_ptr<worker::WorkerGrpcService> service_;
  std::unique_ptr<grpc::Server> server_;

  cluster::FakeClock clock_;  // membership: heartbeats never expire
  scheduler::RealClock real_clock_;
  cluster::GrpcWorkerClientFactory clients_;
  std::unique_ptr<cluster::Membership> membership_;
  std::unique_ptr<scheduler::Scheduler> scheduler_;
  std::unique_ptr<ScheduledBackend> backend_;
  std::unique_ptr<cluster::Router> router_;
  ArrivalLog log_;
  std::map<std::string, std::vector<int32_t>> prompts_;
  std::map<std::string, int> max_tokens_;
};

TEST_F(StepPlanClusterTest, BatchRequestSitsOutTheFastRequestsSteps) {
  StartScheduler(scheduler::PolicyKind::kPriority);
  // Long enough to still decode when the fast request is done.
  Submit("batch", "flex", Prompt(12, 1), 480);
  ASSERT_TRUE(log_.WaitTokens("batch", 2));  // running, as the scheduler knows too
  Submit("fast", "fast", Prompt(9, 2), 24);
  ASSERT_TRUE(log_.WaitDone("fast"));
  ASSERT_TRUE(log_.WaitDone("batch"));

  ProductionLog& steps = *production_;
  ASSERT_LT(steps.Last("fast"), steps.Last("batch"))
      << "the batch request ended before the fast one: the test needs it to run longer";
  EXPECT_EQ(steps.Between("batch", steps.First("fast"), steps.Last("fast")), 0)
      << "the batch request decoded in the fast request's steps";
  ExpectUnchanged("batch");
  ExpectUnchanged("fast");
  EXPECT_GE(worker_cluster_->runtime(0).Status().scheduler_preemptions_total, 1u);
}

}  // namespace
}  // namespace joule::http
