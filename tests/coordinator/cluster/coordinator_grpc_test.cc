// The coordinator over real gRPC on port 0: workers are tiny in-test Worker
// services, clients are Frontend stubs.
#include <atomic>
#include <map>
#include <thread>

#include <grpcpp/grpcpp.h>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "common/model_fingerprint.h"
#include "coordinator/cluster/coordinator_server.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "proto/joule/v1/cluster.grpc.pb.h"
#include "proto/joule/v1/generate.grpc.pb.h"
#include "tests/coordinator/cluster/test_model.h"

namespace joule::cluster {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

std::chrono::system_clock::time_point In(absl::Duration d) {
  return absl::ToChronoTime(absl::Now() + d);
}

// A worker's gRPC side, reduced to what the coordinator calls: Generate emits
// token ids prompt_len, prompt_len+1, ... one per message. In "hold" mode it
// emits one token and then waits until its call is cancelled.
class TestWorker final : public v1::Worker::Service {
 public:
  grpc::Status Generate(grpc::ServerContext* context, const v1::GenerateRequest* request,
                        grpc::ServerWriter<v1::GenerateResponse>* writer) override {
    ++calls_;
    {
      absl::MutexLock lock(&mu_);
      request_ids_.push_back(request->request_id());
    }
    const int n = request->sampling().max_tokens();
    for (int i = 0; i < n; ++i) {
      v1::GenerateResponse r;
      r.set_request_id(request->request_id());
      r.add_token_ids(request->prompt_token_ids_size() + i);
      if (i + 1 == n) {
        r.set_finish_reason(v1::FINISH_REASON_LENGTH);
        r.set_prompt_tokens(request->prompt_token_ids_size());
        r.set_completion_tokens(n);
      }
      if (!writer->Write(r)) return grpc::Status(grpc::StatusCode::CANCELLED, "client gone");
      if (hold_) {
        const absl::Time give_up = absl::Now() + absl::Seconds(20);
        while (!context->IsCancelled() && absl::Now() < give_up) absl::SleepFor(absl::Milliseconds(5));
        saw_cancel_ = context->IsCancelled();
        return grpc::Status(grpc::StatusCode::CANCELLED, "cancelled");
      }
    }
    return grpc::Status::OK;
  }
  grpc::Status Status(grpc::ServerContext*, const v1::WorkerStatusRequest*,
                      v1::WorkerStatusReply* reply) override {
    reply->set_ready(true);
    return grpc::Status::OK;
  }

  grpc::Status SetStepPlan(grpc::ServerContext*, const v1::StepPlanRequest* request,
                           v1::StepPlanReply* reply) override {
    absl::MutexLock lock(&mu_);
    plans_.push_back(*request);
    reply->set_preempted(request->preempt_size());
    return grpc::Status::OK;
  }
  std::vector<std::string> request_ids() {
    absl::MutexLock lock(&mu_);
    return request_ids_;
  }
  std::vector<v1::StepPlanRequest> plans() {
    absl::MutexLock lock(&mu_);
    return plans_;
  }

  std::atomic<bool> hold_{false};
  std::atomic<bool> saw_cancel_{false};
  std::atomic<int> calls_{0};

 private:
  absl::Mutex mu_;
  std::vector<std::string> request_ids_ ABSL_GUARDED_BY(mu_);  // as Generate saw them
  std::vector<v1::StepPlanRequest> plans_ ABSL_GUARDED_BY(mu_);
};

class TestWorkerServer {
 public:
  TestWorkerServer() {
    grpc::ServerBuilder b;
    b.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port_);
    b.RegisterService(&service_);
    server_ = b.BuildAndStart();
  }
  ~TestWorkerServer() { Kill(); }
  std::string endpoint() const { return absl::StrCat("127.0.0.1:", port_); }
  void Kill() {
    if (server_) server_->Shutdown(std::chrono::system_clock::now());
    server_.reset();
  }
  TestWorker service_;

