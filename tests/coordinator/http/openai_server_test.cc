// The HTTP front door end to end over loopback: a real HttpServer on port 0
// with the OpenAI service in front of a fake generation backend, and a Beast
// client. Every error case asserts status, error.type and error.param.
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "coordinator/cluster/fake_clock.h"
#include "coordinator/http/fake_generation_backend.h"
#include "coordinator/http/http_server.h"
#include "coordinator/http/openai_service.h"
#include "coordinator/tokenizer/chat_template.h"
#include "coordinator/tokenizer/tokenizer.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/coordinator/http/http_test_client.h"

namespace joule::http {
namespace {

using ::joule::http::testing::SseData;
using ::joule::http::testing::TestClient;
using ::testing::Contains;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::Not;
using Json = nlohmann::json;
namespace bhttp = boost::beast::http;

constexpr int64_t kMaxContext = 64;
constexpr int kImEnd = 258;
constexpr int kEndOfText = 256;

std::vector<int32_t> Bytes(const std::string& s) { return std::vector<int32_t>(s.begin(), s.end()); }

class OpenAiServerTest : public ::testing::Test {
 protected:
  // With no `tokenizer`, the built-in ChatML one.
  void Start(OpenAiServiceOptions options = {}, int64_t max_body_bytes = 1 << 20,
             std::unique_ptr<tokenizer::Tokenizer> tokenizer = nullptr) {
    if (options.model_name.empty()) options.model_name = "tiny";
    if (options.max_context == 0) options.max_context = kMaxContext;
    if (tokenizer == nullptr) {
      auto t = tokenizer::ParseTokenizerJson(tokenizer::MakeByteLevelTokenizerJson(), "byte-level");
      ASSERT_TRUE(t.ok()) << t.status();
      tokenizer = std::move(*t);
    }
    tokenizer_ = std::move(tokenizer);
    registry_ = std::make_shared<prometheus::Registry>();
    service_ = std::make_unique<OpenAiService>(options, tokenizer_.get(), &backend_, registry_, &clock_);
    auto server = HttpServer::Start(
        {.host = "127.0.0.1", .port = 0, .threads = 2, .max_body_bytes = max_body_bytes}, service_.get());
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = std::move(*server);
  }
  void TearDown() override {
    if (server_) server_->Stop();
  }

  testing::ClientResponse Post(const std::string& path, const std::string& body,
                               std::vector<std::pair<std::string, std::string>> headers = {}) {
    TestClient c(server_->port());
    return c.Request(bhttp::verb::post, path, body, std::move(headers));
  }
  testing::ClientResponse Get(const std::string& path, std::vector<std::pair<std::string, std::string>> headers = {}) {
    TestClient c(server_->port());
    return c.Request(bhttp::verb::get, path, "", std::move(headers));
  }

  // The error body's fields, after checking the status and the shape.
  static Json ExpectError(const testing::ClientResponse& r, int status, const std::string& type,
                          const Json& param = nullptr) {
    EXPECT_EQ(r.result_int(), status) << r.body();
    Json j = Json::parse(r.body(), nullptr, false);
    EXPECT_TRUE(j.is_object() && j.contains("error")) << r.body();
    if (!j.is_object() || !j.contains("error")) return Json::object();
    const Json& e = j["error"];
    EXPECT_EQ(e["type"], type) << r.body();
    EXPECT_EQ(e["param"], param) << r.body();
    EXPECT_TRUE(e["message"].is_string() && !e["message"].get<std::string>().empty());
    EXPECT_TRUE(e.contains("code"));
    EXPECT_EQ(r[bhttp::field::content_type], "application/json");
    return e;
  }

  cluster::FakeClock clock_{absl::FromUnixSeconds(1700000000)};
  FakeGenerationBackend backend_;
  std::unique_ptr<tokenizer::Tokenizer> tokenizer_;
  std::shared_ptr<prometheus::Registry> registry_;
  std::unique_ptr<OpenAiService> service_;
  std::unique_ptr<HttpServer> server_;
};

TEST_F(OpenAiServerTest, ModelsListTheServedModel) {
  Start();
  auto r = Get("/v1/models");
  ASSERT_EQ(r.result_int(), 200) << r.body();
  const Json j = Json::parse(r.body());
  EXPECT_EQ(j["object"], "list");
  ASSERT_EQ(j["data"].size(), 1u);
  EXPECT_EQ(j["data"][0]["id"], "tiny");
  EXPECT_EQ(j["data"][0]["object"], "model");
  EXPECT_EQ(j["data"][0]["owned_by"], "joule");
  EXPECT_EQ(Get("/v1/models/tiny").result_int(), 200);
  Json e = ExpectError(Get("/v1/models/other"), 404, "invalid_request_error", "model");
  EXPECT_EQ(e["code"], "model_not_found");
}

TEST_F(OpenAiServerTest, CompletionWithTextPrompt) {
  Start();
  backend_.SetScript(Bytes("Hi!"), v1::FINISH_REASON_LENGTH);
  auto r = Post("/v1/completions", R"({"model": "tiny", "prompt": "abc", "max_tokens": 3, "temperature": 0,
                                       "top_p": 0.5, "top_k": 4, "seed": 9})");
  ASSERT_EQ(r.result_int(), 200) << r.body();
  const Json j = Json::parse(r.body());
  EXPECT_EQ(j["object"], "text_completion");
  EXPECT_THAT(j["id"].get<std::string>(), ::testing::MatchesRegex("cmpl-[0-9a-f]{32}"));
  EXPECT_EQ(j["created"], 1700000000);
  EXPECT_EQ(j["model"], "tiny");
  EXPECT_EQ(j["service_tier"], "default");
  EXPECT_EQ(j["choices"][0]["text"], "Hi!");
  EXPECT_EQ(j["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(j["usage"], (Json{{"prompt_tokens", 3}, {"completion_tokens", 3}, {"total_tokens", 6},
                              {"prompt_tokens_details", {{"cached_tokens", 0}}}}));

