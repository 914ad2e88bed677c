#include "coordinator/cluster/router.h"

#include <atomic>
#include <map>
#include <thread>

#include "coordinator/cluster/fake_clock.h"
#include "coordinator/cluster/fake_worker_client.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace joule::cluster {
namespace {

using ::testing::HasSubstr;

constexpr char kFingerprint[] = "fnv1a64:0123456789abcdef";

ModelSummary TinySummary() {
  ModelSummary m;
  m.vocab_size = 100;
  m.num_layers = 2;
  m.num_experts = 4;
  m.top_k = 2;
  m.max_context = 64;
  m.moe_layer = {true, true};
  return m;
}

// Collects what the router writes to the client.
class RecordingSink final : public GenerateSink {
 public:
  bool Write(const v1::GenerateResponse& r) override {
    absl::MutexLock lock(&mu_);
    responses_.push_back(r);
    return !refuse_writes_;
  }
  bool ClientGone() const override { return gone_.load(); }
  void set_gone() { gone_ = true; }
  void set_refuse_writes() {
    absl::MutexLock lock(&mu_);
    refuse_writes_ = true;
  }
  std::vector<v1::GenerateResponse> responses() const {
    absl::MutexLock lock(&mu_);
    return responses_;
  }
  size_t count() const {
    absl::MutexLock lock(&mu_);
    return responses_.size();
  }

 private:
  mutable absl::Mutex mu_;
  std::vector<v1::GenerateResponse> responses_;
  bool refuse_writes_ = false;
  std::atomic<bool> gone_{false};
};

v1::GenerateResponse Tokens(std::vector<int32_t> ids, v1::FinishReason finish = v1::FINISH_REASON_UNSPECIFIED) {
  v1::GenerateResponse r;
  for (int32_t id : ids) r.add_token_ids(id);
  r.set_finish_reason(finish);
  return r;
}

v1::GenerateRequest Request(std::vector<int32_t> prompt = {1, 2, 3}, int max_tokens = 4) {
  v1::GenerateRequest r;
  for (int32_t id : prompt) r.add_prompt_token_ids(id);
  r.mutable_sampling()->set_max_tokens(max_tokens);
  return r;
}

class RouterTest : public ::testing::Test {
 protected:
  // `world_size` ranks, registered as w0..wN-1 at endpoints "wI:1".
  void Make(int world_size, bool ready = true, RouterOptions options = {}) {
    MembershipOptions o{.world_size = world_size,
                        .model_dir = "/m",
                        .model_fingerprint = kFingerprint,
                        .heartbeat_interval = absl::Milliseconds(500)};
    membership_ = *Membership::Create(o, TinySummary(), &clock_);
    router_ = std::make_unique<Router>(membership_.get(), &clients_, options);
    for (int r = 0; r < world_size; ++r) {
      ASSERT_NO_FATAL_FAILURE(Register(r, absl::StrCat("w", r)));
      if (ready) Beat(r, 0, 0);
    }
  }
  // `worker_id` takes rank r at endpoint "wR:1".
  void Register(int r, const std::string& worker_id) {
    v1::RegisterRequest req;
    req.set_protocol_version(v1::PROTOCOL_VERSION_1);
    req.set_model_fingerprint(kFingerprint);
    req.set_requested_rank(r);
    req.set_worker_id(worker_id);
    req.set_transport(v1::TRANSPORT_KIND_UCX);
    req.set_worker_endpoint(absl::StrCat("w", r, ":1"));
    v1::RegisterReply reply;
    ASSERT_TRUE(membership_->Register(req, &reply).ok());
    secrets_[r] = reply.worker_secret();
  }
  // The first expert-parallel group (epoch 1): every rank meets at the rendezvous.
  void FormGroup(int world_size) {
    std::vector<std::thread> threads;
    for (int r = 0; r < world_size; ++r) {
      threads.emplace_back([this, r] {
        v1::RendezvousRequest req;
        req.set_worker_id(absl::StrCat("w", r));
        req.set_rank(r);
        req.set_transport_address(absl::StrCat("ucx-address-", r));
        req.set_worker_secret(secrets_.at(r));
        v1::RendezvousReply reply;
        absl::Status s = membership_->Rendezvous(req, absl::Now() + absl::Seconds(10), &reply);
        EXPECT_TRUE(s.ok()) << s;
      });
    }
    for (auto& t : threads) t.join();
  }
  void Beat(int rank, int running, int waiting, bool ready = true, uint64_t group_epoch = 0) {
    v1::HeartbeatRequest hb;
    hb.set_worker_id(absl::StrCat("w", rank));
    hb.set_worker_secret(secrets_.at(rank));
    hb.set_rank(rank);
    hb.set_ready(ready);
    hb.set_running(running);
    hb.set_waiting(waiting);
    hb.set_group_epoch(group_epoch);
    hb.set_placement_epoch(membership_->placement_epoch());
    v1::HeartbeatReply reply;
    ASSERT_TRUE(membership_->Heartbeat(hb, &reply).ok());
  }
  std::shared_ptr<FakeWorkerClient> Worker(int rank) { return clients_.Get(absl::StrCat("w", rank, ":1")); }

