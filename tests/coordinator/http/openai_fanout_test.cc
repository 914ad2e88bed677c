// Requests that fan out to several worker generations (n, best_of, several
// prompts) and the log probabilities, penalties and logit_bias that travel to
// the workers and back, through a real HttpServer in front of the fake
// generation backend. A failing generation must fail the whole request and
// cancel the others.
#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "coordinator/cluster/fake_clock.h"
#include "coordinator/http/fake_generation_backend.h"
#include "coordinator/http/http_server.h"
#include "coordinator/http/openai_service.h"
#include "coordinator/tokenizer/tokenizer.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/coordinator/http/http_test_client.h"

namespace joule::http {
namespace {

using ::joule::http::testing::SseData;
using ::joule::http::testing::TestClient;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::UnorderedElementsAre;
using Json = nlohmann::json;
namespace bhttp = boost::beast::http;

constexpr int kImEnd = 258;

class OpenAiFanoutTest : public ::testing::Test {
 protected:
  void Start(OpenAiServiceOptions options = {}) {
    options.model_name = "tiny";
    options.max_context = 64;
    auto t = tokenizer::ParseTokenizerJson(tokenizer::MakeByteLevelTokenizerJson(), "byte-level");
    ASSERT_TRUE(t.ok()) << t.status();
    tokenizer_ = std::move(*t);
    service_ = std::make_unique<OpenAiService>(options, tokenizer_.get(), &backend_,
                                               std::make_shared<prometheus::Registry>(), &clock_);
    auto server = HttpServer::Start({.host = "127.0.0.1", .port = 0, .threads = 2}, service_.get());
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = std::move(*server);
  }
  void TearDown() override {
    if (server_) server_->Stop();
  }

  testing::ClientResponse Post(const std::string& path, const std::string& body) {
    TestClient c(server_->port());
    return c.Request(bhttp::verb::post, path, body);
  }
  Json PostOk(const std::string& path, const std::string& body) {
    auto r = Post(path, body);
    EXPECT_EQ(r.result_int(), 200) << r.body();
    return Json::parse(r.body(), nullptr, false);
  }
  // The JSON events of a stream, [DONE] checked and left out.
  std::vector<Json> Stream(const std::string& path, const std::string& body) {
    auto r = Post(path, body);
    EXPECT_EQ(r.result_int(), 200) << r.body();
    std::vector<std::string> data = SseData(r.body());
    EXPECT_EQ(std::count(data.begin(), data.end(), "[DONE]"), 1) << r.body();
    EXPECT_TRUE(!data.empty() && data.back() == "[DONE]") << r.body();
    std::vector<Json> events;
    for (const std::string& d : data) {
      if (d != "[DONE]") events.push_back(Json::parse(d));
    }
    return events;
  }
  static void ExpectError(const testing::ClientResponse& r, int status, const std::string& type,
                          const Json& param = nullptr) {
    EXPECT_EQ(r.result_int(), status) << r.body();
    const Json j = Json::parse(r.body(), nullptr, false);
    ASSERT_TRUE(j.is_object() && j.contains("error")) << r.body();
    EXPECT_EQ(j["error"]["type"], type) << r.body();
    EXPECT_EQ(j["error"]["param"], param) << r.body();
  }
  std::vector<v1::GenerateRequest> Calls() {
    std::vector<v1::GenerateRequest> out;
    for (size_t i = 1; i <= backend_.calls(); ++i) out.push_back(backend_.WaitForCall(i)->request());
    return out;
  }