 private:
  int port_ = 0;
  std::unique_ptr<grpc::Server> server_;
};

class CoordinatorGrpcTest : public ::testing::Test {
 protected:
  void Start(int workers, int heartbeat_ms = 500) {
    CoordinatorOptions o;
    o.model = model_.path();
    o.workers = workers;
    o.host = "127.0.0.1";
    o.port = 0;
    o.heartbeat_ms = heartbeat_ms;
    auto s = CoordinatorServer::Start(o);
    ASSERT_TRUE(s.ok()) << s.status();
    server_ = *std::move(s);
    ASSERT_GT(server_->port(), 0);
    auto channel = grpc::CreateChannel(absl::StrCat("127.0.0.1:", server_->port()),
                                       grpc::InsecureChannelCredentials());
    coordinator_ = v1::Coordinator::NewStub(channel);
    frontend_ = v1::Frontend::NewStub(channel);
  }
  void TearDown() override {
    StopHeartbeats();
    if (server_) server_->Stop();
  }

  v1::RegisterRequest WorkerRequest(const std::string& id, const std::string& endpoint) {
    v1::RegisterRequest r;
    r.set_protocol_version(v1::PROTOCOL_VERSION_1);
    r.set_model_fingerprint(*ModelFingerprint(model_.path()));
    r.set_requested_rank(-1);
    r.set_worker_id(id);
    r.set_transport(v1::TRANSPORT_KIND_UCX);
    r.set_transport_address("addr-" + id);
    r.set_worker_endpoint(endpoint);
    return r;
  }
  grpc::Status Register(const v1::RegisterRequest& r, v1::RegisterReply* reply) {
    grpc::ClientContext ctx;
    ctx.set_deadline(In(absl::Seconds(5)));
    return coordinator_->Register(&ctx, r, reply);
  }
  // Registers and heartbeats "ready" every 20 ms until StopHeartbeats().
  void JoinAndBeat(const std::string& id, const std::string& endpoint) {
    v1::RegisterReply reply;
    grpc::Status s = Register(WorkerRequest(id, endpoint), &reply);
    ASSERT_TRUE(s.ok()) << s.error_message();
    const int rank = reply.rank();
    secrets_[id] = reply.worker_secret();
    beats_.emplace_back([this, id, rank, secret = reply.worker_secret()] {
      while (!stop_beats_.HasBeenNotified()) {
        v1::HeartbeatRequest hb;
        hb.set_worker_id(id);
        hb.set_worker_secret(secret);
        hb.set_rank(rank);
        hb.set_ready(true);
        hb.set_placement_epoch(1);
        grpc::ClientContext ctx;
        ctx.set_deadline(In(absl::Seconds(2)));
        v1::HeartbeatReply reply;
        coordinator_->Heartbeat(&ctx, hb, &reply);
        stop_beats_.WaitForNotificationWithTimeout(absl::Milliseconds(20));
      }
    });
  }
  void StopHeartbeats() {
    if (!stop_beats_.HasBeenNotified()) stop_beats_.Notify();
    for (auto& t : beats_) t.join();
    beats_.clear();
  }
  void WaitForState(int rank, const std::string& state) {
    const absl::Time give_up = absl::Now() + absl::Seconds(10);
    while (absl::Now() < give_up) {
      v1::ClusterStatusReply st = Status();
      if (st.ranks(rank).state() == state) return;
      absl::SleepFor(absl::Milliseconds(10));
    }
    FAIL() << "rank " << rank << " never became " << state;
  }
  v1::ClusterStatusReply Status() {
    grpc::ClientContext ctx;
    ctx.set_deadline(In(absl::Seconds(5)));
    v1::ClusterStatusReply reply;
    EXPECT_TRUE(frontend_->ClusterStatus(&ctx, v1::ClusterStatusRequest(), &reply).ok());
    return reply;
  }
  v1::GenerateRequest Request(int max_tokens) {
    v1::GenerateRequest r;
    r.add_prompt_token_ids(1);
    r.add_prompt_token_ids(2);
    r.mutable_sampling()->set_max_tokens(max_tokens);
    return r;
  }