  FakeClock clock_;
  FakeWorkerClientFactory clients_;
  std::unique_ptr<Membership> membership_;
  std::map<int, std::string> secrets_;  // RegisterReply.worker_secret by rank
  std::unique_ptr<Router> router_;
};

TEST_F(RouterTest, ValidationNamesTheField) {
  Make(1);
  auto check = [&](const v1::GenerateRequest& r, const std::string& expected) {
    absl::Status s = router_->Validate(r);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << expected;
    EXPECT_THAT(std::string(s.message()), HasSubstr(expected));
  };
  check(Request({}), "prompt_token_ids: must not be empty");
  check(Request({1, 100}), "prompt_token_ids[1]: token id 100 is outside the vocabulary [0, 100)");
  check(Request({-1}), "prompt_token_ids[0]: token id -1");
  check(Request({1}, 0), "sampling.max_tokens: must be positive, got 0");
  check(Request({1}, -3), "sampling.max_tokens: must be positive, got -3");
  check(Request({1, 2}, 63), "exceed the model's context of 64 tokens");
  v1::GenerateRequest r = Request();
  r.mutable_sampling()->set_temperature(-1);
  check(r, "sampling.temperature");
  r = Request();
  r.mutable_sampling()->set_top_p(1.5);
  check(r, "sampling.top_p");
  r = Request();
  r.mutable_sampling()->add_stop_token_ids(1000);
  check(r, "sampling.stop_token_ids[0]");
  r = Request();
  r.set_service_tier("platinum");
  check(r, "service_tier");
  EXPECT_TRUE(router_->Validate(Request({1, 2}, 62)).ok());

  // Invalid requests never reach a worker.
  RecordingSink sink;
  EXPECT_EQ(router_->Generate(Request({}), absl::InfiniteFuture(), &sink).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Worker(0)->generate_calls(), 0u);
}

TEST_F(RouterTest, NoReadyWorkerIsUnavailable) {
  Make(2, /*ready=*/false);
  absl::StatusOr<int> r = router_->PickRank();
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("no worker is ready (2 of 2 ranks registered, 0 ready)"));
  Beat(0, 0, 0);
  EXPECT_EQ(*router_->PickRank(), 0);
}

TEST_F(RouterTest, ClusterNotFormedIsUnavailable) {
  MembershipOptions o{.world_size = 2, .model_dir = "/m", .model_fingerprint = kFingerprint};
  membership_ = *Membership::Create(o, TinySummary(), &clock_);
  router_ = std::make_unique<Router>(membership_.get(), &clients_, RouterOptions{});
  RecordingSink sink;
  absl::Status s = router_->Generate(Request(), absl::InfiniteFuture(), &sink);
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(std::string(s.message()), HasSubstr("no worker is ready (0 of 2 ranks registered"));
}

TEST_F(RouterTest, PicksLeastLoadedReadyRank) {
  Make(3);
  Beat(0, 4, 1);
  Beat(1, 2, 0);
  Beat(2, 3, 3);
  EXPECT_EQ(*router_->PickRank(), 1);
  Beat(1, 5, 5);
  EXPECT_EQ(*router_->PickRank(), 0);
  Beat(0, 0, 0, /*ready=*/false);  // idle but not ready
  EXPECT_EQ(*router_->PickRank(), 2);
}

TEST_F(RouterTest, InFlightRequestsCountBeforeHeartbeatsCatchUp) {
  Make(2);
  // Two requests block on their workers; the second must go to the other rank
  // even though no heartbeat has reported the first yet.
  RecordingSink s1, s2;
  absl::Status st1, st2;
  std::thread t1([&] { st1 = router_->Generate(Request(), absl::InfiniteFuture(), &s1); });
  auto stream0 = Worker(0)->WaitForStream();
  ASSERT_NE(stream0, nullptr);
  EXPECT_EQ(router_->InFlight(0), 1);
  std::thread t2([&] { st2 = router_->Generate(Request(), absl::InfiniteFuture(), &s2); });
  auto stream1 = Worker(1)->WaitForStream();
  ASSERT_NE(stream1, nullptr);
  stream0->Push(Tokens({7}, v1::FINISH_REASON_LENGTH));
  stream0->Close(absl::OkStatus());
  stream1->Push(Tokens({8}, v1::FINISH_REASON_LENGTH));
  stream1->Close(absl::OkStatus());
  t1.join();
  t2.join();
  EXPECT_TRUE(st1.ok()) << st1;
  EXPECT_TRUE(st2.ok()) << st2;
  EXPECT_EQ(router_->InFlight(0), 0);
}

TEST_F(RouterTest, RelaysTheWorkerStream) {
  Make(2);
  Beat(0, 3, 0);
  Worker(1)->SetScript({Tokens({5, 6}), Tokens({7}, v1::FINISH_REASON_LENGTH)});
  RecordingSink sink;
  v1::GenerateRequest req = Request({1, 2, 3}, 3);
  req.set_request_id("my-request");
  req.set_service_tier("flex");
  const absl::Time before = absl::Now();
  ASSERT_TRUE(router_->Generate(req, before + absl::Seconds(30), &sink).ok());
  auto out = sink.responses();
  ASSERT_EQ(out.size(), 2u);
  EXPECT_THAT(out[0].token_ids(), ::testing::ElementsAre(5, 6));
  EXPECT_EQ(out[1].finish_reason(), v1::FINISH_REASON_LENGTH);
  EXPECT_EQ(out[1].rank(), 1);
  EXPECT_EQ(out[1].request_id(), "my-request");
  // What the worker saw: the same prompt, our tier name, the client's deadline.
  auto stream = Worker(1)->WaitForStream();
  EXPECT_THAT(stream->request().prompt_token_ids(), ::testing::ElementsAre(1, 2, 3));
  EXPECT_EQ(stream->request().service_tier(), "batch");
  EXPECT_EQ(stream->request().sampling().top_p(), 1.0f) << "unset top_p means 1";
  EXPECT_EQ(stream->deadline(), before + absl::Seconds(30));
  // Not the client's id: workers see one nobody can guess.
  EXPECT_THAT(stream->request().request_id(), ::testing::MatchesRegex("req-[0-9a-f]{32}"));
}

