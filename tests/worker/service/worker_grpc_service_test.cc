// The Worker gRPC service end to end over a real server on an ephemeral port:
// streamed tokens match the engine, the final message carries the finish
// reason and counts, bad requests get INVALID_ARGUMENT naming the field, a
// client that goes away frees its KV blocks, Status reports the rank.
#include "worker/service/worker_grpc_service.h"

#include <cmath>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "tests/worker/service/runtime_cluster.h"
#include "worker/service/starting_handler.h"

namespace joule::worker {
namespace {

using ::testing::HasSubstr;
using testing_util::Greedy;
using testing_util::Prompt;
using testing_util::ReferenceTokens;
using testing_util::RuntimeCluster;

class WorkerGrpcServiceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = testing::TinyModelDir("qwen3_moe-tiny");
    service_ = std::make_unique<WorkerGrpcService>(&handler_);
    grpc::ServerBuilder builder;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port_);
    builder.RegisterService(service_.get());
    // Far fewer threads than the streams HoldsManyStreamsOnFewThreads opens:
    // a stream must not need a server thread of its own.
    grpc::ResourceQuota quota("worker-test");
    quota.SetMaxThreads(4);
    builder.SetResourceQuota(quota);
    server_ = builder.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    ASSERT_GT(port_, 0);
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

  v1::GenerateRequest Request(const std::string& id, const std::vector<int32_t>& prompt, int max_tokens) {
    v1::GenerateRequest r;
    r.set_request_id(id);
    r.mutable_prompt_token_ids()->Add(prompt.begin(), prompt.end());
    r.mutable_sampling()->set_temperature(0);
    r.mutable_sampling()->set_max_tokens(max_tokens);
    r.mutable_sampling()->set_ignore_eos(true);
    return r;
  }

  std::string dir_;
  StartingHandler handler_;
  std::unique_ptr<RuntimeCluster> cluster_;
  std::unique_ptr<WorkerGrpcService> service_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<v1::Worker::Stub> stub_;
  int port_ = 0;
};

TEST_F(WorkerGrpcServiceTest, NotReadyBeforeTheRuntimeStarts) {
  grpc::ClientContext ctx;
  auto reader = stub_->Generate(&ctx, Request("early", Prompt(4, 1), 2));
  v1::GenerateResponse msg;
  EXPECT_FALSE(reader->Read(&msg));
  const grpc::Status s = reader->Finish();
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_THAT(s.error_message(), HasSubstr("starting"));
  grpc::ClientContext sctx;
  v1::WorkerStatusReply status;
  ASSERT_TRUE(stub_->Status(&sctx, v1::WorkerStatusRequest(), &status).ok());
  EXPECT_FALSE(status.ready());
  EXPECT_GT(status.resident_bytes(), 0);
}

TEST_F(WorkerGrpcServiceTest, StreamsTheEnginesTokens) {
  StartRuntime();
  const std::vector<int32_t> prompt = Prompt(11, 2);
  grpc::ClientContext ctx;
  auto reader = stub_->Generate(&ctx, Request("r1", prompt, 12));
  std::vector<int32_t> tokens;
  v1::GenerateResponse msg, last;
  while (reader->Read(&msg)) {
    EXPECT_EQ(msg.request_id(), "r1");
    EXPECT_EQ(msg.rank(), 0);
    tokens.insert(tokens.end(), msg.token_ids().begin(), msg.token_ids().end());
    last = msg;
  }
  ASSERT_TRUE(reader->Finish().ok());
  EXPECT_EQ(tokens, ReferenceTokens(dir_, prompt, Greedy(12)));
  EXPECT_EQ(last.finish_reason(), v1::FINISH_REASON_LENGTH);
  EXPECT_EQ(last.prompt_tokens(), 11);
  EXPECT_EQ(last.completion_tokens(), 12);

  grpc::ClientContext sctx;
  v1::WorkerStatusReply status;
  ASSERT_TRUE(stub_->Status(&sctx, v1::WorkerStatusRequest(), &status).ok());
  EXPECT_TRUE(status.ready());
  EXPECT_EQ(status.rank(), 0);
  EXPECT_GT(status.kv_total_blocks(), 0);
  EXPECT_GT(status.loaded_weight_bytes(), 0);
  EXPECT_GT(status.resident_bytes(), 0);
  EXPECT_GT(status.steps(), 0u);
}