  testing::TinyModelDir model_;
  std::unique_ptr<CoordinatorServer> server_;
  std::unique_ptr<v1::Coordinator::Stub> coordinator_;
  std::unique_ptr<v1::Frontend::Stub> frontend_;
  absl::Notification stop_beats_;
  std::vector<std::thread> beats_;
  std::map<std::string, std::string> secrets_;  // RegisterReply.worker_secret by worker id
};

TEST_F(CoordinatorGrpcTest, BadRegistrationsAreRefusedWithClearMessages) {
  Start(1);
  TestWorkerServer w;
  v1::RegisterReply reply;

  v1::RegisterRequest wrong_model = WorkerRequest("w-a", w.endpoint());
  wrong_model.set_model_fingerprint("fnv1a64:00000000deadbeef");
  grpc::Status s = Register(wrong_model, &reply);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(s.error_message(), HasSubstr("model fingerprint does not match the coordinator's model"));
  // The reason only: the coordinator's fingerprint and model path stay in its log.
  EXPECT_THAT(s.error_message(), Not(HasSubstr("fnv1a64:")));
  EXPECT_THAT(s.error_message(), Not(HasSubstr(model_.path())));

  v1::RegisterRequest old_version = WorkerRequest("w-a", w.endpoint());
  old_version.set_protocol_version(v1::PROTOCOL_VERSION_UNSPECIFIED);
  s = Register(old_version, &reply);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(s.error_message(), HasSubstr("protocol_version"));

  ASSERT_TRUE(Register(WorkerRequest("w-a", w.endpoint()), &reply).ok());
  EXPECT_EQ(reply.rank(), 0);
  EXPECT_EQ(reply.world_size(), 1);
  EXPECT_EQ(reply.placement().epoch(), 1u);

  v1::RegisterRequest duplicate = WorkerRequest("w-b", "127.0.0.1:1");
  duplicate.set_requested_rank(0);
  s = Register(duplicate, &reply);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::ALREADY_EXISTS);
  EXPECT_EQ(s.error_message(), "rank 0 is taken");
  EXPECT_THAT(s.error_message(), Not(HasSubstr(w.endpoint())));

  s = Register(WorkerRequest("w-c", "127.0.0.1:2"), &reply);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_THAT(s.error_message(), HasSubstr("cluster is full"));
}

TEST_F(CoordinatorGrpcTest, RendezvousAndGenerateRelay) {
  Start(2);
  TestWorkerServer w0, w1;
  JoinAndBeat("w0", w0.endpoint());
  JoinAndBeat("w1", w1.endpoint());

  grpc::ClientContext rctx;
  rctx.set_deadline(In(absl::Seconds(5)));
  v1::RendezvousRequest rreq;
  rreq.set_worker_id("w0");
  rreq.set_worker_secret(secrets_["w0"]);
  rreq.set_rank(0);
  v1::RendezvousReply rreply;
  ASSERT_TRUE(coordinator_->Rendezvous(&rctx, rreq, &rreply).ok());
  ASSERT_EQ(rreply.peers_size(), 2);
  EXPECT_EQ(rreply.peers(1).transport_address(), "addr-w1");
  EXPECT_EQ(rreply.peers(1).worker_endpoint(), w1.endpoint());

  WaitForState(0, "ready");
  WaitForState(1, "ready");
  grpc::ClientContext ctx;
  ctx.set_deadline(In(absl::Seconds(10)));
  auto reader = frontend_->Generate(&ctx, Request(3));
  std::vector<int> tokens;
  v1::GenerateResponse r, last;
  while (reader->Read(&r)) {
    for (int id : r.token_ids()) tokens.push_back(id);
    last = r;
  }
  grpc::Status s = reader->Finish();
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(tokens, (std::vector<int>{2, 3, 4}));
  EXPECT_EQ(last.finish_reason(), v1::FINISH_REASON_LENGTH);
  EXPECT_EQ(last.completion_tokens(), 3);
  EXPECT_EQ(w0.service_.calls_ + w1.service_.calls_, 1);
}