  cluster::FakeClock clock_{absl::FromUnixSeconds(1700000000)};
  FakeGenerationBackend backend_;
  std::unique_ptr<tokenizer::Tokenizer> tokenizer_;
  std::unique_ptr<OpenAiService> service_;
  std::unique_ptr<HttpServer> server_;
};

// A worker message: tokens, each with `logprob` and the alternatives `top`
// (when the request asked for log probabilities), the last with `finish`.
v1::GenerateResponse Tokens(const v1::GenerateRequest& request, const std::vector<int32_t>& ids,
                            v1::FinishReason finish, float logprob = -1.0f) {
  v1::GenerateResponse r;
  for (int32_t id : ids) {
    r.add_token_ids(id);
    if (!request.sampling().logprobs()) continue;
    v1::TokenLogprob* lp = r.add_logprobs();
    lp->set_token_id(id);
    lp->set_logprob(logprob);
    for (int t = 0; t < request.sampling().top_logprobs(); ++t) {
      v1::TopLogprob* top = lp->add_top();
      top->set_token_id(t == 0 ? id : 'z' - t);
      top->set_logprob(t == 0 ? logprob : logprob - static_cast<float>(t));
    }
  }
  r.set_finish_reason(finish);
  if (finish != v1::FINISH_REASON_UNSPECIFIED) {
    r.set_cached_tokens(1);
    r.set_energy_joules(0.5);
    r.set_energy_source("model");
  }
  return r;
}

TEST_F(OpenAiFanoutTest, NChoicesGetDistinctIdsAndSeedsAndUsageSumsThem) {
  Start();
  // Choice i of seed 7 writes the letter 'a' + i.
  backend_.SetResponder([](const v1::GenerateRequest& g) {
    const int32_t letter = 'a' + static_cast<int32_t>(g.sampling().seed() - 7);
    v1::GenerateResponse last = Tokens(g, {letter, letter}, v1::FINISH_REASON_LENGTH);
    last.set_cached_tokens(static_cast<int32_t>(g.sampling().seed()) - 6);  // 1, 2, 3
    return std::vector<v1::GenerateResponse>{last};
  });
  const Json j = PostOk("/v1/completions", R"({"model": "tiny", "prompt": "xyz", "max_tokens": 2, "n": 3, "seed": 7})");
  ASSERT_EQ(j["choices"].size(), 3u) << j;
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(j["choices"][i]["index"], i);
    EXPECT_EQ(j["choices"][i]["text"], std::string(2, static_cast<char>('a' + i)));
    EXPECT_EQ(j["choices"][i]["finish_reason"], "length");
    EXPECT_TRUE(j["choices"][i]["logprobs"].is_null());
  }
  // The prompt counts once, the completions of every choice; cached tokens are
  // those every choice found cached.
  EXPECT_EQ(j["usage"]["prompt_tokens"], 3);
  EXPECT_EQ(j["usage"]["completion_tokens"], 6);
  EXPECT_EQ(j["usage"]["total_tokens"], 9);
  EXPECT_EQ(j["usage"]["prompt_tokens_details"]["cached_tokens"], 1);
  EXPECT_DOUBLE_EQ(j["usage"]["energy_joules"].get<double>(), 1.5);