TEST_F(WorkerGrpcServiceTest, BadRequestIsInvalidArgumentNamingTheField) {
  StartRuntime();
  v1::GenerateRequest r = Request("bad", {}, 4);
  grpc::ClientContext ctx;
  auto reader = stub_->Generate(&ctx, r);
  v1::GenerateResponse msg;
  EXPECT_FALSE(reader->Read(&msg));
  const grpc::Status s = reader->Finish();
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("prompt_token_ids"));
  // A token outside the vocabulary is refused by the engine, also clearly.
  grpc::ClientContext ctx2;
  auto reader2 = stub_->Generate(&ctx2, Request("bad2", {1, 99999}, 4));
  EXPECT_FALSE(reader2->Read(&msg));
  EXPECT_EQ(reader2->Finish().error_code(), grpc::StatusCode::INVALID_ARGUMENT);
}

TEST_F(WorkerGrpcServiceTest, ClientGoingAwayFreesKvBlocks) {
  StartRuntime();
  const int64_t total = cluster_->runtime(0).Status().kv_total_blocks;
  grpc::ClientContext ctx;
  auto reader = stub_->Generate(&ctx, Request("gone", Prompt(30, 3), 450));
  v1::GenerateResponse msg;
  ASSERT_TRUE(reader->Read(&msg));
  EXPECT_LT(cluster_->runtime(0).Status().kv_free_blocks, total);
  ctx.TryCancel();
  while (reader->Read(&msg)) {
  }
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  while ((cluster_->runtime(0).Status().kv_free_blocks != total ||
          cluster_->runtime(0).Status().running != 0) && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(10));
  }
  EXPECT_EQ(cluster_->runtime(0).Status().kv_free_blocks, total);
  EXPECT_EQ(cluster_->runtime(0).Status().running, 0);
}

TEST_F(WorkerGrpcServiceTest, CancelRpcEndsTheStreamWithCancelledReason) {
  StartRuntime();
  grpc::ClientContext ctx;
  auto reader = stub_->Generate(&ctx, Request("c1", Prompt(10, 4), 450));
  v1::GenerateResponse msg;
  ASSERT_TRUE(reader->Read(&msg));
  grpc::ClientContext cctx;
  v1::CancelRequest cancel;
  cancel.set_request_id("c1");
  v1::CancelReply reply;
  ASSERT_TRUE(stub_->Cancel(&cctx, cancel, &reply).ok());
  EXPECT_TRUE(reply.found());
  v1::GenerateResponse last = msg;
  while (reader->Read(&msg)) last = msg;
  ASSERT_TRUE(reader->Finish().ok());
  EXPECT_EQ(last.finish_reason(), v1::FINISH_REASON_CANCELLED);
  EXPECT_LT(last.completion_tokens(), 450);
  // It is over: the id names nothing any more.
  grpc::ClientContext cctx2;
  EXPECT_EQ(stub_->Cancel(&cctx2, cancel, &reply).error_code(), grpc::StatusCode::NOT_FOUND);
}