TEST_F(RouterTest, AssignsRequestIdsAndRefusesDuplicatesInFlight) {
  Make(1);
  RecordingSink s1, s2;
  v1::GenerateRequest req = Request();
  req.set_request_id("same");
  absl::Status st1;
  std::thread t([&] { st1 = router_->Generate(req, absl::InfiniteFuture(), &s1); });
  auto stream = Worker(0)->WaitForStream();
  absl::Status dup = router_->Generate(req, absl::InfiniteFuture(), &s2);
  EXPECT_EQ(dup.code(), absl::StatusCode::kAlreadyExists);
  EXPECT_THAT(std::string(dup.message()), HasSubstr("request_id: 'same' is already in flight"));
  stream->Push(Tokens({1}, v1::FINISH_REASON_STOP));
  stream->Close(absl::OkStatus());
  t.join();
  EXPECT_TRUE(st1.ok());

  // Ids the router makes are 128 random bits, the same on the worker.
  for (int i = 0; i < 2; ++i) {
    Worker(0)->SetScript({Tokens({1}, v1::FINISH_REASON_STOP)});
    RecordingSink s3;
    ASSERT_TRUE(router_->Generate(Request(), absl::InfiniteFuture(), &s3).ok());
    const std::string id = s3.responses()[0].request_id();
    EXPECT_THAT(id, ::testing::MatchesRegex("req-[0-9a-f]{32}"));
    EXPECT_EQ(Worker(0)->WaitForStream(i + 2)->request().request_id(), id);
  }
  EXPECT_NE(Worker(0)->WaitForStream(2)->request().request_id(), Worker(0)->WaitForStream(3)->request().request_id());
}