  const std::vector<v1::GenerateRequest> calls = Calls();
  ASSERT_EQ(calls.size(), 3u);
  const std::string id = j["id"];
  std::vector<std::string> ids;
  std::vector<uint64_t> seeds;
  for (const v1::GenerateRequest& g : calls) {
    ids.push_back(g.request_id());
    seeds.push_back(g.sampling().seed());
    EXPECT_FALSE(g.sampling().logprobs());  // nobody asked
  }
  EXPECT_THAT(ids, UnorderedElementsAre(id + "-0", id + "-1", id + "-2"));
  EXPECT_THAT(seeds, UnorderedElementsAre(7u, 8u, 9u));
}

TEST_F(OpenAiFanoutTest, SeveralPromptsIndexTheirChoicesPromptMajor) {
  Start();
  // Each generation writes its prompt's first token and its seed's offset.
  backend_.SetResponder([](const v1::GenerateRequest& g) {
    const int32_t first = g.prompt_token_ids(0);
    const int32_t choice = '0' + static_cast<int32_t>(g.sampling().seed());
    return std::vector<v1::GenerateResponse>{Tokens(g, {first, choice}, v1::FINISH_REASON_STOP)};
  });
  const Json j = PostOk("/v1/completions",
                        R"({"model": "tiny", "prompt": ["ab", "cde", "f"], "n": 2, "max_tokens": 2, "seed": 0})");
  ASSERT_EQ(j["choices"].size(), 6u) << j;
  const char* want[] = {"a0", "a1", "c0", "c1", "f0", "f1"};
  for (int i = 0; i < 6; ++i) {
    EXPECT_EQ(j["choices"][i]["index"], i);
    EXPECT_EQ(j["choices"][i]["text"], want[i]) << i;
  }
  EXPECT_EQ(j["usage"]["prompt_tokens"], 6);  // 2 + 3 + 1, each prompt once
  EXPECT_EQ(j["usage"]["completion_tokens"], 12);
  EXPECT_EQ(j["usage"]["prompt_tokens_details"]["cached_tokens"], 3);
  EXPECT_EQ(backend_.calls(), 6u);

  // Token-id prompts too.
  const Json ids = PostOk("/v1/completions", R"({"model": "tiny", "prompt": [[104, 105], [106]], "max_tokens": 2})");
  ASSERT_EQ(ids["choices"].size(), 2u);
  EXPECT_EQ(ids["choices"][1]["text"].get<std::string>().substr(0, 1), "j");
}

TEST_F(OpenAiFanoutTest, ErrorsAboutOneOfSeveralPromptsNameIt) {
  Start();
  backend_.SetScript({'a'});
  auto r = Post("/v1/completions", R"({"model": "tiny", "prompt": ["ok", ""], "max_tokens": 1})");
  ExpectError(r, 400, "invalid_request_error", "prompt[1]");
  const std::string long_prompt(64, 'p');
  auto c = Post("/v1/completions", R"({"model": "tiny", "prompt": ["ok", ")" + long_prompt + R"("], "max_tokens": 1})");
  ExpectError(c, 400, "invalid_request_error", "prompt[1]");
  EXPECT_EQ(Json::parse(c.body())["error"]["code"], "context_length_exceeded");
  EXPECT_EQ(backend_.calls(), 0u);
}

TEST_F(OpenAiFanoutTest, BestOfReturnsTheHighestCumulativeLogprob) {
  Start();
  // Generation j (seed 10 + j) writes 'A' + j with a per-token log probability
  // chosen so that the ranking is j = 2, 0, 3, 1.
  const std::map<uint64_t, float> logprob = {{10, -0.5f}, {11, -3.0f}, {12, -0.1f}, {13, -1.0f}};
  backend_.SetResponder([&](const v1::GenerateRequest& g) {
    const int32_t letter = 'A' + static_cast<int32_t>(g.sampling().seed() - 10);
    return std::vector<v1::GenerateResponse>{
        Tokens(g, {letter}, v1::FINISH_REASON_UNSPECIFIED, logprob.at(g.sampling().seed())),
        Tokens(g, {letter}, v1::FINISH_REASON_LENGTH, logprob.at(g.sampling().seed()))};
  });
  const Json one = PostOk("/v1/completions",
                          R"({"model": "tiny", "prompt": "p", "max_tokens": 2, "best_of": 4, "seed": 10})");
  ASSERT_EQ(one["choices"].size(), 1u) << one;
  EXPECT_EQ(one["choices"][0]["text"], "CC");
  EXPECT_EQ(one["choices"][0]["index"], 0);
  EXPECT_TRUE(one["choices"][0]["logprobs"].is_null());  // asked of the workers, not by the client
  EXPECT_EQ(one["usage"]["completion_tokens"], 8);        // every generation was computed
  for (const v1::GenerateRequest& g : Calls()) {
    EXPECT_TRUE(g.sampling().logprobs());
    EXPECT_EQ(g.sampling().top_logprobs(), 0);
  }

  const Json two = PostOk("/v1/completions", R"({"model": "tiny", "prompt": "p", "max_tokens": 2, "n": 2,
                                                 "best_of": 4, "seed": 10, "logprobs": 1})");
  ASSERT_EQ(two["choices"].size(), 2u) << two;
  EXPECT_EQ(two["choices"][0]["text"], "CC");
  EXPECT_EQ(two["choices"][1]["text"], "AA");
  EXPECT_EQ(two["choices"][1]["index"], 1);
  EXPECT_EQ(two["choices"][0]["logprobs"]["tokens"], Json::array({"C", "C"}));
  EXPECT_NEAR(two["choices"][1]["logprobs"]["token_logprobs"][0].get<double>(), -0.5, 1e-6);
}