TEST_F(CoordinatorGrpcTest, InvalidRequestAndNoReadyWorker) {
  Start(1);
  grpc::ClientContext c1;
  c1.set_deadline(In(absl::Seconds(5)));
  auto reader = frontend_->Generate(&c1, Request(0));
  v1::GenerateResponse r;
  EXPECT_FALSE(reader->Read(&r));
  grpc::Status s = reader->Finish();
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("sampling.max_tokens"));

  grpc::ClientContext c2;
  c2.set_deadline(In(absl::Seconds(5)));
  reader = frontend_->Generate(&c2, Request(2));
  EXPECT_FALSE(reader->Read(&r));
  s = reader->Finish();
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_THAT(s.error_message(), HasSubstr("no worker is ready"));
}

TEST_F(CoordinatorGrpcTest, ClientCancellationReachesTheWorker) {
  Start(1);
  TestWorkerServer w;
  w.service_.hold_ = true;
  JoinAndBeat("w0", w.endpoint());
  WaitForState(0, "ready");

  grpc::ClientContext ctx;
  ctx.set_deadline(In(absl::Seconds(30)));
  auto reader = frontend_->Generate(&ctx, Request(5));
  v1::GenerateResponse r;
  ASSERT_TRUE(reader->Read(&r));  // the worker is now holding the sequence
  const absl::Time cancelled_at = absl::Now();
  ctx.TryCancel();
  EXPECT_FALSE(reader->Read(&r));
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  const absl::Time give_up = absl::Now() + absl::Seconds(10);
  while (!w.service_.saw_cancel_ && absl::Now() < give_up) absl::SleepFor(absl::Milliseconds(5));
  EXPECT_TRUE(w.service_.saw_cancel_) << "the worker's call was never cancelled";
  EXPECT_LT(absl::Now() - cancelled_at, absl::Seconds(5));
}

// Router::SendStepPlan over the rank's gRPC channel: the worker hears the
// requests by the ids it knows them by (the coordinator's, not the client's),
// without those not in flight there, and its answer comes back; a worker that
// is gone gives an error, not a hang.
TEST_F(CoordinatorGrpcTest, StepPlansReachTheRankByTheIdsItKnows) {
  Start(1);
  TestWorkerServer w;
  w.service_.hold_ = true;
  JoinAndBeat("w0", w.endpoint());
  WaitForState(0, "ready");
  grpc::ClientContext ctx;
  ctx.set_deadline(In(absl::Seconds(30)));
  v1::GenerateRequest request = Request(5);
  request.set_request_id("client-chose-this");
  auto reader = frontend_->Generate(&ctx, request);
  v1::GenerateResponse r;
  ASSERT_TRUE(reader->Read(&r));  // in flight on rank 0
  ASSERT_EQ(w.service_.request_ids().size(), 1u);
  const std::string worker_id = w.service_.request_ids()[0];
  EXPECT_NE(worker_id, "client-chose-this");

  auto send = [&](const RankStepPlan& plan) {
    absl::Notification answered;
    absl::StatusOr<int> preempted;
    server_->router()->SendStepPlan(0, plan, [&](absl::StatusOr<int> n) {
      preempted = std::move(n);
      answered.Notify();
    });
    EXPECT_TRUE(answered.WaitForNotificationWithTimeout(absl::Seconds(10)));
    return preempted;
  };
  absl::StatusOr<int> preempted = send({.order = {"not-in-flight", "client-chose-this"},
                                        .preempt = {"client-chose-this"},
                                        .max_running = 2});
  ASSERT_TRUE(preempted.ok()) << preempted.status();
  EXPECT_EQ(*preempted, 1);
  const std::vector<v1::StepPlanRequest> plans = w.service_.plans();
  ASSERT_EQ(plans.size(), 1u);
  EXPECT_THAT(plans[0].order(), ::testing::ElementsAre(worker_id));
  EXPECT_THAT(plans[0].preempt(), ::testing::ElementsAre(worker_id));
  EXPECT_EQ(plans[0].max_running(), 2);
  EXPECT_GT(plans[0].sequence(), 0u);
  ASSERT_TRUE(send({.order = {"client-chose-this"}}).ok());
  EXPECT_GT(w.service_.plans().at(1).sequence(), plans[0].sequence());

  ctx.TryCancel();
  while (reader->Read(&r)) {
  }
  reader->Finish();
  w.Kill();
  EXPECT_FALSE(send({}).ok());
}