  // What reached the backend: the tokenizer's ids and the sampling fields.
  auto call = backend_.WaitForCall(1);
  ASSERT_NE(call, nullptr);
  const v1::GenerateRequest& g = call->request();
  EXPECT_THAT(std::vector<int32_t>(g.prompt_token_ids().begin(), g.prompt_token_ids().end()),
              ElementsAre('a', 'b', 'c'));
  EXPECT_EQ(g.request_id(), j["id"]);
  EXPECT_EQ(g.sampling().max_tokens(), 3);
  EXPECT_EQ(g.sampling().temperature(), 0.0f);
  EXPECT_EQ(g.sampling().top_p(), 0.5f);
  EXPECT_EQ(g.sampling().top_k(), 4);
  EXPECT_EQ(g.sampling().seed(), 9u);
  EXPECT_EQ(g.sampling().stop_token_ids_size(), 0);
}

TEST_F(OpenAiServerTest, CompletionWithTokenIdsAndDefaultMaxTokens) {
  Start();
  backend_.SetScript({1, 2}, v1::FINISH_REASON_STOP);
  auto r = Post("/v1/completions", R"({"model": "tiny", "prompt": [5, 6, 7, 8]})");
  ASSERT_EQ(r.result_int(), 200) << r.body();
  const Json j = Json::parse(r.body());
  EXPECT_EQ(j["usage"]["prompt_tokens"], 4);
  EXPECT_EQ(j["usage"]["completion_tokens"], 2);
  EXPECT_EQ(j["choices"][0]["finish_reason"], "stop");
  EXPECT_EQ(backend_.WaitForCall(1)->request().sampling().max_tokens(), 16);  // OpenAI's default
}

TEST_F(OpenAiServerTest, ChatStreamsRoleTokensFinishUsageAndOneDone) {
  Start();
  backend_.SetScript({'H', 'i', kImEnd}, v1::FINISH_REASON_STOP);
  auto r = Post("/v1/chat/completions",
                R"({"model": "tiny", "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
                    "max_completion_tokens": 8, "stream": true, "stream_options": {"include_usage": true}})");
  ASSERT_EQ(r.result_int(), 200) << r.body();
  EXPECT_EQ(r[bhttp::field::content_type], "text/event-stream");
  const std::vector<std::string> events = SseData(r.body());
  ASSERT_GE(events.size(), 4u) << r.body();
  EXPECT_EQ(events.back(), "[DONE]");
  EXPECT_EQ(std::count(events.begin(), events.end(), "[DONE]"), 1);

  std::string content;
  int token_chunks = 0;
  std::string finish;
  Json usage;
  for (size_t i = 0; i + 1 < events.size(); ++i) {
    const Json e = Json::parse(events[i]);
    EXPECT_EQ(e["object"], "chat.completion.chunk");
    EXPECT_THAT(e["id"].get<std::string>(), ::testing::StartsWith("chatcmpl-"));
    if (e["choices"].empty()) {
      usage = e["usage"];
      continue;
    }
    EXPECT_TRUE(e["usage"].is_null());  // include_usage: null on every other chunk
    const Json& c = e["choices"][0];
    if (i == 0) {
      EXPECT_EQ(c["delta"], (Json{{"role", "assistant"}, {"content", ""}}));
      continue;
    }
    if (!c["finish_reason"].is_null()) {
      finish = c["finish_reason"];
      continue;
    }
    ++token_chunks;
    content += c["delta"]["content"].get<std::string>();
  }
  EXPECT_EQ(content, "Hi");  // <|im_end|> is never printed
  EXPECT_EQ(finish, "stop");
  EXPECT_EQ(token_chunks, 3);
  EXPECT_EQ(usage["completion_tokens"], 3);

  // The prompt is the ChatML rendering, stopped by <|im_end|> and end-of-text.
  const v1::GenerateRequest& g = backend_.WaitForCall(1)->request();
  auto rendered = tokenizer::RenderChatMl({{"system", "s"}, {"user", "u"}}, true);
  ASSERT_TRUE(rendered.ok());
  auto ids = tokenizer_->Encode(*rendered);
  ASSERT_TRUE(ids.ok());
  EXPECT_EQ(std::vector<int32_t>(g.prompt_token_ids().begin(), g.prompt_token_ids().end()), *ids);
  EXPECT_EQ(usage["prompt_tokens"], ids->size());
  EXPECT_THAT(g.sampling().stop_token_ids(), Contains(kImEnd));
  EXPECT_THAT(g.sampling().stop_token_ids(), Contains(kEndOfText));
  EXPECT_EQ(g.sampling().max_tokens(), 8);
}