TEST_F(OpenAiFanoutTest, ChatLogprobsWithTopAlternatives) {
  Start();
  backend_.SetResponder([](const v1::GenerateRequest& g) {
    return std::vector<v1::GenerateResponse>{Tokens(g, {'H', 0xc3}, v1::FINISH_REASON_UNSPECIFIED, -0.25f),
                                             Tokens(g, {0xa9, kImEnd}, v1::FINISH_REASON_STOP, -0.25f)};
  });
  const std::string body = R"({"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                               "logprobs": true, "top_logprobs": 2, "max_tokens": 4)";
  const Json j = PostOk("/v1/chat/completions", body + "}");
  const Json& choice = j["choices"][0];
  EXPECT_EQ(choice["message"]["content"], "H\xc3\xa9");
  const Json& content = choice["logprobs"]["content"];
  ASSERT_EQ(content.size(), 3u) << j;  // <|im_end|> is not part of the text
  EXPECT_EQ(content[0]["token"], "H");
  EXPECT_EQ(content[0]["bytes"], Json::array({72}));
  EXPECT_EQ(content[1]["token"], "\\xc3");
  EXPECT_EQ(content[1]["bytes"], Json::array({0xc3}));
  EXPECT_EQ(content[2]["bytes"], Json::array({0xa9}));
  EXPECT_DOUBLE_EQ(content[0]["logprob"].get<double>(), -0.25);
  ASSERT_EQ(content[0]["top_logprobs"].size(), 2u);
  EXPECT_EQ(content[0]["top_logprobs"][1]["token"], "y");
  EXPECT_DOUBLE_EQ(content[0]["top_logprobs"][1]["logprob"].get<double>(), -1.25);
  EXPECT_EQ(content[0]["top_logprobs"][1]["bytes"], Json::array({'y'}));
  EXPECT_TRUE(choice["logprobs"]["refusal"].is_null());

  const v1::GenerateRequest g = backend_.WaitForCall(1)->request();
  EXPECT_TRUE(g.sampling().logprobs());
  EXPECT_EQ(g.sampling().top_logprobs(), 2);
  EXPECT_FALSE(g.sampling().prompt_logprobs());

  // Streamed: each token's chunk carries its entry; the finish chunk none.
  std::vector<Json> entries;
  for (const Json& e : Stream("/v1/chat/completions", body + R"(, "stream": true})")) {
    const Json& c = e["choices"][0];
    if (c["delta"].contains("role")) {
      EXPECT_TRUE(c["logprobs"].is_null());
      continue;
    }
    if (!c["finish_reason"].is_null()) continue;
    ASSERT_TRUE(c["logprobs"].is_object()) << e;
    for (const Json& x : c["logprobs"]["content"]) entries.push_back(x);
  }
  EXPECT_EQ(Json(entries), content);
}

TEST_F(OpenAiFanoutTest, ChatNStreamsEveryChoiceUnderItsIndex) {
  Start();
  backend_.SetResponder([](const v1::GenerateRequest& g) {
    const int32_t letter = 'a' + static_cast<int32_t>(g.sampling().seed());
    return std::vector<v1::GenerateResponse>{Tokens(g, {letter, letter, kImEnd}, v1::FINISH_REASON_STOP)};
  });
  const std::vector<Json> events = Stream(
      "/v1/chat/completions", R"({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": 2,
                                  "seed": 0, "stream": true, "stream_options": {"include_usage": true}})");
  std::map<int, std::string> text, finish;
  std::map<int, int> roles;
  Json usage;
  for (const Json& e : events) {
    if (e["choices"].empty()) {
      usage = e["usage"];
      continue;
    }
    const Json& c = e["choices"][0];
    const int index = c["index"];
    if (c["delta"].contains("role")) {
      ++roles[index];
      continue;
    }
    EXPECT_FALSE(finish.count(index)) << "a chunk after choice " << index << " finished";
    if (c["delta"].contains("content")) text[index] += c["delta"]["content"].get<std::string>();
    if (!c["finish_reason"].is_null()) finish[index] = c["finish_reason"];
  }
  EXPECT_EQ(roles, (std::map<int, int>{{0, 1}, {1, 1}}));
  EXPECT_EQ(text, (std::map<int, std::string>{{0, "aa"}, {1, "bb"}}));
  EXPECT_EQ(finish, (std::map<int, std::string>{{0, "stop"}, {1, "stop"}}));
  EXPECT_EQ(usage["completion_tokens"], 6);
  EXPECT_TRUE(events.back()["choices"].empty());  // the usage chunk comes last
}