TEST_F(CoordinatorGrpcTest, KilledWorkerFailsItsRequestAndIsMarkedDead) {
  Start(1, /*heartbeat_ms=*/100);
  TestWorkerServer w;
  w.service_.hold_ = true;
  JoinAndBeat("w0", w.endpoint());
  WaitForState(0, "ready");

  grpc::ClientContext ctx;
  ctx.set_deadline(In(absl::Seconds(30)));
  auto reader = frontend_->Generate(&ctx, Request(5));
  v1::GenerateResponse r;
  ASSERT_TRUE(reader->Read(&r));
  const absl::Time killed_at = absl::Now();
  StopHeartbeats();
  w.Kill();
  while (reader->Read(&r)) {
  }
  grpc::Status s = reader->Finish();
  EXPECT_LT(absl::Now() - killed_at, absl::Seconds(5)) << "the request hung";
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_THAT(s.error_message(), HasSubstr("rank 0"));
  WaitForState(0, "dead");
  v1::ClusterStatusReply st = Status();
  EXPECT_FALSE(st.ranks(0).reason().empty());

  // And the next request is refused with the reason instead of hanging.
  grpc::ClientContext c2;
  c2.set_deadline(In(absl::Seconds(5)));
  auto next = frontend_->Generate(&c2, Request(2));
  EXPECT_FALSE(next->Read(&r));
  s = next->Finish();
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_THAT(s.error_message(), HasSubstr("rank 0 died"));
}

TEST_F(CoordinatorGrpcTest, SilentRankIsMarkedDeadAndItsRequestFailsWithTheReason) {
  Start(1, /*heartbeat_ms=*/100);
  TestWorkerServer w;  // stays reachable: only its heartbeats stop (a hung process)
  w.service_.hold_ = true;
  JoinAndBeat("w0", w.endpoint());
  WaitForState(0, "ready");

  grpc::ClientContext ctx;
  ctx.set_deadline(In(absl::Seconds(30)));
  auto reader = frontend_->Generate(&ctx, Request(5));
  v1::GenerateResponse r;
  ASSERT_TRUE(reader->Read(&r));
  const absl::Time silent_from = absl::Now();
  StopHeartbeats();
  while (reader->Read(&r)) {
  }
  grpc::Status s = reader->Finish();
  EXPECT_LT(absl::Now() - silent_from, absl::Seconds(5)) << "the request hung";
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_THAT(s.error_message(), HasSubstr("rank 0 died: heartbeat lost"));
  v1::ClusterStatusReply st = Status();
  EXPECT_EQ(st.ranks(0).state(), "dead");
  EXPECT_THAT(st.ranks(0).reason(), HasSubstr("heartbeat lost"));
  // Its status probe answered once (late heartbeats?); none came after it.
  EXPECT_THAT(st.ranks(0).reason(), HasSubstr("yet no heartbeat since"));
  // The worker was told to drop the sequence.
  const absl::Time give_up = absl::Now() + absl::Seconds(10);
  while (!w.service_.saw_cancel_ && absl::Now() < give_up) absl::SleepFor(absl::Milliseconds(5));
  EXPECT_TRUE(w.service_.saw_cancel_);
}