// Another client (its own connection) that learns or guesses a request id
// cannot end that request: PERMISSION_DENIED, NOT_FOUND for ids that do not
// run, and the victim's stream finishes normally with every token.
TEST_F(WorkerGrpcServiceTest, CancelOfAnotherCallersRequestIsRefused) {
  StartRuntime();
  const std::vector<int32_t> prompt = Prompt(9, 5);
  constexpr int kTokens = 400;  // long enough to run through the checks below
  grpc::ClientContext ctx;
  auto reader = stub_->Generate(&ctx, Request("victim", prompt, kTokens));
  std::vector<int32_t> tokens;
  v1::GenerateResponse msg, last;
  ASSERT_TRUE(reader->Read(&msg));
  tokens.insert(tokens.end(), msg.token_ids().begin(), msg.token_ids().end());

  grpc::ChannelArguments own_connection;
  own_connection.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  auto attacker = v1::Worker::NewStub(grpc::CreateCustomChannel(
      "127.0.0.1:" + std::to_string(port_), grpc::InsecureChannelCredentials(), own_connection));
  v1::CancelRequest cancel;
  v1::CancelReply reply;
  cancel.set_request_id("victim");
  grpc::ClientContext c1;
  const grpc::Status foreign = attacker->Cancel(&c1, cancel, &reply);
  EXPECT_EQ(foreign.error_code(), grpc::StatusCode::PERMISSION_DENIED) << foreign.error_message();
  cancel.set_request_id("victim-guess-2");
  grpc::ClientContext c2;
  EXPECT_EQ(attacker->Cancel(&c2, cancel, &reply).error_code(), grpc::StatusCode::NOT_FOUND);
  // Nor can it take the id over while it runs.
  grpc::ClientContext c3;
  auto twin = attacker->Generate(&c3, Request("victim", prompt, 2));
  EXPECT_FALSE(twin->Read(&msg));
  EXPECT_EQ(twin->Finish().error_code(), grpc::StatusCode::ALREADY_EXISTS);

  last = msg;
  while (reader->Read(&msg)) {
    tokens.insert(tokens.end(), msg.token_ids().begin(), msg.token_ids().end());
    last = msg;
  }
  ASSERT_TRUE(reader->Finish().ok());
  EXPECT_EQ(last.finish_reason(), v1::FINISH_REASON_LENGTH);
  EXPECT_EQ(tokens, ReferenceTokens(dir_, prompt, Greedy(kTokens)));
}

TEST_F(WorkerGrpcServiceTest, HoldsManyStreamsOnFewThreads) {
  StartRuntime();
  constexpr int kStreams = 24;
  constexpr int kTokens = 20;
  std::vector<std::unique_ptr<grpc::ClientContext>> contexts;
  std::vector<std::unique_ptr<grpc::ClientReader<v1::GenerateResponse>>> readers;
  std::vector<int> received(kStreams, 0);
  v1::GenerateResponse msg;
  // Every stream is open and has produced a token before any is drained.
  for (int i = 0; i < kStreams; ++i) {
    contexts.push_back(std::make_unique<grpc::ClientContext>());
    contexts.back()->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    readers.push_back(stub_->Generate(contexts.back().get(),
                                      Request(absl::StrCat("many-", i), Prompt(6, i), kTokens)));
  }
  for (int i = 0; i < kStreams; ++i) {
    ASSERT_TRUE(readers[i]->Read(&msg)) << "stream " << i << ": " << readers[i]->Finish().error_message();
    received[i] += msg.token_ids_size();
  }
  for (int i = 0; i < kStreams; ++i) {
    while (readers[i]->Read(&msg)) received[i] += msg.token_ids_size();
    const grpc::Status s = readers[i]->Finish();
    EXPECT_TRUE(s.ok()) << "stream " << i << ": " << s.error_message();
    EXPECT_EQ(received[i], kTokens) << "stream " << i;
  }
}