TEST_F(OpenAiFanoutTest, CompletionsEchoWithPromptLogprobs) {
  Start();
  backend_.SetResponder([](const v1::GenerateRequest& g) {
    v1::GenerateResponse first = Tokens(g, {'!'}, v1::FINISH_REASON_UNSPECIFIED, -0.5f);
    if (g.sampling().prompt_logprobs()) {
      for (int i = 0; i < g.prompt_token_ids_size(); ++i) {
        v1::TokenLogprob* lp = first.add_prompt_logprobs();
        lp->set_token_id(g.prompt_token_ids(i));
        lp->set_logprob(i == 0 ? std::numeric_limits<float>::quiet_NaN() : -2.0f * static_cast<float>(i));
        if (i > 0) {
          v1::TopLogprob* top = lp->add_top();
          top->set_token_id('q');
          top->set_logprob(-0.1f);
        }
      }
    }
    return std::vector<v1::GenerateResponse>{first, Tokens(g, {'?'}, v1::FINISH_REASON_LENGTH, -0.75f)};
  });
  const std::string body = R"({"model": "tiny", "prompt": "Hi", "max_tokens": 2, "logprobs": 1, "echo": true)";
  const Json j = PostOk("/v1/completions", body + "}");
  const Json& choice = j["choices"][0];
  EXPECT_EQ(choice["text"], "Hi!?");
  EXPECT_EQ(choice["logprobs"]["tokens"], Json::array({"H", "i", "!", "?"}));
  EXPECT_EQ(choice["logprobs"]["token_logprobs"], Json::parse("[null, -2.0, -0.5, -0.75]"));
  EXPECT_EQ(choice["logprobs"]["top_logprobs"][0], nullptr);
  EXPECT_NEAR(choice["logprobs"]["top_logprobs"][1]["q"].get<double>(), -0.1, 1e-6);
  EXPECT_EQ(choice["logprobs"]["top_logprobs"][2], Json::parse(R"({"!": -0.5})"));
  EXPECT_EQ(choice["logprobs"]["text_offset"], Json::array({0, 1, 2, 3}));
  EXPECT_EQ(j["usage"]["prompt_tokens"], 2);
  EXPECT_EQ(j["usage"]["completion_tokens"], 2);
  EXPECT_TRUE(backend_.WaitForCall(1)->request().sampling().prompt_logprobs());

  // Streamed, the prompt goes out with the first token's chunk.
  const std::vector<Json> events = Stream("/v1/completions", body + R"(, "stream": true})");
  ASSERT_GE(events.size(), 2u);
  EXPECT_EQ(events[0]["choices"][0]["text"], "Hi!");
  EXPECT_EQ(events[0]["choices"][0]["logprobs"]["tokens"], Json::array({"H", "i", "!"}));
  EXPECT_EQ(events[1]["choices"][0]["text"], "?");
  EXPECT_EQ(events[1]["choices"][0]["logprobs"]["text_offset"], Json::array({3}));

  // echo without logprobs asks the workers for nothing extra.
  const Json plain = PostOk("/v1/completions", R"({"model": "tiny", "prompt": "Hi", "max_tokens": 2, "echo": true})");
  EXPECT_EQ(plain["choices"][0]["text"], "Hi!?");
  EXPECT_TRUE(plain["choices"][0]["logprobs"].is_null());
  EXPECT_FALSE(backend_.WaitForCall(3)->request().sampling().prompt_logprobs());
  EXPECT_FALSE(backend_.WaitForCall(3)->request().sampling().logprobs());
}