// DeepSeek-V3 (the built-in tokenizer files): the chat prompt is its template, BOS
// once, stopped by <｜end▁of▁sentence｜>; a text completion prompt gets the BOS
// its tokenizer_config.json asks for; a token-id prompt is taken as it is.
TEST_F(OpenAiServerTest, DeepseekV3PromptsStartWithOneBos) {
  constexpr int32_t kBos = 256, kEos = 258, kUser = 259, kAssistant = 260;
  auto t = tokenizer::ParseTokenizerJson(tokenizer::MakeDeepseekV3ByteLevelTokenizerJson(), "tokenizer.json",
                                         tokenizer::MakeDeepseekV3TokenizerConfigJson(kMaxContext),
                                         "tokenizer_config.json");
  ASSERT_TRUE(t.ok()) << t.status();
  Start({.chat_format = tokenizer::ChatFormat::kDeepseekV3}, 1 << 20, std::move(*t));
  auto prompt_of = [&](size_t call) {
    const v1::GenerateRequest& g = backend_.WaitForCall(call)->request();
    return std::vector<int32_t>(g.prompt_token_ids().begin(), g.prompt_token_ids().end());
  };

  backend_.SetScript({'o', 'k', kEos}, v1::FINISH_REASON_STOP);
  auto r = Post("/v1/chat/completions",
                R"({"model": "tiny", "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                    {"role": "assistant", "content": "a"}, {"role": "user", "content": "v"}], "max_tokens": 4})");
  ASSERT_EQ(r.result_int(), 200) << r.body();
  Json j = Json::parse(r.body());
  EXPECT_EQ(j["choices"][0]["message"]["content"], "ok");  // the end of sentence is not printed
  EXPECT_THAT(prompt_of(1), ElementsAre(kBos, 's', kUser, 'u', kAssistant, 'a', kEos, kUser, 'v', kAssistant));
  EXPECT_EQ(j["usage"]["prompt_tokens"], 10);
  EXPECT_THAT(backend_.WaitForCall(1)->request().sampling().stop_token_ids(), ElementsAre(kEos));

  backend_.SetScript({'!'}, v1::FINISH_REASON_LENGTH);
  r = Post("/v1/completions", R"({"model": "tiny", "prompt": "abc", "max_tokens": 1})");
  ASSERT_EQ(r.result_int(), 200) << r.body();
  EXPECT_THAT(prompt_of(2), ElementsAre(kBos, 'a', 'b', 'c'));
  EXPECT_EQ(Json::parse(r.body())["usage"]["prompt_tokens"], 4);
  EXPECT_EQ(backend_.WaitForCall(2)->request().sampling().stop_token_ids_size(), 0);

  r = Post("/v1/completions", R"({"model": "tiny", "prompt": [97, 98], "max_tokens": 1})");
  ASSERT_EQ(r.result_int(), 200) << r.body();
  EXPECT_THAT(prompt_of(3), ElementsAre('a', 'b'));
}

TEST_F(OpenAiServerTest, ChatDefaultsToTheRestOfTheContext) {
  Start();
  backend_.SetScript({'x'}, v1::FINISH_REASON_LENGTH);
  auto r = Post("/v1/chat/completions", R"({"model": "tiny", "messages": [{"role": "user", "content": "u"}]})");
  ASSERT_EQ(r.result_int(), 200) << r.body();
  const Json j = Json::parse(r.body());
  EXPECT_EQ(j["object"], "chat.completion");
  EXPECT_EQ(j["choices"][0]["message"]["role"], "assistant");
  EXPECT_EQ(j["choices"][0]["message"]["content"], "x");
  const v1::GenerateRequest& g = backend_.WaitForCall(1)->request();
  EXPECT_EQ(g.sampling().max_tokens(), kMaxContext - g.prompt_token_ids_size());
}

