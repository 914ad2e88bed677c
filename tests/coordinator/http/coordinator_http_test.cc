// The coordinator's HTTP flags and wiring: options parsing (ports, tier caps,
// the API key and its redaction) and a CoordinatorServer that serves the API
// in front of its real Router (no workers, so generation is 503).
#include <cstdlib>
#include <fstream>

#include <grpcpp/grpcpp.h>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/model_fingerprint.h"
#include "coordinator/cluster/coordinator_options.h"
#include "coordinator/cluster/coordinator_server.h"
#include "coordinator/tokenizer/tokenizer.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "proto/joule/v1/cluster.grpc.pb.h"
#include "tests/coordinator/cluster/test_model.h"
#include "tests/coordinator/http/http_test_client.h"
#include "tests/testing/listen_address.h"

namespace joule::cluster {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;
using Json = nlohmann::json;
namespace bhttp = boost::beast::http;

absl::StatusOr<CoordinatorOptions> Parse(std::vector<const char*> args) {
  args.insert(args.begin(), "joule-coordinator");
  return ParseCoordinatorOptions(static_cast<int>(args.size()), args.data());
}

TEST(CoordinatorHttpOptions, DefaultsLeaveHttpOff) {
  auto o = Parse({"--model", "/m"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->http_port, -1);
  EXPECT_EQ(o->max_body_bytes, 1 << 20);
  // Secure by default: nothing listens beyond this host unless asked.
  EXPECT_EQ(o->host, "127.0.0.1");
  EXPECT_EQ(o->grpc_host, "127.0.0.1");
  EXPECT_FALSE(o->metrics_require_key);
}

TEST(CoordinatorHttpOptions, MetricsRequireKeyNeedsAKey) {
  auto none = Parse({"--model", "/m", "--metrics-require-key"});
  ASSERT_FALSE(none.ok());
  EXPECT_THAT(std::string(none.status().message()), HasSubstr("--metrics-require-key"));
  EXPECT_TRUE(Parse({"--model", "/m", "--metrics-require-key", "--api-key", "k"}).ok());
  EXPECT_TRUE(Parse({"--model", "/m", "--metrics-require-key", "--api-key-file", "/keys"}).ok());
}

// With no --host/--grpc-host, the HTTP and gRPC ports are reachable from this
// host only (before, both listened on every interface).
TEST(CoordinatorServerHttp, ListensOnLoopbackByDefault) {
  testing::TinyModelDir model;
  std::ofstream(model.path() + "/tokenizer.json") << tokenizer::MakeByteLevelTokenizerJson();
  auto o = Parse({"--model", model.path().c_str(), "--workers", "1", "--http-port", "0"});
  ASSERT_TRUE(o.ok()) << o.status();
  auto server = CoordinatorServer::Start(*o);
  ASSERT_TRUE(server.ok()) << server.status();
  EXPECT_TRUE(joule::testing::ListensOnLoopbackOnly((*server)->port()));
  EXPECT_TRUE(joule::testing::ListensOnLoopbackOnly((*server)->http_port()));
  (*server)->Stop();
}

// Keys from --api-key-file (several, comments skipped) and --api-key are all
// accepted; --metrics-require-key closes /metrics to scrapers without one.
TEST(CoordinatorServerHttp, ApiKeyFileAndMetricsKey) {
  testing::TinyModelDir model;
  std::ofstream(model.path() + "/tokenizer.json") << tokenizer::MakeByteLevelTokenizerJson();
  const std::string keys = model.path() + "/keys";
  std::ofstream(keys) << "# clients\nclient-key\n\nprometheus-key\n";
  auto o = Parse({"--model", model.path().c_str(), "--workers", "1", "--http-port", "0", "--api-key", "flag-key",
                  "--api-key-file", keys.c_str(), "--metrics-require-key"});
  ASSERT_TRUE(o.ok()) << o.status();
  auto server = CoordinatorServer::Start(*o);
  ASSERT_TRUE(server.ok()) << server.status();
  http::testing::TestClient c((*server)->http_port());
  for (const char* key : {"flag-key", "client-key", "prometheus-key"}) {
    EXPECT_EQ(c.Request(bhttp::verb::get, "/v1/models", "", {{"Authorization", absl::StrCat("Bearer ", key)}})
                  .result_int(),
              200)
        << key;
  }
  EXPECT_EQ(c.Request(bhttp::verb::get, "/v1/models", "", {{"Authorization", "Bearer # clients"}}).result_int(),
            401);
  EXPECT_EQ(c.Request(bhttp::verb::get, "/metrics").result_int(), 401);
  EXPECT_EQ(c.Request(bhttp::verb::get, "/metrics", "", {{"Authorization", "Bearer prometheus-key"}}).result_int(),
            200);
  (*server)->Stop();

  o->api_key_file = model.path() + "/missing";
  auto bad = CoordinatorServer::Start(*o);
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(std::string(bad.status().message()), HasSubstr("--api-key-file"));
}

// A DeepSeek-V3 checkpoint gets DeepSeek-V3's chat template: its tokenizer must have the
// template's markers, or the coordinator refuses to start, naming the file and the token.
TEST(CoordinatorServerHttp, DeepseekV3NeedsItsChatMarkers) {
  testing::TinyModelDir model(R"({"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
      "vocab_size": 100, "hidden_size": 16, "num_hidden_layers": 2, "n_routed_experts": 4,
      "num_experts_per_tok": 2, "first_k_dense_replace": 1, "max_position_embeddings": 64})");
  std::ofstream(model.path() + "/tokenizer.json") << tokenizer::MakeByteLevelTokenizerJson();
  auto o = Parse({"--model", model.path().c_str(), "--workers", "1", "--http-port", "0"});
  ASSERT_TRUE(o.ok()) << o.status();
  auto refused = CoordinatorServer::Start(*o);
  ASSERT_FALSE(refused.ok());
  EXPECT_THAT(std::string(refused.status().message()),
              HasSubstr(model.path() + "/tokenizer.json: the tokenizer has no added token "
                        "\"<｜begin▁of▁sentence｜>\", which the DeepSeek-V3 chat template writes"));

  std::ofstream(model.path() + "/tokenizer.json") << tokenizer::MakeDeepseekV3ByteLevelTokenizerJson();
  std::ofstream(model.path() + "/tokenizer_config.json") << tokenizer::MakeDeepseekV3TokenizerConfigJson(64);
  auto server = CoordinatorServer::Start(*o);
  ASSERT_TRUE(server.ok()) << server.status();
  (*server)->Stop();
}

TEST(CoordinatorHttpOptions, TierQueueCaps) {
  auto defaults = ParseTierQueueCaps("");
  ASSERT_TRUE(defaults.ok());
  EXPECT_EQ(*defaults, (TierCaps{64, 256, 1024, 4096}));
  auto some = ParseTierQueueCaps("batch=10, fast=2");
  ASSERT_TRUE(some.ok()) << some.status();
  EXPECT_EQ(*some, (TierCaps{2, 256, 1024, 10}));
  for (const char* bad : {"gold=3", "fast=0", "fast", "fast=x", "priority=-1"}) {
    auto r = ParseTierQueueCaps(bad);
    EXPECT_FALSE(r.ok()) << bad;
    EXPECT_THAT(std::string(r.status().message()), HasSubstr("--tier-queue-cap")) << bad;
  }
  EXPECT_FALSE(Parse({"--model", "/m", "--tier-queue-cap", "fast=0"}).ok());
  EXPECT_FALSE(Parse({"--model", "/m", "--http-port", "-2"}).ok());
  EXPECT_FALSE(Parse({"--model", "/m", "--max-body-bytes", "10"}).ok());
}

TEST(CoordinatorHttpOptions, ApiKeyFromEnvironmentAndNeverPrinted) {
  setenv("JOULE_API_KEY", "from-env-key", 1);
  auto env = Parse({"--model", "/m"});
  ASSERT_TRUE(env.ok());
  EXPECT_EQ(env->api_key, "from-env-key");
  auto flag = Parse({"--model", "/m", "--api-key", "flag-key"});
  unsetenv("JOULE_API_KEY");
  ASSERT_TRUE(flag.ok());
  EXPECT_EQ(flag->api_key, "flag-key");  // the flag wins
  EXPECT_THAT(flag->ToString(), Not(HasSubstr("flag-key")));
  EXPECT_THAT(flag->ToString(), HasSubstr("(set)"));
}

// A two-rank coordinator on `model` (given a byte-level tokenizer) with its
// HTTP API on a free loopback port.
CoordinatorOptions TwoRankHttpOptions(const testing::TinyModelDir& model) {
  std::ofstream(model.path() + "/tokenizer.json") << tokenizer::MakeByteLevelTokenizerJson();
  CoordinatorOptions o;
  o.model = model.path();
  o.workers = 2;
  o.host = "127.0.0.1";
  o.http_port = 0;
  return o;
}

TEST(CoordinatorServerHttp, ServesTheApiInFrontOfTheRouter) {
  testing::TinyModelDir model;
  CoordinatorOptions o = TwoRankHttpOptions(model);
  o.served_model_name = "tiny-served";
  auto server = CoordinatorServer::Start(o);
  ASSERT_TRUE(server.ok()) << server.status();
  const int port = (*server)->http_port();
  ASSERT_GT(port, 0);
  EXPECT_NE(port, (*server)->port());

  http::testing::TestClient c(port);
  auto models = c.Request(bhttp::verb::get, "/v1/models");
  ASSERT_EQ(models.result_int(), 200);
  const Json m = Json::parse(models.body());
  EXPECT_EQ(m["data"][0]["id"], "tiny-served");
  EXPECT_EQ(m["data"][0]["max_model_len"], 64);  // the checkpoint's max_position_embeddings

  // No worker has registered: not ready, and generation is a 503 with the Router's reason.
  auto ready = c.Request(bhttp::verb::get, "/ready");
  EXPECT_EQ(ready.result_int(), 503);
  auto gen = c.Request(bhttp::verb::post, "/v1/completions", R"({"model": "tiny-served", "prompt": [1, 2]})");
  EXPECT_EQ(gen.result_int(), 503) << gen.body();
  EXPECT_THAT(gen.body(), HasSubstr("no worker is ready"));
  // Token-level validation is the Router's: ids beyond this checkpoint's vocabulary of 100.
  auto bad = c.Request(bhttp::verb::post, "/v1/completions", R"({"model": "tiny-served", "prompt": [150]})");
  EXPECT_EQ(bad.result_int(), 400) << bad.body();
  EXPECT_EQ(Json::parse(bad.body())["error"]["param"], "prompt");
  (*server)->Stop();
}

TEST(CoordinatorServerHttp, NeedsTheTokenizerWhenHttpIsOn) {
  testing::TinyModelDir model;  // no tokenizer.json
  CoordinatorOptions o;
  o.model = model.path();
  o.host = "127.0.0.1";
  o.http_port = 0;
  auto server = CoordinatorServer::Start(o);
  ASSERT_FALSE(server.ok());
  EXPECT_THAT(std::string(server.status().message()), HasSubstr("tokenizer"));
  o.http_port = -1;
  EXPECT_TRUE(CoordinatorServer::Start(o).ok());
}

// /metrics shows the engine limits a worker registered with, by rank, and
// nothing for a rank whose limits are unknown (no worker there yet).
TEST(CoordinatorServerHttp, MetricsShowEachRanksEngineLimits) {
  testing::TinyModelDir model;
  auto server = CoordinatorServer::Start(TwoRankHttpOptions(model));
  ASSERT_TRUE(server.ok()) << server.status();

  v1::RegisterRequest r;
  r.set_protocol_version(v1::PROTOCOL_VERSION_1);
  r.set_model_fingerprint(*ModelFingerprint(model.path()));
  r.set_requested_rank(1);
  r.set_worker_id("w1");
  r.set_transport(v1::TRANSPORT_KIND_UCX);
  r.set_transport_address("addr-w1");
  r.set_worker_endpoint("127.0.0.1:1");
  r.set_max_running(7);
  r.set_max_batch_tokens(333);
  auto coordinator = v1::Coordinator::NewStub(grpc::CreateChannel(
      absl::StrCat("127.0.0.1:", (*server)->port()), grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(5)));
  v1::RegisterReply reply;
  const grpc::Status registered = coordinator->Register(&ctx, r, &reply);
  ASSERT_TRUE(registered.ok()) << registered.error_message();

  http::testing::TestClient c((*server)->http_port());
  auto metrics = c.Request(bhttp::verb::get, "/metrics");
  ASSERT_EQ(metrics.result_int(), 200);
  EXPECT_THAT(metrics.body(), HasSubstr("\n" R"(joule_rank_max_running{rank="1"} 7)" "\n"));
  EXPECT_THAT(metrics.body(), HasSubstr("\n" R"(joule_rank_max_batch_tokens{rank="1"} 333)" "\n"));
  EXPECT_THAT(metrics.body(), Not(HasSubstr(R"(joule_rank_max_running{rank="0"})")));
  EXPECT_THAT(metrics.body(), Not(HasSubstr(R"(joule_rank_max_batch_tokens{rank="0"})")));
  (*server)->Stop();
}

}  // namespace
}  // namespace joule::cluster