TEST_F(OpenAiFanoutTest, PenaltiesAndLogitBiasReachTheWorkers) {
  Start();
  backend_.SetScript({'a'});
  PostOk("/v1/chat/completions", R"({"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                     "max_tokens": 1, "presence_penalty": 0.5, "frequency_penalty": -1.5,
                                     "repetition_penalty": 1.3, "logit_bias": {"97": -100, "258": 100}})");
  const v1::SamplingParams& s = backend_.WaitForCall(1)->request().sampling();
  EXPECT_FLOAT_EQ(s.presence_penalty(), 0.5f);
  EXPECT_FLOAT_EQ(s.frequency_penalty(), -1.5f);
  EXPECT_FLOAT_EQ(s.repetition_penalty(), 1.3f);
  ASSERT_EQ(s.logit_bias_size(), 2);
  EXPECT_FLOAT_EQ(s.logit_bias().at(97), -100.0f);
  EXPECT_FLOAT_EQ(s.logit_bias().at(258), 100.0f);

  // Ids past the vocabulary (259 for the byte-level tokenizer, or the model's) are refused.
  ExpectError(Post("/v1/completions", R"({"model": "tiny", "prompt": "x", "logit_bias": {"259": 1}})"), 400,
              "invalid_request_error", "logit_bias");
  EXPECT_EQ(backend_.calls(), 1u);
}

TEST_F(OpenAiFanoutTest, ServerLimitsAreOpenAiShaped400s) {
  Start({.limits = {.max_n = 2, .max_best_of = 3, .max_logprobs = 1, .max_prompts = 2, .max_logit_bias = 1},
         .vocab_size = 1000});
  backend_.SetScript({'a'});
  struct Case {
    std::string path;
    std::string body;
    std::string param;
  };
  const Case cases[] = {
      {"/v1/completions", R"({"model": "tiny", "prompt": "x", "n": 3})", "n"},
      {"/v1/completions", R"({"model": "tiny", "prompt": "x", "best_of": 4})", "best_of"},
      {"/v1/completions", R"({"model": "tiny", "prompt": "x", "logprobs": 2})", "logprobs"},
      {"/v1/completions", R"({"model": "tiny", "prompt": ["a", "b", "c"]})", "prompt"},
      {"/v1/completions", R"({"model": "tiny", "prompt": "x", "logit_bias": {"1": 1, "2": 1}})", "logit_bias"},
      {"/v1/completions", R"({"model": "tiny", "prompt": "x", "logit_bias": {"1000": 1}})", "logit_bias"},
      {"/v1/completions", R"({"model": "tiny", "prompt": "x", "best_of": 2, "stream": true})", "best_of"},
      {"/v1/chat/completions", R"({"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                                   "logprobs": true, "top_logprobs": 2})", "top_logprobs"},
      {"/v1/chat/completions", R"({"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                                   "top_logprobs": 1})", "top_logprobs"},
      {"/v1/chat/completions", R"({"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                                   "presence_penalty": -3})", "presence_penalty"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.body);
    ExpectError(Post(c.path, c.body), 400, "invalid_request_error", c.param);
  }
  EXPECT_EQ(backend_.calls(), 0u);
  // The model's vocabulary, not the tokenizer's, bounds logit_bias.
  PostOk("/v1/completions", R"({"model": "tiny", "prompt": "x", "max_tokens": 1, "logit_bias": {"999": 1}})");
}