TEST_F(OpenAiServerTest, StopStringTruncatesAndStopsTheWorker) {
  Start();
  backend_.SetScript(Bytes("hello world"), v1::FINISH_REASON_LENGTH);
  auto r = Post("/v1/completions", R"({"model": "tiny", "prompt": "x", "max_tokens": 11, "stop": ["o w", "zz"]})");
  ASSERT_EQ(r.result_int(), 200) << r.body();
  const Json j = Json::parse(r.body());
  EXPECT_EQ(j["choices"][0]["text"], "hell");
  EXPECT_EQ(j["choices"][0]["finish_reason"], "stop");
  EXPECT_EQ(j["usage"]["completion_tokens"], 7);  // "hello w": the token that completed the stop string

  // Streaming: the same text in pieces, and the same finish.
  auto s = Post("/v1/completions",
                R"({"model": "tiny", "prompt": "x", "max_tokens": 11, "stop": "o w", "stream": true})");
  ASSERT_EQ(s.result_int(), 200) << s.body();
  std::string text;
  std::string finish;
  int token_chunks = 0;
  for (const std::string& d : SseData(s.body())) {
    if (d == "[DONE]") continue;
    const Json e = Json::parse(d);
    text += e["choices"][0]["text"].get<std::string>();
    if (e["choices"][0]["finish_reason"].is_null()) {
      ++token_chunks;
    } else {
      finish = e["choices"][0]["finish_reason"];
    }
  }
  EXPECT_EQ(text, "hell");
  EXPECT_EQ(finish, "stop");
  EXPECT_EQ(token_chunks, 7);
}

TEST_F(OpenAiServerTest, EveryTierIsServedAndReported) {
  Start();
  backend_.SetScript({'a'}, v1::FINISH_REASON_LENGTH);
  const std::pair<const char*, const char*> tiers[] = {
      {"fast", "fast"}, {"priority", "priority"}, {"default", "default"}, {"auto", "default"}, {"flex", "flex"}};
  size_t n = 0;
  for (const auto& [asked, reported] : tiers) {
    auto r = Post("/v1/completions", absl::StrCat(R"({"model": "tiny", "prompt": "x", "max_tokens": 1, "service_tier": ")",
                                                  asked, R"("})"));
    ASSERT_EQ(r.result_int(), 200) << r.body();
    EXPECT_EQ(Json::parse(r.body())["service_tier"], reported) << asked;
    EXPECT_EQ(backend_.WaitForCall(++n)->request().service_tier(), reported) << asked;
  }
}

TEST_F(OpenAiServerTest, InvalidRequestsGet400NamingTheField) {
  Start();
  backend_.SetScript({'a'}, v1::FINISH_REASON_LENGTH);
  struct Case {
    std::string path;
    std::string body;
    Json param;
    Json code = nullptr;
  };
  const std::string long_prompt(kMaxContext, 'p');
  const Case cases[] = {
      {"/v1/completions", "{", nullptr},
      {"/v1/completions", "[1, 2]", nullptr},
      {"/v1/completions", R"({"prompt": "x"})", "model"},
      {"/v1/completions", R"({"model": "tiny", "prompt": "x", "temperature": "hot"})", "temperature"},
      {"/v1/completions", R"({"model": "tiny", "prompt": "x", "max_tokens": -1})", "max_tokens"},
      {"/v1/completions", R"({"model": "tiny", "prompt": "x", "n": 17})", "n"},
      {"/v1/completions", R"({"model": "tiny", "prompt": "x", "service_tier": "gold"})", "service_tier"},
      {"/v1/completions", R"({"model": "tiny", "prompt": "x", "stop": [1]})", "stop[0]"},
      {"/v1/completions", R"({"model": "tiny", "prompt": ""})", "prompt"},
      {"/v1/completions", R"({"model": "tiny", "prompt": ")" + long_prompt + R"("})", "prompt",
       "context_length_exceeded"},
      {"/v1/completions", R"({"model": "tiny", "prompt": "abcd", "max_tokens": 61})", "prompt",
       "context_length_exceeded"},
      {"/v1/chat/completions", R"({"model": "tiny", "messages": [{"role": "user", "content": ")" + long_prompt + R"("}]})",
       "messages", "context_length_exceeded"},
      {"/v1/chat/completions", R"({"model": "tiny", "messages": [{"role": "robot", "content": "x"}]})",
       "messages[0].role"},
      {"/v1/chat/completions", R"({"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]})",
       "messages[0].content[0].type"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.body.substr(0, 120));
    Json e = ExpectError(Post(c.path, c.body), 400, "invalid_request_error", c.param);
    EXPECT_EQ(e["code"], c.code);
  }
  EXPECT_EQ(backend_.calls(), 0u);  // none of them reached a worker
}

TEST_F(OpenAiServerTest, UnknownFieldsAreIgnored) {
  Start();
  backend_.SetScript({'a'}, v1::FINISH_REASON_LENGTH);
  auto r = Post("/v1/completions",
                R"({"model": "tiny", "prompt": "x", "max_tokens": 1, "presence_penalty": 1, "made_up": {"a": [1]}})");
  EXPECT_EQ(r.result_int(), 200) << r.body();
}

TEST_F(OpenAiServerTest, UnknownModelIs404) {
  Start();
  Json e = ExpectError(Post("/v1/completions", R"({"model": "gpt-4", "prompt": "x"})"), 404,
                       "invalid_request_error", "model");
  EXPECT_EQ(e["code"], "model_not_found");
}