TEST_F(RouterTest, ClientCancellationCancelsTheWorkerCall) {
  Make(1);
  RecordingSink sink;
  absl::Status st;
  std::thread t([&] { st = router_->Generate(Request(), absl::InfiniteFuture(), &sink); });
  auto stream = Worker(0)->WaitForStream();
  ASSERT_NE(stream, nullptr);
  // The client goes away while the worker is still prefilling (nothing to write yet).
  sink.set_gone();
  router_->Poll();
  EXPECT_TRUE(stream->WaitCancelled(absl::Seconds(10)));
  t.join();
  EXPECT_EQ(st.code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(router_->InFlight(0), 0);
}

TEST_F(RouterTest, FailedWriteToClientCancelsTheWorkerCall) {
  Make(1);
  RecordingSink sink;
  sink.set_refuse_writes();
  absl::Status st;
  std::thread t([&] { st = router_->Generate(Request(), absl::InfiniteFuture(), &sink); });
  auto stream = Worker(0)->WaitForStream();
  stream->Push(Tokens({1}));
  EXPECT_TRUE(stream->WaitCancelled(absl::Seconds(10)));
  t.join();
  EXPECT_EQ(st.code(), absl::StatusCode::kCancelled);
}

// A rank silent past the limit is probed, asynchronously; it is dead once its
// worker does not answer, the reason naming the silence and the probe's error.
TEST_F(RouterTest, HeartbeatLossFailsThatRanksRequestsWithTheReason) {
  Make(2);
  Beat(1, 9, 0);  // push the first request to rank 0
  RecordingSink sink;
  absl::Status st;
  std::thread t([&] { st = router_->Generate(Request(), absl::InfiniteFuture(), &sink); });
  auto stream = Worker(0)->WaitForStream();
  ASSERT_NE(stream, nullptr);
  stream->Push(Tokens({4}));
  Worker(0)->HoldStatusReplies();
  Worker(0)->SetStatusReply(absl::DeadlineExceededError("Deadline Exceeded"));

  // Rank 1 keeps beating, rank 0 goes silent.
  auto advance_and_poll = [&](int ms) {
    clock_.Advance(absl::Milliseconds(ms));
    Beat(1, 0, 0);
    router_->Poll();
  };
  advance_and_poll(700);
  EXPECT_EQ(Worker(0)->status_calls(), 0) << "within half the limit: no probe";
  advance_and_poll(300);
  // Poll returned with the probe unanswered: a suspect, not dead yet.
  EXPECT_EQ(Worker(0)->status_calls(), 1);
  EXPECT_EQ(membership_->Ranks()[0].state, RankState::kReady);
  EXPECT_FALSE(stream->cancelled());
  router_->Poll();
  EXPECT_EQ(Worker(0)->status_calls(), 1) << "one probe at a time per rank";
  // The probe fails within the limit: judged once the limit passes.
  Worker(0)->ReleaseStatusReplies();
  advance_and_poll(400);
  EXPECT_EQ(membership_->Ranks()[0].state, RankState::kReady) << "1400 ms: within the limit";
  EXPECT_FALSE(stream->cancelled());
  advance_and_poll(300);
  EXPECT_TRUE(stream->WaitCancelled(absl::Seconds(10)));
  t.join();
  EXPECT_EQ(st.code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(std::string(st.message()), HasSubstr("rank 0 died: heartbeat lost (none for 1700 ms, limit 3 x 500 ms)"));
  EXPECT_THAT(std::string(st.message()), HasSubstr("; status probe: Deadline Exceeded"));
  EXPECT_EQ(membership_->Ranks()[0].state, RankState::kDead);
  EXPECT_THAT(membership_->Ranks()[0].dead_reason,
              HasSubstr("heartbeat lost (none for 1700 ms, limit 3 x 500 ms); status probe: Deadline Exceeded"));

  // Nothing new is admitted while the expert-parallel group is broken.
  absl::Status next = router_->Generate(Request(), absl::InfiniteFuture(), &sink);
  EXPECT_EQ(next.code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(std::string(next.message()), HasSubstr("rank 0 died: heartbeat lost"));
  EXPECT_EQ(Worker(1)->generate_calls(), 0u);
}

TEST_F(RouterTest, SurvivorErrorsAreUnavailableAndNameTheDeadRank) {
  Make(2);
  Beat(1, 9, 0);
  RecordingSink sink;
  absl::Status st;
  std::thread t([&] { st = router_->Generate(Request(), absl::InfiniteFuture(), &sink); });
  auto stream = Worker(0)->WaitForStream();
  membership_->MarkDead(1, "heartbeat lost (none for 1600 ms, limit 3 x 500 ms)");
  // Rank 0's worker fails its step because its peer is gone.
  stream->Close(absl::AbortedError("step 12: timed out waiting for rank 1 after 10000 ms"));
  t.join();
  EXPECT_EQ(st.code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(std::string(st.message()), HasSubstr("rank 0 failed request"));
  EXPECT_THAT(std::string(st.message()), HasSubstr("rank 1 died: heartbeat lost"));
  EXPECT_THAT(std::string(st.message()), HasSubstr("timed out waiting for rank 1"));
}

TEST_F(RouterTest, UnreachableWorkerIsMarkedDead) {
  Make(2);
  Beat(1, 9, 0);
  Worker(0)->SetScript({}, absl::UnavailableError("failed to connect to all addresses"));
  Worker(0)->SetStatusReply(absl::UnavailableError("failed to connect to all addresses"));
  RecordingSink sink;
  absl::Status st = router_->Generate(Request(), absl::InfiniteFuture(), &sink);
  EXPECT_EQ(st.code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(std::string(st.message()),
              HasSubstr("rank 0 died: worker unreachable: failed to connect to all addresses"));
  EXPECT_EQ(membership_->Ranks()[0].state, RankState::kDead);
  EXPECT_EQ(Worker(0)->status_calls(), 1);
}

TEST_F(RouterTest, TransientUnavailableFromALiveWorkerDoesNotKillIt) {
  Make(1);
  Worker(0)->SetScript({}, absl::UnavailableError("stream reset"));
  RecordingSink sink;
  absl::Status st = router_->Generate(Request(), absl::InfiniteFuture(), &sink);
  EXPECT_EQ(st.code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(membership_->Ranks()[0].state, RankState::kReady);
}

TEST_F(RouterTest, WorkerRequestErrorsKeepTheirCode) {
  Make(1);
  Worker(0)->SetScript({}, absl::ResourceExhaustedError("KV cache full"));
  RecordingSink sink;
  absl::Status st = router_->Generate(Request(), absl::InfiniteFuture(), &sink);
  EXPECT_EQ(st.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(st.message()), HasSubstr("rank 0: KV cache full"));
}

TEST_F(RouterTest, ShutdownFailsRequestsInFlight) {
  Make(1);
  RecordingSink sink;
  absl::Status st;
  std::thread t([&] { st = router_->Generate(Request(), absl::InfiniteFuture(), &sink); });
  auto stream = Worker(0)->WaitForStream();
  router_->Shutdown();
  EXPECT_TRUE(stream->WaitCancelled(absl::Seconds(10)));
  t.join();
  EXPECT_EQ(st.code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(std::string(st.message()), HasSubstr("shutting down"));
}

// ---- The asynchronous path (GenerateAsync / Cancel), as the HTTP front door uses it.

// Records the outcome of one GenerateAsync request and how often `done` ran.
struct AsyncResult {
  absl::Mutex mu;
  int done_calls = 0;
  absl::Status status;
  size_t writes_before_done = 0;

  std::function<void(absl::Status)> Done(std::shared_ptr<RecordingSink> sink) {
    return [this, sink](absl::Status s) {
      absl::MutexLock lock(&mu);
      ++done_calls;
      status = std::move(s);
      writes_before_done = sink->count();
    };
  }
  int calls() {
    absl::MutexLock lock(&mu);
    return done_calls;
  }
  absl::Status outcome() {
    absl::MutexLock lock(&mu);
    return status;
  }
};

TEST_F(RouterTest, AsyncRelaysTheStreamAndReportsOnceAfterTheLastWrite) {
  Make(1);
  auto sink = std::make_shared<RecordingSink>();
  AsyncResult result;
  v1::GenerateRequest req = Request({1, 2, 3}, 3);
  req.set_request_id("cmpl-1");
  router_->GenerateAsync(req, absl::InfiniteFuture(), sink, result.Done(sink));
  // Returned at once: the worker has not answered yet, nothing is reported.
  auto stream = Worker(0)->WaitForStream();
  ASSERT_NE(stream, nullptr);
  EXPECT_EQ(result.calls(), 0);
  EXPECT_EQ(router_->InFlight(0), 1);
  stream->Push(Tokens({5, 6}));
  stream->Push(Tokens({7}, v1::FINISH_REASON_LENGTH));
  EXPECT_EQ(result.calls(), 0) << "done must wait for the end of the worker's stream";
  stream->Close(absl::OkStatus());
  stream->Close(absl::InternalError("a second end must not produce a second outcome"));
  EXPECT_EQ(result.calls(), 1);
  EXPECT_TRUE(result.outcome().ok()) << result.outcome();
  EXPECT_EQ(result.writes_before_done, 2u);
  auto out = sink->responses();
  ASSERT_EQ(out.size(), 2u);
  EXPECT_THAT(out[0].token_ids(), ::testing::ElementsAre(5, 6));
  EXPECT_EQ(out[1].request_id(), "cmpl-1");
  EXPECT_EQ(out[1].finish_reason(), v1::FINISH_REASON_LENGTH);
  EXPECT_EQ(router_->InFlight(0), 0);
  // The id is free again once the request ended.
  router_->Cancel("cmpl-1");
  EXPECT_FALSE(stream->cancelled());
}

TEST_F(RouterTest, AsyncValidationAndAdmissionErrorsArriveThroughDone) {
  Make(1);
  auto sink = std::make_shared<RecordingSink>();
  AsyncResult bad;
  router_->GenerateAsync(Request({}), absl::InfiniteFuture(), sink, bad.Done(sink));
  EXPECT_EQ(bad.calls(), 1);
  EXPECT_EQ(bad.outcome().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(bad.outcome().message()), HasSubstr("prompt_token_ids"));

  v1::GenerateRequest req = Request();
  req.set_request_id("chatcmpl-9");
  AsyncResult first, dup;
  router_->GenerateAsync(req, absl::InfiniteFuture(), sink, first.Done(sink));
  router_->GenerateAsync(req, absl::InfiniteFuture(), sink, dup.Done(sink));
  EXPECT_EQ(dup.calls(), 1);
  EXPECT_EQ(dup.outcome().code(), absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(Worker(0)->generate_calls(), 1u);
  EXPECT_EQ(first.calls(), 0);

  router_->Shutdown();
  EXPECT_EQ(first.calls(), 1);
  EXPECT_EQ(first.outcome().code(), absl::StatusCode::kUnavailable);
  AsyncResult late;
  router_->GenerateAsync(Request(), absl::InfiniteFuture(), sink, late.Done(sink));
  EXPECT_EQ(late.outcome().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(std::string(late.outcome().message()), HasSubstr("shutting down"));
}

TEST_F(RouterTest, AsyncCancelByIdCancelsTheWorkerCallAndEndsOk) {
  Make(1);
  auto sink = std::make_shared<RecordingSink>();
  AsyncResult result;
  v1::GenerateRequest req = Request();
  req.set_request_id("cmpl-abc");
  router_->GenerateAsync(req, absl::InfiniteFuture(), sink, result.Done(sink));
  auto stream = Worker(0)->WaitForStream();
  stream->Push(Tokens({1}));
  router_->Cancel("cmpl-unknown");  // no-op
  EXPECT_FALSE(stream->cancelled());
  router_->Cancel("cmpl-abc");
  EXPECT_TRUE(stream->cancelled()) << "the worker must be told at once, to free the KV blocks";
  EXPECT_EQ(result.calls(), 1);
  EXPECT_TRUE(result.outcome().ok()) << "a client cancellation is not an error: " << result.outcome();
  stream->Push(Tokens({2}));  // too late: nothing more reaches the client
  EXPECT_EQ(sink->count(), 1u);
  EXPECT_EQ(router_->InFlight(0), 0);
}

TEST_F(RouterTest, AsyncFailedWriteCancelsTheWorkerCall) {
  Make(1);
  auto sink = std::make_shared<RecordingSink>();
  sink->set_refuse_writes();
  AsyncResult result;
  router_->GenerateAsync(Request(), absl::InfiniteFuture(), sink, result.Done(sink));
  auto stream = Worker(0)->WaitForStream();
  stream->Push(Tokens({1}));
  EXPECT_TRUE(stream->cancelled());
  EXPECT_EQ(result.calls(), 1);
  EXPECT_TRUE(result.outcome().ok()) << result.outcome();
}

TEST_F(RouterTest, AsyncClientGoneIsNoticedByPoll) {
  Make(1);
  auto sink = std::make_shared<RecordingSink>();
  AsyncResult result;
  router_->GenerateAsync(Request(), absl::InfiniteFuture(), sink, result.Done(sink));
  auto stream = Worker(0)->WaitForStream();
  router_->Poll();
  EXPECT_FALSE(stream->cancelled());
  sink->set_gone();
  router_->Poll();
  EXPECT_TRUE(stream->cancelled());
  EXPECT_EQ(result.calls(), 1);
}

TEST_F(RouterTest, AsyncRankDeathFailsItsRequestsWithTheReason) {
  Make(2);
  auto sink0 = std::make_shared<RecordingSink>();
  auto sink1 = std::make_shared<RecordingSink>();
  AsyncResult on0, on1;
  router_->GenerateAsync(Request(), absl::InfiniteFuture(), sink0, on0.Done(sink0));
  router_->GenerateAsync(Request(), absl::InfiniteFuture(), sink1, on1.Done(sink1));
  auto stream0 = Worker(0)->WaitForStream();
  auto stream1 = Worker(1)->WaitForStream();
  ASSERT_NE(stream0, nullptr);
  ASSERT_NE(stream1, nullptr);
  router_->FailRank(0, "process exited (signal 9)");
  EXPECT_TRUE(stream0->cancelled());
  EXPECT_FALSE(stream1->cancelled()) << "only the dead rank's requests fail";
  EXPECT_EQ(on0.calls(), 1);
  EXPECT_EQ(on0.outcome().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(std::string(on0.outcome().message()), HasSubstr("rank 0 died: process exited (signal 9)"));
  EXPECT_EQ(on1.calls(), 0);
  stream1->Push(Tokens({3}, v1::FINISH_REASON_STOP));
  stream1->Close(absl::OkStatus());
  EXPECT_TRUE(on1.outcome().ok());
}

TEST_F(RouterTest, AsyncDeadlineIsTheClientsOrTheRequestTimeout) {
  Make(1);
  router_ = std::make_unique<Router>(membership_.get(), &clients_,
                                     RouterOptions{.request_timeout = absl::Seconds(60)});
  auto sink = std::make_shared<RecordingSink>();
  AsyncResult soon, late;
  const absl::Time now = absl::Now();
  router_->GenerateAsync(Request(), now + absl::Seconds(2), sink, soon.Done(sink));
  router_->GenerateAsync(Request(), now + absl::Hours(5), sink, late.Done(sink));
  auto s1 = Worker(0)->WaitForStream(1);
  auto s2 = Worker(0)->WaitForStream(2);
  EXPECT_EQ(s1->deadline(), now + absl::Seconds(2));
  EXPECT_GE(s2->deadline(), now + absl::Seconds(60));
  EXPECT_LE(s2->deadline(), absl::Now() + absl::Seconds(60));
  // The worker call ran out of time: the client hears it, and no probe is needed.
  s1->Close(absl::DeadlineExceededError("Deadline Exceeded"));
  EXPECT_EQ(soon.outcome().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_THAT(std::string(soon.outcome().message()), HasSubstr("did not finish on rank 0 before its deadline"));
  EXPECT_EQ(Worker(0)->status_calls(), 0);
  s2->Close(absl::OkStatus());
  EXPECT_EQ(late.outcome().code(), absl::StatusCode::kUnavailable) << "ended without a finish reason";
}

TEST_F(RouterTest, AsyncStatusProbeDoesNotHoldTheWorkerThread) {
  Make(2);
  Beat(1, 9, 0);
  Worker(0)->HoldStatusReplies();
  Worker(0)->SetStatusReply(absl::UnavailableError("connection refused"));
  auto sink = std::make_shared<RecordingSink>();
  AsyncResult result;
  router_->GenerateAsync(Request(), absl::InfiniteFuture(), sink, result.Done(sink));
  auto stream = Worker(0)->WaitForStream();
  // Close returns while the probe is unanswered: the thread that delivered
  // the end of the stream is not parked on the probe.
  stream->Close(absl::UnavailableError("Socket closed"));
  EXPECT_EQ(Worker(0)->status_calls(), 1);
  EXPECT_EQ(result.calls(), 0);
  EXPECT_EQ(router_->InFlight(0), 0);
  Worker(0)->ReleaseStatusReplies();
  EXPECT_EQ(result.calls(), 1);
  EXPECT_THAT(std::string(result.outcome().message()),
              HasSubstr("rank 0 died: worker unreachable: connection refused (its Generate stream "
                        "ended with UNAVAILABLE: Socket closed)"));
  EXPECT_EQ(membership_->Ranks()[0].state, RankState::kDead);
}

// A killed worker: its probe finds it unreachable and nothing listens at its
// endpoint any more, so it is dead at the probe, half a limit sooner. A
// probe that times out (a frozen process still accepts connections) or an
// endpoint that still accepts is judged at the limit, as before.
TEST_F(RouterTest, AnUnreachableRankWhoseEndpointRefusesIsDeadAtTheProbe) {
  std::vector<std::string> asked;
  Make(3, true, {.endpoint_refuses = [&](const std::string& endpoint) {
         asked.push_back(endpoint);
         return endpoint != "w1:1";
       }});
  Worker(0)->SetStatusReply(absl::UnavailableError("failed to connect to all addresses"));
  Worker(1)->SetStatusReply(absl::UnavailableError("failed to connect to all addresses"));
  Worker(2)->SetStatusReply(absl::DeadlineExceededError("Deadline Exceeded"));
  clock_.Advance(absl::Milliseconds(1000));  // past half the limit (1500 ms)
  router_->Poll();
  EXPECT_EQ(membership_->Ranks()[0].state, RankState::kDead);
  EXPECT_THAT(membership_->Ranks()[0].dead_reason,
              HasSubstr("heartbeat lost (none for 1000 ms, limit 3 x 500 ms); status probe: failed to "
                        "connect to all addresses; its endpoint w0:1 refuses connections"));
  EXPECT_EQ(membership_->Ranks()[1].state, RankState::kReady) << "it still accepts: at the limit";
  EXPECT_EQ(membership_->Ranks()[2].state, RankState::kReady) << "timed out: at the limit";
  EXPECT_EQ(asked, (std::vector<std::string>{"w0:1", "w1:1"})) << "only unreachable ones are checked";
  clock_.Advance(absl::Milliseconds(600));
  router_->Poll();
  EXPECT_EQ(membership_->Ranks()[1].state, RankState::kDead);
  EXPECT_EQ(membership_->Ranks()[2].state, RankState::kDead);
}

// Late heartbeats on an overloaded host: the worker answers its status probe,
// so it keeps its rank and its requests, with a warning and a count.
TEST_F(RouterTest, SilentRankThatAnswersItsStatusProbeIsKeptAndServesOn) {
  Make(2);
  Beat(1, 9, 0);
  auto sink = std::make_shared<RecordingSink>();
  AsyncResult result;
  router_->GenerateAsync(Request(), absl::InfiniteFuture(), sink, result.Done(sink));
  auto stream = Worker(0)->WaitForStream();
  ASSERT_NE(stream, nullptr);

  clock_.Advance(absl::Milliseconds(1600));
  Beat(1, 9, 0);
  ::testing::internal::CaptureStderr();
  router_->Poll();
  const std::string log = ::testing::internal::GetCapturedStderr();
  EXPECT_EQ(Worker(0)->status_calls(), 1);
  EXPECT_THAT(log, HasSubstr("rank 0 missed heartbeats for 1600 ms but answered its status probe: "
                             "kept (host overloaded?)"));
  EXPECT_EQ(membership_->Ranks()[0].state, RankState::kReady);
  EXPECT_EQ(membership_->stats().heartbeats_late, 1u);
  EXPECT_EQ(membership_->stats().rank_failures, 0u);
  EXPECT_FALSE(stream->cancelled());

  // Its request finishes, and the rank takes the next one.
  stream->Push(Tokens({7}, v1::FINISH_REASON_STOP));
  stream->Close(absl::OkStatus());
  EXPECT_TRUE(result.outcome().ok()) << result.outcome();
  Worker(0)->SetScript({Tokens({8}, v1::FINISH_REASON_STOP)});
  RecordingSink next;
  EXPECT_TRUE(router_->Generate(Request(), absl::InfiniteFuture(), &next).ok());
  EXPECT_EQ(Worker(0)->generate_calls(), 2u);

  // Its late heartbeat arrives: the next silence is probed afresh.
  Beat(0, 0, 0);
  clock_.Advance(absl::Milliseconds(1600));
  Beat(1, 9, 0);
  router_->Poll();
  EXPECT_EQ(Worker(0)->status_calls(), 2);
  EXPECT_EQ(membership_->Ranks()[0].state, RankState::kReady);
  EXPECT_EQ(membership_->stats().heartbeats_late, 2u);
}

// The probe was for the worker that held the rank when it went silent: its
// failure says nothing about the worker that holds the rank now.
TEST_F(RouterTest, AProbeOfTheOldHolderDoesNotMarkTheNewOneDead) {
  Make(2);
  Worker(0)->HoldStatusReplies();
  Worker(0)->SetStatusReply(absl::UnavailableError("connection refused"));
  clock_.Advance(absl::Milliseconds(1600));
  Beat(1, 0, 0);
  router_->Poll();
  ASSERT_EQ(Worker(0)->status_calls(), 1);
  // Meanwhile its Generate stream broke (marked dead) and a restarted worker
  // took the rank at the same address.
  ASSERT_TRUE(membership_->MarkDead(0, "worker unreachable: connection refused"));
  ASSERT_NO_FATAL_FAILURE(Register(0, "w0-restarted"));

  Worker(0)->ReleaseStatusReplies();
  const RankInfo rank0 = membership_->Ranks()[0];
  EXPECT_EQ(rank0.worker_id, "w0-restarted");
  EXPECT_EQ(rank0.state, RankState::kRegistered);
  EXPECT_EQ(rank0.dead_reason, "");
  EXPECT_EQ(membership_->stats().rank_failures, 1u) << "only the MarkDead";
}

TEST_F(RouterTest, AsyncHoldsThousandsOfRequestsOnOneThread) {
  Make(2);
  constexpr int kRequests = 2000;
  std::vector<std::shared_ptr<RecordingSink>> sinks;
  std::vector<std::unique_ptr<AsyncResult>> results;
  for (int i = 0; i < kRequests; ++i) {
    sinks.push_back(std::make_shared<RecordingSink>());
    results.push_back(std::make_unique<AsyncResult>());
    v1::GenerateRequest req = Request();
    req.set_request_id(absl::StrCat("cmpl-", i));
    router_->GenerateAsync(req, absl::InfiniteFuture(), sinks.back(), results.back()->Done(sinks.back()));
  }
  EXPECT_EQ(router_->InFlight(0) + router_->InFlight(1), kRequests);
  EXPECT_NEAR(router_->InFlight(0), kRequests / 2, 1) << "in-flight counts balance the ranks";
  for (int rank = 0; rank < 2; ++rank) {
    for (size_t n = 1; n <= Worker(rank)->generate_calls(); ++n) {
      auto stream = Worker(rank)->WaitForStream(n);
      stream->Push(Tokens({static_cast<int32_t>(n % 100)}, v1::FINISH_REASON_STOP));
      stream->Close(absl::OkStatus());
    }
  }
  for (int i = 0; i < kRequests; ++i) {
    ASSERT_EQ(results[i]->calls(), 1) << i;
    ASSERT_TRUE(results[i]->outcome().ok()) << i << ": " << results[i]->outcome();
    ASSERT_EQ(sinks[i]->count(), 1u);
    ASSERT_EQ(sinks[i]->responses()[0].request_id(), absl::StrCat("cmpl-", i));
  }
  EXPECT_EQ(router_->InFlight(0) + router_->InFlight(1), 0);
}

// ---- Resuming a request after its rank died (elastic groups).

class RouterResumeTest : public RouterTest {
 protected:
  // Three ranks in one group; rank 0 gets the first request.
  void MakeGroup(RouterOptions options) {
    Make(3, /*ready=*/true, options);
    FormGroup(3);
    Beat(1, 9, 0);
    Beat(2, 9, 0);
  }
  // The worker at `rank` is gone: its stream breaks and it does not answer probes.
  void KillWorker(int rank, const std::shared_ptr<FakeStream>& stream) {
    Worker(rank)->SetStatusReply(absl::UnavailableError("connection refused"));
    stream->Close(absl::UnavailableError("Socket closed"));
  }
  static v1::GenerateRequest Seeded() {
    v1::GenerateRequest r = Request({1, 2, 3}, 6);
    r.mutable_sampling()->set_temperature(0.8f);
    r.mutable_sampling()->set_seed(42);
    return r;
  }
};

// Rank 0 dies after two tokens: the survivors re-form (epoch 2) while the
// request waits, then it resumes on one of them with those two tokens as
// context; the client's stream goes on with nothing repeated, and the usage
// covers both attempts.
TEST_F(RouterResumeTest, ADeadRanksRequestResumesOnASurvivorWithItsTokens) {
  MakeGroup({.max_resumes = 2});
  auto sink = std::make_shared<RecordingSink>();
  AsyncResult result;
  router_->GenerateAsync(Seeded(), absl::InfiniteFuture(), sink, result.Done(sink));
  auto first = Worker(0)->WaitForStream();
  first->Push(Tokens({5, 6}));
  KillWorker(0, first);

  EXPECT_EQ(result.calls(), 0) << "the request waits for the new group";
  EXPECT_EQ(membership_->group().epoch, 2u);
  EXPECT_FALSE(router_->PickRank().ok());
  EXPECT_TRUE(router_->Ready().ok()) << "a re-forming group still takes requests";
  EXPECT_EQ(router_->stats().parked, 1);
  // A request that arrives meanwhile waits too.
  auto sink2 = std::make_shared<RecordingSink>();
  AsyncResult second;
  router_->GenerateAsync(Request(), absl::InfiniteFuture(), sink2, second.Done(sink2));
  router_->Poll();
  EXPECT_EQ(Worker(1)->generate_calls() + Worker(2)->generate_calls(), 0u);

  Beat(1, 0, 0, true, /*group_epoch=*/2);
  Beat(2, 5, 0, true, /*group_epoch=*/2);
  router_->Poll();
  auto resumed = Worker(1)->WaitForStream(1);
  ASSERT_NE(resumed, nullptr);
  EXPECT_THAT(resumed->request().resumed_token_ids(), ::testing::ElementsAre(5, 6));
  EXPECT_THAT(resumed->request().prompt_token_ids(), ::testing::ElementsAre(1, 2, 3));
  EXPECT_EQ(resumed->request().sampling().seed(), 42u);
  // The resumed attempt is the same request to the workers.
  EXPECT_EQ(resumed->request().request_id(), first->request().request_id());
  v1::GenerateResponse last = Tokens({8, 9}, v1::FINISH_REASON_LENGTH);
  last.set_completion_tokens(2);  // what rank 1 generated
  last.set_resumed_tokens(2);
  resumed->Push(Tokens({7}));
  resumed->Push(last);
  resumed->Close(absl::OkStatus());

  EXPECT_EQ(result.calls(), 1);
  EXPECT_TRUE(result.outcome().ok()) << result.outcome();
  std::vector<int32_t> streamed;
  for (const auto& r : sink->responses()) streamed.insert(streamed.end(), r.token_ids().begin(), r.token_ids().end());
  EXPECT_THAT(streamed, ::testing::ElementsAre(5, 6, 7, 8, 9));
  const v1::GenerateResponse fin = sink->responses().back();  // responses() is a copy
  EXPECT_EQ(fin.completion_tokens(), 5) << "every token the client got";
  EXPECT_EQ(fin.resumed_tokens(), 2);
  EXPECT_EQ(fin.rank(), 1);
  EXPECT_EQ(router_->stats().requests_resumed, 1u);
  EXPECT_EQ(router_->stats().resumed_tokens, 2u);
  // The waiting request started once the group served.
  EXPECT_EQ(Worker(1)->generate_calls() + Worker(2)->generate_calls(), 2u);
  EXPECT_EQ(second.calls(), 0);
  router_->Shutdown();  // ends `second` while it is alive, not in the fixture's teardown
}

TEST_F(RouterResumeTest, TheResumeLimitEndsItWithAClearError) {
  MakeGroup({.max_resumes = 1});
  auto sink = std::make_shared<RecordingSink>();
  AsyncResult result;
  router_->GenerateAsync(Request(), absl::InfiniteFuture(), sink, result.Done(sink));
  // A live worker fails the request (its step failed): retried at once, the group serves.
  auto first = Worker(0)->WaitForStream();
  first->Push(Tokens({5}));
  first->Close(absl::AbortedError("step 3: peer lost"));
  EXPECT_EQ(result.calls(), 0);
  auto again = Worker(0)->WaitForStream(2);
  ASSERT_NE(again, nullptr);
  EXPECT_THAT(again->request().resumed_token_ids(), ::testing::ElementsAre(5));
  again->Close(absl::AbortedError("step 4: peer lost"));
  EXPECT_EQ(result.calls(), 1);
  EXPECT_EQ(result.outcome().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(std::string(result.outcome().message()), HasSubstr("step 4: peer lost"));
  EXPECT_THAT(std::string(result.outcome().message()),
              HasSubstr("reached its resume limit (1 resumes, --max-resumes)"));
}

TEST_F(RouterResumeTest, TokensThatAlreadyEndedItFinishWithoutAnotherAttempt) {
  MakeGroup({.max_resumes = 2});
  auto sink = std::make_shared<RecordingSink>();
  AsyncResult result;
  v1::GenerateRequest req = Request({1, 2}, 3);
  req.mutable_sampling()->add_stop_token_ids(9);
  router_->GenerateAsync(req, absl::InfiniteFuture(), sink, result.Done(sink));
  auto first = Worker(0)->WaitForStream();
  first->Push(Tokens({4, 9}));  // the stop token, then the rank dies before its final message
  KillWorker(0, first);
  EXPECT_EQ(result.calls(), 1);
  EXPECT_TRUE(result.outcome().ok()) << result.outcome();
  EXPECT_EQ(sink->responses().back().finish_reason(), v1::FINISH_REASON_STOP);
  EXPECT_EQ(sink->responses().back().completion_tokens(), 2);
  EXPECT_EQ(Worker(1)->generate_calls() + Worker(2)->generate_calls(), 0u);
}

TEST_F(RouterResumeTest, AWaitEndsWhenTheGroupDoesNotServeOrTheClientLeaves) {
  MakeGroup({.max_resumes = 2, .resume_wait = absl::Milliseconds(100)});
  auto sink = std::make_shared<RecordingSink>();
  auto leaver = std::make_shared<RecordingSink>();
  AsyncResult waited, left;
  router_->GenerateAsync(Request(), absl::InfiniteFuture(), sink, waited.Done(sink));
  KillWorker(0, Worker(0)->WaitForStream());
  router_->GenerateAsync(Request(), absl::InfiniteFuture(), leaver, left.Done(leaver));
  EXPECT_EQ(router_->stats().parked, 2);
  leaver->set_gone();
  router_->Poll();
  EXPECT_EQ(left.calls(), 1);
  EXPECT_TRUE(left.outcome().ok()) << "a client that left is not an error";
  absl::SleepFor(absl::Milliseconds(150));
  router_->Poll();  // ranks 1 and 2 never report epoch 2
  EXPECT_EQ(waited.calls(), 1);
  EXPECT_EQ(waited.outcome().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(std::string(waited.outcome().message()), HasSubstr("for a serving group and gave up"));
  EXPECT_THAT(std::string(waited.outcome().message()), HasSubstr("rank 0 died"));
  EXPECT_EQ(router_->stats().parked, 0);
}

TEST_F(RouterResumeTest, NoRankLeftFailsAtOnce) {
  Make(1, /*ready=*/true, {.max_resumes = 3});
  FormGroup(1);
  auto sink = std::make_shared<RecordingSink>();
  AsyncResult result;
  router_->GenerateAsync(Request(), absl::InfiniteFuture(), sink, result.Done(sink));
  KillWorker(0, Worker(0)->WaitForStream());
  EXPECT_EQ(result.calls(), 1);
  EXPECT_EQ(result.outcome().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(std::string(result.outcome().message()), HasSubstr("no rank is left"));
  EXPECT_FALSE(router_->Ready().ok());
}

TEST_F(RouterResumeTest, ShutdownEndsWaitingRequests) {
  MakeGroup({.max_resumes = 2});
  auto sink = std::make_shared<RecordingSink>();
  AsyncResult result;
  router_->GenerateAsync(Request(), absl::InfiniteFuture(), sink, result.Done(sink));
  KillWorker(0, Worker(0)->WaitForStream());
  EXPECT_EQ(result.calls(), 0);
  router_->Shutdown();
  EXPECT_EQ(result.calls(), 1);
  EXPECT_THAT(std::string(result.outcome().message()), HasSubstr("shutting down"));
}

}  // namespace
}  // namespace joule::cluster