TEST_F(OpenAiFanoutTest, OneFailedGenerationFailsTheRequestAndCancelsTheOthers) {
  Start();
  TestClient c(server_->port());
  c.Send(bhttp::verb::post, "/v1/completions", R"({"model": "tiny", "prompt": "x", "max_tokens": 5, "n": 3})");
  std::shared_ptr<FakeGeneration> calls[3];
  for (int i = 0; i < 3; ++i) {
    calls[i] = backend_.WaitForCall(i + 1);
    ASSERT_NE(calls[i], nullptr);
  }
  ASSERT_TRUE(calls[0]->Push({'a'}));
  calls[1]->Finish(absl::UnavailableError("rank 1 died: heartbeat lost"));
  auto r = c.Read();
  ExpectError(r, 503, "service_unavailable_error");
  EXPECT_THAT(r.body(), HasSubstr("a worker serving the request died"));
  EXPECT_TRUE(backend_.WaitCancelled(calls[0]->request().request_id()));
  EXPECT_TRUE(backend_.WaitCancelled(calls[2]->request().request_id()));
  EXPECT_TRUE(calls[0]->finished());
  EXPECT_TRUE(calls[2]->finished());
  EXPECT_FALSE(calls[0]->Push({'b'}));
  EXPECT_EQ(service_->InFlight(scheduler::Tier::kStandard), 0);
}

TEST_F(OpenAiFanoutTest, OneFailedGenerationMidStreamEndsWithOneErrorEvent) {
  Start();
  TestClient c(server_->port());
  c.Send(bhttp::verb::post, "/v1/completions",
         R"({"model": "tiny", "prompt": "x", "max_tokens": 5, "n": 2, "stream": true})");
  auto first = backend_.WaitForCall(1);
  auto second = backend_.WaitForCall(2);
  ASSERT_NE(second, nullptr);
  ASSERT_TRUE(first->Push({'a'}));
  ASSERT_TRUE(second->Push({'b'}));
  first->Push({'c'}, v1::FINISH_REASON_CANCELLED);
  auto r = c.Read();
  ASSERT_EQ(r.result_int(), 200);
  const std::vector<std::string> events = SseData(r.body());
  ASSERT_EQ(events.size(), 5u) << r.body();  // a, b, c, the error, [DONE]
  EXPECT_EQ(Json::parse(events[3])["error"]["type"], "cancelled");
  EXPECT_EQ(events[4], "[DONE]");
  EXPECT_TRUE(backend_.WaitCancelled(second->request().request_id()));
  first->Finish();
  EXPECT_EQ(service_->InFlight(scheduler::Tier::kStandard), 0);
}

TEST_F(OpenAiFanoutTest, AGenerationThatCannotStartStopsTheRest) {
  Start();
  backend_.SetStartError(absl::UnavailableError("no worker is ready (0 of 2 ranks registered)"));
  ExpectError(Post("/v1/completions", R"({"model": "tiny", "prompt": "x", "n": 4})"), 503,
              "service_unavailable_error");
  EXPECT_EQ(backend_.calls(), 1u);  // the other three were never started
  EXPECT_EQ(service_->InFlight(scheduler::Tier::kStandard), 0);
}

TEST_F(OpenAiFanoutTest, ClientGoneCancelsEveryGeneration) {
  Start();
  TestClient c(server_->port());
  c.Send(bhttp::verb::post, "/v1/chat/completions",
         R"({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "n": 3, "max_tokens": 9})");
  std::vector<std::shared_ptr<FakeGeneration>> calls;
  for (int i = 1; i <= 3; ++i) calls.push_back(backend_.WaitForCall(i));
  ASSERT_NE(calls.back(), nullptr);
  c.Close();
  for (const auto& call : calls) EXPECT_TRUE(backend_.WaitCancelled(call->request().request_id()));
  EXPECT_EQ(service_->InFlight(scheduler::Tier::kStandard), 0);
}

TEST_F(OpenAiFanoutTest, AWorkerWithoutTheAskedLogprobsIsAServerError) {
  Start();
  backend_.SetScript({'a', 'b'});  // tokens without log probabilities
  ExpectError(Post("/v1/completions", R"({"model": "tiny", "prompt": "x", "max_tokens": 2, "logprobs": 0})"), 500,
              "server_error");
  EXPECT_EQ(service_->InFlight(scheduler::Tier::kStandard), 0);
}

}  // namespace
}  // namespace joule::http