TEST_F(OpenAiServerTest, RouterValidationMapsToApiFields) {
  Start();
  backend_.SetValidation(absl::InvalidArgumentError(
      "prompt_token_ids[0]: token id 999 is outside the vocabulary [0, 259)"));
  Json e = ExpectError(Post("/v1/completions", R"({"model": "tiny", "prompt": [999]})"), 400,
                       "invalid_request_error", "prompt");
  EXPECT_THAT(e["message"].get<std::string>(), HasSubstr("999"));
  backend_.SetValidation(absl::OkStatus());
  // Errors the backend reports through `done` before any token (as the Router does).
  backend_.SetStartError(absl::InvalidArgumentError("sampling.top_p: must be in (0, 1]"));
  ExpectError(Post("/v1/completions", R"({"model": "tiny", "prompt": "x"})"), 400, "invalid_request_error", "top_p");
}

TEST_F(OpenAiServerTest, UnknownRouteIs404AndWrongMethodIs405) {
  Start();
  Json e = ExpectError(Get("/v1/nope"), 404, "invalid_request_error");
  EXPECT_THAT(e["message"].get<std::string>(), HasSubstr("/v1/nope"));
  ExpectError(Get("/nope"), 404, "invalid_request_error");

  auto r = Get("/v1/completions");
  ExpectError(r, 405, "invalid_request_error");
  EXPECT_EQ(r[bhttp::field::allow], "POST");
  auto m = Post("/v1/models", "{}");
  ExpectError(m, 405, "invalid_request_error");
  EXPECT_EQ(m[bhttp::field::allow], "GET");
}

TEST_F(OpenAiServerTest, BodyOverTheLimitIs413) {
  Start({}, /*max_body_bytes=*/4096);
  const std::string big = R"({"model": "tiny", "prompt": ")" + std::string(8000, 'x') + R"("})";
  TestClient c(server_->port());
  auto r = c.Request(bhttp::verb::post, "/v1/completions", big);
  ExpectError(r, 413, "invalid_request_error");
  EXPECT_FALSE(r.keep_alive());
  EXPECT_TRUE(c.ServerClosed());
  EXPECT_EQ(backend_.calls(), 0u);
  // A body under the limit still works on a new connection.
  backend_.SetScript({'a'}, v1::FINISH_REASON_LENGTH);
  EXPECT_EQ(Post("/v1/completions", R"({"model": "tiny", "prompt": "x", "max_tokens": 1})").result_int(), 200);
}

TEST_F(OpenAiServerTest, UnparsableHttpIs400AndClosesTheConnection) {
  Start();
  TestClient c(server_->port());
  boost::asio::write(c.socket(), boost::asio::buffer(std::string("NOT AN HTTP REQUEST\r\n\r\n")));
  auto r = c.Read();
  ExpectError(r, 400, "invalid_request_error");
  EXPECT_THAT(r.body(), HasSubstr("malformed HTTP request"));
  EXPECT_TRUE(c.ServerClosed());

  TestClient big(server_->port());
  auto h = big.Request(bhttp::verb::get, "/health", "", {{"X-Padding", std::string(10000, 'p')}});
  ExpectError(h, 431, "invalid_request_error");
}

TEST_F(OpenAiServerTest, KeepAliveServesSeveralRequestsOnOneConnection) {
  Start();
  backend_.SetScript({'a', 'b'}, v1::FINISH_REASON_LENGTH);
  TestClient c(server_->port());
  auto first = c.Request(bhttp::verb::post, "/v1/completions", R"({"model": "tiny", "prompt": "x", "max_tokens": 2})");
  ASSERT_EQ(first.result_int(), 200);
  EXPECT_TRUE(first.keep_alive());
  auto second = c.Request(bhttp::verb::post, "/v1/completions",
                          R"({"model": "tiny", "prompt": "y", "max_tokens": 2, "stream": true})");
  ASSERT_EQ(second.result_int(), 200);
  EXPECT_EQ(SseData(second.body()).back(), "[DONE]");
  auto third = c.Request(bhttp::verb::get, "/v1/models");
  EXPECT_EQ(third.result_int(), 200);
  // An error response keeps the connection too.
  auto fourth = c.Request(bhttp::verb::post, "/v1/completions", "{");
  EXPECT_EQ(fourth.result_int(), 400);
  EXPECT_EQ(c.Request(bhttp::verb::get, "/health").result_int(), 200);
  EXPECT_EQ(backend_.calls(), 2u);
}