TEST_F(CoordinatorGrpcTest, RebalanceBumpsEpochAndReachesWorkersThroughHeartbeats) {
  Start(2);
  v1::RegisterReply reply;
  ASSERT_TRUE(Register(WorkerRequest("w0", "127.0.0.1:1"), &reply).ok());

  grpc::ClientContext ctx;
  ctx.set_deadline(In(absl::Seconds(5)));
  v1::RebalanceRequest req;
  req.set_redundant_experts(2);
  v1::RebalanceReply rb;
  ASSERT_TRUE(frontend_->Rebalance(&ctx, req, &rb).ok());
  EXPECT_EQ(rb.placement_epoch(), 2u);
  EXPECT_EQ(Status().placement_epoch(), 2u);

  v1::HeartbeatRequest hb;
  hb.set_worker_id("w0");
  hb.set_worker_secret(reply.worker_secret());
  hb.set_rank(0);
  hb.set_placement_epoch(1);
  grpc::ClientContext hctx;
  hctx.set_deadline(In(absl::Seconds(5)));
  v1::HeartbeatReply hreply;
  ASSERT_TRUE(coordinator_->Heartbeat(&hctx, hb, &hreply).ok());
  EXPECT_EQ(hreply.placement().epoch(), 2u);
  int replicas = 0;
  for (const auto& e : hreply.placement().layers(0).experts()) replicas += e.ranks_size();
  EXPECT_EQ(replicas, 8 + 2);

  grpc::ClientContext bad;
  bad.set_deadline(In(absl::Seconds(5)));
  req.set_redundant_experts(-1);
  grpc::Status s = frontend_->Rebalance(&bad, req, &rb);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("redundant_experts"));
}

// An operator sees what the scheduler plans each rank within; 0 stays 0
// (unknown: no worker yet, or an older one). Its queue and KV cache use come
// from its last heartbeat.
TEST_F(CoordinatorGrpcTest, StatusCarriesEachRanksEngineLimitsAndLoad) {
  Start(2);
  v1::RegisterRequest w0 = WorkerRequest("w0", "127.0.0.1:1");
  w0.set_requested_rank(0);
  w0.set_max_running(7);
  w0.set_max_batch_tokens(333);
  v1::RegisterReply reply;
  ASSERT_TRUE(Register(w0, &reply).ok());
  v1::ClusterStatusReply st = Status();
  ASSERT_EQ(st.ranks_size(), 2);
  EXPECT_EQ(st.ranks(0).max_running(), 7);
  EXPECT_EQ(st.ranks(0).max_batch_tokens(), 333);
  EXPECT_EQ(st.ranks(0).waiting(), 0);
  EXPECT_EQ(st.ranks(1).max_running(), 0);
  EXPECT_EQ(st.ranks(1).max_batch_tokens(), 0);

  v1::HeartbeatRequest hb;
  hb.set_worker_id("w0");
  hb.set_worker_secret(reply.worker_secret());
  hb.set_rank(0);
  hb.set_placement_epoch(1);
  hb.set_waiting(5);
  hb.set_kv_usage(0.375);
  grpc::ClientContext ctx;
  ctx.set_deadline(In(absl::Seconds(5)));
  v1::HeartbeatReply hreply;
  ASSERT_TRUE(coordinator_->Heartbeat(&ctx, hb, &hreply).ok());
  st = Status();
  EXPECT_EQ(st.ranks(0).waiting(), 5);
  EXPECT_EQ(st.ranks(0).kv_usage(), 0.375);
  EXPECT_EQ(st.ranks(1).waiting(), 0);
  EXPECT_EQ(st.ranks(1).kv_usage(), 0);
}

}  // namespace
}  // namespace joule::cluster