// With logprobs every message carries one entry per token (the engine's
// numbers), and the prompt's entries come once, on the first message with
// tokens; a logit_bias outside the vocabulary is INVALID_ARGUMENT naming it.
TEST_F(WorkerGrpcServiceTest, LogprobsComeOnePerTokenAndThePromptsOnceWithTheFirstTokens) {
  StartRuntime();
  const std::vector<int32_t> prompt = Prompt(9, 3);
  v1::GenerateRequest r = Request("lp", prompt, 6);
  r.mutable_sampling()->set_logprobs(true);
  r.mutable_sampling()->set_top_logprobs(2);
  r.mutable_sampling()->set_prompt_logprobs(true);
  r.mutable_sampling()->set_frequency_penalty(0.5f);
  grpc::ClientContext ctx;
  auto reader = stub_->Generate(&ctx, r);
  std::vector<int32_t> tokens;
  std::vector<v1::TokenLogprob> logprobs, prompt_logprobs;
  int messages_with_prompt = 0;
  v1::GenerateResponse msg;
  while (reader->Read(&msg)) {
    EXPECT_EQ(msg.logprobs_size(), msg.token_ids_size());
    if (msg.prompt_logprobs_size() > 0) {
      ++messages_with_prompt;
      EXPECT_TRUE(tokens.empty()) << "the prompt's logprobs come with the first tokens";
      EXPECT_GT(msg.token_ids_size(), 0);
    }
    tokens.insert(tokens.end(), msg.token_ids().begin(), msg.token_ids().end());
    logprobs.insert(logprobs.end(), msg.logprobs().begin(), msg.logprobs().end());
    prompt_logprobs.insert(prompt_logprobs.end(), msg.prompt_logprobs().begin(), msg.prompt_logprobs().end());
  }
  ASSERT_TRUE(reader->Finish().ok());
  EXPECT_EQ(messages_with_prompt, 1);
  ASSERT_EQ(prompt_logprobs.size(), prompt.size());
  EXPECT_TRUE(std::isnan(prompt_logprobs[0].logprob()));
  for (size_t i = 0; i < prompt.size(); ++i) EXPECT_EQ(prompt_logprobs[i].token_id(), prompt[i]);

  // The single-process engine's numbers for the same request.
  SamplingParams sp = Greedy(6);
  sp.logprobs = true;
  sp.top_logprobs = 2;
  sp.prompt_logprobs = true;
  sp.frequency_penalty = 0.5f;
  auto model = Model::Load(dir_, {.num_threads = 1});
  ASSERT_TRUE(model.ok()) << model.status();
  auto engine = Engine::Create(model->get(), testing_util::SmallEngine());
  ASSERT_TRUE(engine.ok()) << engine.status();
  ASSERT_TRUE((*engine)->Add({.id = 1, .prompt = prompt, .sampling = sp}).ok());
  std::vector<TokenLogprob> want;
  while ((*engine)->HasWork()) {
    auto step = (*engine)->Step();
    ASSERT_TRUE(step.ok()) << step.status();
    for (const TokenOutput& t : step->tokens) want.push_back(*t.logprob);
  }
  ASSERT_EQ(tokens.size(), want.size());
  ASSERT_EQ(logprobs.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) {
    EXPECT_EQ(tokens[i], want[i].token);
    EXPECT_EQ(logprobs[i].token_id(), want[i].token);
    EXPECT_NEAR(logprobs[i].logprob(), want[i].logprob, 1e-5) << "token " << i;
    ASSERT_EQ(logprobs[i].top_size(), 2);
    EXPECT_EQ(logprobs[i].top(0).token_id(), want[i].top[0].token);
    EXPECT_EQ(logprobs[i].top(1).token_id(), want[i].top[1].token);
  }

  v1::GenerateRequest bad = Request("bias", prompt, 2);
  (*bad.mutable_sampling()->mutable_logit_bias())[272] = 1.0f;
  grpc::ClientContext bad_ctx;
  auto bad_reader = stub_->Generate(&bad_ctx, bad);
  EXPECT_FALSE(bad_reader->Read(&msg));
  const grpc::Status s = bad_reader->Finish();
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(s.error_message(), "sampling.logit_bias: token id 272 is out of range [0, 272)");
}

// The final message says how many prompt tokens the rank's prefix cache held.
TEST_F(WorkerGrpcServiceTest, TheFinalMessageCarriesCachedTokens) {
  StartRuntime();
  const std::vector<int32_t> prompt = Prompt(40, 7);  // 2 full blocks of 16, and 8 tokens
  for (int cached : {0, 32}) {
    grpc::ClientContext ctx;
    auto reader = stub_->Generate(&ctx, Request(absl::StrCat("c", cached), prompt, 3));
    v1::GenerateResponse msg, last;
    while (reader->Read(&msg)) last = msg;
    ASSERT_TRUE(reader->Finish().ok());
    EXPECT_EQ(last.finish_reason(), v1::FINISH_REASON_LENGTH);
    EXPECT_EQ(last.cached_tokens(), cached);
  }
}

}  // namespace
}  // namespace joule::worker