TEST_F(OpenAiServerTest, ApiKeyGuardsV1RoutesOnly) {
  Start({.api_keys = {"sekret"}});
  backend_.SetScript({'a'}, v1::FINISH_REASON_LENGTH);
  Json e = ExpectError(Get("/v1/models"), 401, "invalid_request_error");
  EXPECT_EQ(e["code"], "invalid_api_key");
  ExpectError(Get("/v1/models", {{"Authorization", "Bearer wrong!"}}), 401, "invalid_request_error");
  ExpectError(Get("/v1/models", {{"Authorization", "sekret"}}), 401, "invalid_request_error");
  ExpectError(Post("/v1/completions", R"({"model": "tiny", "prompt": "x"})"), 401, "invalid_request_error");
  ExpectError(Get("/v1/unknown"), 401, "invalid_request_error");
  EXPECT_EQ(Get("/v1/models", {{"Authorization", "Bearer sekret"}}).result_int(), 200);
  EXPECT_EQ(Post("/v1/completions", R"({"model": "tiny", "prompt": "x", "max_tokens": 1})",
                 {{"Authorization", "Bearer sekret"}})
                .result_int(),
            200);
  EXPECT_EQ(Get("/health").result_int(), 200);
  EXPECT_EQ(Get("/ready").result_int(), 200);
  EXPECT_EQ(Get("/metrics").result_int(), 200);
  EXPECT_EQ(backend_.calls(), 1u);
}

TEST_F(OpenAiServerTest, FullTierQueueIs429WithRetryAfter) {
  Start({.tier_caps = {1, 256, 1024, 4096}});
  // A fast request that the backend holds.
  TestClient held(server_->port());
  held.Send(bhttp::verb::post, "/v1/completions",
            R"({"model": "tiny", "prompt": "x", "max_tokens": 2, "service_tier": "fast"})");
  auto call = backend_.WaitForCall(1);
  ASSERT_NE(call, nullptr);
  EXPECT_EQ(service_->InFlight(scheduler::Tier::kFast), 1);

  auto r = Post("/v1/completions", R"({"model": "tiny", "prompt": "x", "service_tier": "fast"})");
  Json e = ExpectError(r, 429, "rate_limit_error");
  EXPECT_EQ(r[bhttp::field::retry_after], "1");
  EXPECT_THAT(e["message"].get<std::string>(), HasSubstr("fast"));

  // Other tiers are not affected; the fast tier reopens when the held request ends.
  TestClient standard(server_->port());
  standard.Send(bhttp::verb::post, "/v1/completions", R"({"model": "tiny", "prompt": "x", "max_tokens": 1})");
  auto second = backend_.WaitForCall(2);
  ASSERT_NE(second, nullptr);
  second->Push({'s'}, v1::FINISH_REASON_LENGTH);
  second->Finish();
  EXPECT_EQ(standard.Read().result_int(), 200);

  call->Push({'a', 'b'}, v1::FINISH_REASON_LENGTH);
  call->Finish();
  auto done = held.Read();
  EXPECT_EQ(done.result_int(), 200);
  EXPECT_EQ(Json::parse(done.body())["choices"][0]["text"], "ab");
  EXPECT_EQ(service_->InFlight(scheduler::Tier::kFast), 0);
  backend_.SetScript({'c'}, v1::FINISH_REASON_LENGTH);
  EXPECT_EQ(Post("/v1/completions", R"({"model": "tiny", "prompt": "x", "service_tier": "fast"})").result_int(), 200);
}

TEST_F(OpenAiServerTest, NoWorkerReadyIs503) {
  Start();
  const absl::Status down = absl::UnavailableError("no worker is ready (0 of 2 ranks registered, 0 ready)");
  backend_.SetReady(down);
  backend_.SetStartError(down);
  Json e = ExpectError(Post("/v1/completions", R"({"model": "tiny", "prompt": "x"})"), 503,
                       "service_unavailable_error");
  EXPECT_THAT(e["message"].get<std::string>(), HasSubstr("no worker is ready"));
  // Streaming requests too: the status line waits for the first token.
  ExpectError(Post("/v1/completions", R"({"model": "tiny", "prompt": "x", "stream": true})"), 503,
              "service_unavailable_error");
  ExpectError(Get("/ready"), 503, "service_unavailable_error");
  EXPECT_EQ(Get("/health").result_int(), 200);
  backend_.SetReady(absl::OkStatus());
  EXPECT_EQ(Get("/ready").result_int(), 200);
  EXPECT_EQ(service_->InFlight(scheduler::Tier::kStandard), 0);
}

TEST_F(OpenAiServerTest, ErrorMidStreamEndsWithAnErrorEventAndOneDone) {
  Start();
  TestClient c(server_->port());
  c.Send(bhttp::verb::post, "/v1/completions", R"({"model": "tiny", "prompt": "x", "max_tokens": 5, "stream": true})");
  auto call = backend_.WaitForCall(1);
  ASSERT_NE(call, nullptr);
  ASSERT_TRUE(call->Push({'a'}));
  call->Finish(absl::UnavailableError("rank 1 died: heartbeat lost"));
  auto r = c.Read();
  ASSERT_EQ(r.result_int(), 200);
  const std::vector<std::string> events = SseData(r.body());
  ASSERT_EQ(events.size(), 3u) << r.body();
  EXPECT_EQ(Json::parse(events[0])["choices"][0]["text"], "a");
  const Json err = Json::parse(events[1]);
  EXPECT_EQ(err["error"]["type"], "service_unavailable_error");
  EXPECT_THAT(err["error"]["message"].get<std::string>(), HasSubstr("a worker serving the request died"));
  EXPECT_EQ(events[2], "[DONE]");
}

TEST_F(OpenAiServerTest, ClientThatDisconnectsMidStreamCancelsItsGeneration) {
  Start();
  TestClient c(server_->port());
  c.Send(bhttp::verb::post, "/v1/completions",
         R"({"model": "tiny", "prompt": "x", "max_tokens": 50, "stream": true})");
  auto call = backend_.WaitForCall(1);
  ASSERT_NE(call, nullptr);
  ASSERT_TRUE(call->Push({'a'}));
  EXPECT_THAT(c.ReadUntil("data: "), HasSubstr("200 OK"));
  c.Close();
  EXPECT_TRUE(backend_.WaitCancelled(call->request().request_id()));
  EXPECT_TRUE(call->finished());
  // Later tokens are refused, as the Router sees a client that has gone.
  EXPECT_FALSE(call->Push({'b'}));
  EXPECT_EQ(service_->InFlight(scheduler::Tier::kStandard), 0);
}

TEST_F(OpenAiServerTest, ClientThatDisconnectsBeforeAnyTokenCancelsToo) {
  Start();
  TestClient c(server_->port());
  c.Send(bhttp::verb::post, "/v1/chat/completions",
         R"({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 20})");
  auto call = backend_.WaitForCall(1);
  ASSERT_NE(call, nullptr);
  c.Close();
  EXPECT_TRUE(backend_.WaitCancelled(call->request().request_id()));
}

TEST_F(OpenAiServerTest, MetricsCountRequestsTokensAndLatencies) {
  Start();
  backend_.SetScript({'a', 'b', 'c'}, v1::FINISH_REASON_LENGTH);
  ASSERT_EQ(Post("/v1/completions", R"({"model": "tiny", "prompt": "xy", "max_tokens": 3, "service_tier": "flex"})")
                .result_int(),
            200);
  ExpectError(Post("/v1/completions", "{"), 400, "invalid_request_error");
  auto r = Get("/metrics");
  ASSERT_EQ(r.result_int(), 200);
  EXPECT_THAT(std::string(r[bhttp::field::content_type]), HasSubstr("text/plain"));
  const std::string& m = r.body();
  EXPECT_THAT(m, HasSubstr(R"(joule_http_requests_total{route="/v1/completions",status="200",tier="batch"} 1)"));
  EXPECT_THAT(m, HasSubstr(R"(joule_http_requests_total{route="/v1/completions",status="400",tier=""} 1)"));
  EXPECT_THAT(m, HasSubstr(R"(joule_prompt_tokens_total{tier="batch"} 2)"));
  EXPECT_THAT(m, HasSubstr(R"(joule_generation_tokens_total{tier="batch"} 3)"));
  EXPECT_THAT(m, HasSubstr(R"(joule_time_to_first_token_seconds_count{tier="batch"} 1)"));
  EXPECT_THAT(m, HasSubstr(R"(joule_e2e_request_latency_seconds_count{tier="batch"} 1)"));
  EXPECT_THAT(m, HasSubstr(R"(joule_inter_token_latency_seconds_count{tier="batch"} 2)"));
  EXPECT_THAT(m, HasSubstr(R"(joule_request_success_total{finished_reason="length",tier="batch"} 1)"));
  EXPECT_THAT(m, HasSubstr(R"(joule_num_requests_running{tier="batch"} 0)"));
}

}  // namespace
}  // namespace joule::http

namespace joule::http {
namespace {

// Ids are 128 random bits, distinct and unrelated to each other: a client
// cannot work out another's id (and cancel it) from its own.
TEST_F(OpenAiServerTest, RequestIdsAreRandom128BitHex) {
  Start();
  backend_.SetScript({'a'}, v1::FINISH_REASON_LENGTH);
  std::set<std::string> ids;
  for (int i = 0; i < 20; ++i) {
    auto r = Post("/v1/chat/completions",
                  R"({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1})");
    ASSERT_EQ(r.result_int(), 200) << r.body();
    const std::string id = Json::parse(r.body())["id"];
    EXPECT_THAT(id, ::testing::MatchesRegex("chatcmpl-[0-9a-f]{32}"));
    ids.insert(id);
  }
  EXPECT_EQ(ids.size(), 20u);
  // Not a counter: consecutive ids differ in their first hex digits too.
  std::string prev;
  int same_prefix = 0;
  for (const std::string& id : ids) {
    if (!prev.empty() && id.substr(9, 16) == prev.substr(9, 16)) ++same_prefix;
    prev = id;
  }
  EXPECT_EQ(same_prefix, 0);
}

// A worker that ended the request early (a Cancel, not this client) must not
// look like a normal finish: before, this came out as finish_reason "length".
TEST_F(OpenAiServerTest, RequestCancelledElsewhereIsReportedAsCancelled) {
  Start();
  backend_.SetScript({'a', 'b'}, v1::FINISH_REASON_CANCELLED);
  auto r = Post("/v1/completions", R"({"model": "tiny", "prompt": "x", "max_tokens": 10})");
  Json e = ExpectError(r, 500, "cancelled");
  EXPECT_THAT(e["message"].get<std::string>(), HasSubstr("cancelled before it finished"));
  EXPECT_THAT(r.body(), Not(HasSubstr("length")));

  auto s = Post("/v1/completions", R"({"model": "tiny", "prompt": "x", "max_tokens": 10, "stream": true})");
  ASSERT_EQ(s.result_int(), 200);
  const std::vector<std::string> events = SseData(s.body());
  ASSERT_GE(events.size(), 2u) << s.body();
  EXPECT_EQ(events.back(), "[DONE]");
  const Json err = Json::parse(events[events.size() - 2]);
  EXPECT_EQ(err["error"]["type"], "cancelled") << s.body();
  for (const std::string& ev : events) {
    if (ev == "[DONE]") continue;
    const Json j = Json::parse(ev);
    if (j.contains("choices")) {
      EXPECT_NE(j["choices"][0]["finish_reason"], "length") << ev;
    }
  }
  EXPECT_EQ(service_->InFlight(scheduler::Tier::kStandard), 0);
}

// 5xx bodies carry the reason; addresses, ports, ids and transport errors
// stay in the log.
TEST_F(OpenAiServerTest, ServerErrorsDoNotLeakInternals) {
  Start();
  const absl::Status down = absl::UnavailableError(
      "rank 1 failed request cmpl-00aa (rank 0 dead: worker unreachable: 10.9.8.7:4567): UNAVAILABLE: "
      "UCX error Connection reset by remote peer on /dev/shm/ucx-1");
  backend_.SetReady(down);
  backend_.SetStartError(down);
  for (auto r : {Get("/ready"), Post("/v1/completions", R"({"model": "tiny", "prompt": "x"})")}) {
    Json e = ExpectError(r, 503, "service_unavailable_error");
    const std::string message = e["message"];
    EXPECT_THAT(message, HasSubstr("retry"));
    for (const char* leak : {"10.9.8.7", "4567", "cmpl-00aa", "UCX", "/dev/shm", "rank 0"}) {
      EXPECT_THAT(r.body(), Not(HasSubstr(leak))) << r.body();
    }
  }
  // Mid-stream errors too.
  backend_.SetStartError(absl::OkStatus());
  TestClient c(server_->port());
  c.Send(bhttp::verb::post, "/v1/completions", R"({"model": "tiny", "prompt": "x", "max_tokens": 5, "stream": true})");
  auto call = backend_.WaitForCall(2);
  ASSERT_NE(call, nullptr);
  ASSERT_TRUE(call->Push({'a'}));
  call->Finish(absl::InternalError("worker 10.9.8.7:4567 said: UCX error bad address"));
  auto r = c.Read();
  EXPECT_THAT(r.body(), HasSubstr("server_error"));
  for (const char* leak : {"10.9.8.7", "UCX"}) EXPECT_THAT(r.body(), Not(HasSubstr(leak))) << r.body();
}

TEST_F(OpenAiServerTest, SeveralApiKeysAreAccepted) {
  Start({.api_keys = {"key-one", "a-much-longer-second-key"}});
  EXPECT_EQ(Get("/v1/models", {{"Authorization", "Bearer key-one"}}).result_int(), 200);
  EXPECT_EQ(Get("/v1/models", {{"Authorization", "Bearer a-much-longer-second-key"}}).result_int(), 200);
  ExpectError(Get("/v1/models", {{"Authorization", "Bearer key-on"}}), 401, "invalid_request_error");
  ExpectError(Get("/v1/models", {{"Authorization", "Bearer key-one2"}}), 401, "invalid_request_error");
  ExpectError(Get("/v1/models", {{"Authorization", "Bearer "}}), 401, "invalid_request_error");
  ExpectError(Get("/v1/models", {{"Authorization", "key-one"}}), 401, "invalid_request_error");
}

TEST_F(OpenAiServerTest, MetricsCanRequireAKey) {
  Start({.api_keys = {"scrape-key"}, .metrics_require_key = true});
  Json e = ExpectError(Get("/metrics"), 401, "invalid_request_error");
  EXPECT_EQ(e["code"], "invalid_api_key");
  ExpectError(Get("/metrics", {{"Authorization", "Bearer wrong"}}), 401, "invalid_request_error");
  auto ok = Get("/metrics", {{"Authorization", "Bearer scrape-key"}});
  EXPECT_EQ(ok.result_int(), 200);
  EXPECT_THAT(ok.body(), HasSubstr("# TYPE"));
  // Health checks stay open for load balancers.
  EXPECT_EQ(Get("/health").result_int(), 200);
}

}  // namespace
}  // namespace joule::http
