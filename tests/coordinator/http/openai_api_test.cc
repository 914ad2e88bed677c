// Request parsing, response/SSE building and the stop-string text stream of the
// OpenAI-compatible API, without a network.
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "coordinator/http/api_error.h"
#include "coordinator/http/openai_request.h"
#include "coordinator/http/openai_response.h"
#include "coordinator/http/text_stream.h"
#include "coordinator/tokenizer/tokenizer.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace joule::http {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using Json = nlohmann::json;

CompletionRequest ParseOk(const std::string& body, Endpoint e = Endpoint::kCompletions) {
  auto r = ParseCompletionRequest(body, e);
  EXPECT_TRUE(r.ok()) << r.status() << " for " << body;
  return r.ok() ? *r : CompletionRequest{};
}

// The API error a body gives: status, param, and that the message names the param.
ApiError ParseError(const std::string& body, Endpoint e = Endpoint::kCompletions, const RequestLimits& limits = {}) {
  auto r = ParseCompletionRequest(body, e, limits);
  EXPECT_FALSE(r.ok()) << "accepted " << body;
  return r.ok() ? ApiError{} : ToApiError(r.status());
}

TEST(ParseCompletionRequest, TextPromptAndDefaults) {
  CompletionRequest r = ParseOk(R"({"model": "m", "prompt": "hello"})");
  EXPECT_EQ(r.model, "m");
  ASSERT_EQ(r.prompts.size(), 1u);
  EXPECT_EQ(r.prompts[0].text, "hello");
  EXPECT_FALSE(r.prompts[0].is_tokens);
  EXPECT_EQ(r.n, 1);
  EXPECT_EQ(r.best_of, 1);
  EXPECT_FALSE(r.logprobs);
  EXPECT_FALSE(r.echo);
  EXPECT_EQ(r.presence_penalty, 0.0);
  EXPECT_EQ(r.frequency_penalty, 0.0);
  EXPECT_EQ(r.repetition_penalty, 1.0);
  EXPECT_TRUE(r.logit_bias.empty());
  EXPECT_FALSE(r.max_tokens.has_value());
  EXPECT_EQ(r.temperature, 1.0);
  EXPECT_EQ(r.top_p, 1.0);
  EXPECT_EQ(r.tier, scheduler::Tier::kStandard);
  EXPECT_FALSE(r.stream);
}

TEST(ParseCompletionRequest, PromptForms) {
  EXPECT_EQ(ParseOk(R"({"model": "m", "prompt": ["one string"]})").prompts.at(0).text, "one string");
  CompletionRequest ids = ParseOk(R"({"model": "m", "prompt": [1, 2, 3]})");
  ASSERT_EQ(ids.prompts.size(), 1u);
  EXPECT_TRUE(ids.prompts[0].is_tokens);
  EXPECT_THAT(ids.prompts[0].token_ids, ElementsAre(1, 2, 3));
  EXPECT_THAT(ParseOk(R"({"model": "m", "prompt": [[4, 5]]})").prompts.at(0).token_ids, ElementsAre(4, 5));

  // Several prompts: strings, or arrays of token ids.
  CompletionRequest texts = ParseOk(R"({"model": "m", "prompt": ["a", "b", "c"]})");
  ASSERT_EQ(texts.prompts.size(), 3u);
  EXPECT_EQ(texts.prompts[2].text, "c");
  CompletionRequest batches = ParseOk(R"({"model": "m", "prompt": [[1], [2, 3]]})");
  ASSERT_EQ(batches.prompts.size(), 2u);
  EXPECT_THAT(batches.prompts[1].token_ids, ElementsAre(2, 3));

  EXPECT_EQ(ParseError(R"({"model": "m", "prompt": [1, "x"]})").param, "prompt[1]");
  EXPECT_EQ(ParseError(R"({"model": "m", "prompt": [-1]})").param, "prompt[0]");
  EXPECT_EQ(ParseError(R"({"model": "m", "prompt": 5})").param, "prompt");
  EXPECT_EQ(ParseError(R"({"model": "m"})").param, "prompt");
  EXPECT_EQ(ParseError(R"({"model": "m", "prompt": ["a", [1]]})").param, "prompt[1]");
  EXPECT_EQ(ParseError(R"({"model": "m", "prompt": [[1], "a"]})").param, "prompt[1]");
  EXPECT_EQ(ParseError(R"({"model": "m", "prompt": [[1], [2, -3]]})").param, "prompt[1][1]");
  ApiError many = ParseError(R"({"model": "m", "prompt": ["a", "b", "c"]})", Endpoint::kCompletions,
                             {.max_prompts = 2});
  EXPECT_EQ(many.param, "prompt");
  EXPECT_THAT(many.message, HasSubstr("at most 2 prompts"));
}

TEST(ParseCompletionRequest, SamplingFields) {
  CompletionRequest r = ParseOk(
      R"({"model": "m", "prompt": "x", "max_tokens": 7, "temperature": 0, "top_p": 0.5,
          "top_k": -1, "seed": 42, "stop": "END", "n": 1, "stream": true,
          "stream_options": {"include_usage": true}, "service_tier": "flex", "user": "u1",
          "ignore_eos": true})");
  EXPECT_EQ(r.max_tokens, 7);
  EXPECT_EQ(r.temperature, 0.0);
  EXPECT_EQ(r.top_p, 0.5);
  EXPECT_EQ(r.top_k, 0);  // -1 (vLLM's "disabled") is our 0
  EXPECT_EQ(r.seed, 42u);
  EXPECT_THAT(r.stop, ElementsAre("END"));
  EXPECT_TRUE(r.stream);
  EXPECT_TRUE(r.include_usage);
  EXPECT_EQ(r.tier, scheduler::Tier::kBatch);
  EXPECT_EQ(r.user, "u1");
  EXPECT_TRUE(r.ignore_eos);
  EXPECT_THAT(ParseOk(R"({"model": "m", "prompt": "x", "stop": ["a", "b"]})").stop, ElementsAre("a", "b"));
  // 16.0 is an integer to JSON clients.
  EXPECT_EQ(ParseOk(R"({"model": "m", "prompt": "x", "max_tokens": 16.0})").max_tokens, 16);
}

TEST(ParseCompletionRequest, TiersByOpenAiName) {
  EXPECT_EQ(ParseOk(R"({"model": "m", "prompt": "x", "service_tier": "fast"})").tier, scheduler::Tier::kFast);
  EXPECT_EQ(ParseOk(R"({"model": "m", "prompt": "x", "service_tier": "priority"})").tier,
            scheduler::Tier::kPriority);
  EXPECT_EQ(ParseOk(R"({"model": "m", "prompt": "x", "service_tier": "default"})").tier,
            scheduler::Tier::kStandard);
  EXPECT_EQ(ParseOk(R"({"model": "m", "prompt": "x", "service_tier": "auto"})").tier, scheduler::Tier::kStandard);
}

TEST(ParseCompletionRequest, UnknownFieldsAndNullsAreIgnored) {
  CompletionRequest r = ParseOk(
      R"({"model": "m", "prompt": "x", "frequency_penalty": 0.5, "logit_bias": {}, "whatever": [1],
          "temperature": null, "max_tokens": null})");
  EXPECT_EQ(r.temperature, 1.0);
  EXPECT_FALSE(r.max_tokens.has_value());
}

TEST(ParseCompletionRequest, WrongTypesAndRangesNameTheField) {
  struct Case {
    std::string body;
    std::string param;
  };
  const Case cases[] = {
      {R"({"model": 3, "prompt": "x"})", "model"},
      {R"({"prompt": "x"})", "model"},
      {R"({"model": "m", "prompt": "x", "max_tokens": "10"})", "max_tokens"},
      {R"({"model": "m", "prompt": "x", "max_tokens": 0})", "max_tokens"},
      {R"({"model": "m", "prompt": "x", "max_tokens": 2.5})", "max_tokens"},
      {R"({"model": "m", "prompt": "x", "temperature": "hot"})", "temperature"},
      {R"({"model": "m", "prompt": "x", "temperature": 2.5})", "temperature"},
      {R"({"model": "m", "prompt": "x", "top_p": 0})", "top_p"},
      {R"({"model": "m", "prompt": "x", "top_p": 1.5})", "top_p"},
      {R"({"model": "m", "prompt": "x", "top_k": -2})", "top_k"},
      {R"({"model": "m", "prompt": "x", "seed": "s"})", "seed"},
      {R"({"model": "m", "prompt": "x", "n": 0})", "n"},
      {R"({"model": "m", "prompt": "x", "n": 17})", "n"},
      {R"({"model": "m", "prompt": "x", "n": "2"})", "n"},
      {R"({"model": "m", "prompt": "x", "n": 3, "best_of": 2})", "best_of"},
      {R"({"model": "m", "prompt": "x", "best_of": 17})", "best_of"},
      {R"({"model": "m", "prompt": "x", "best_of": 2, "stream": true})", "best_of"},
      {R"({"model": "m", "prompt": ["a", "b", "c", "d", "e"], "n": 16})", "n"},
      {R"({"model": "m", "prompt": ["a", "b", "c", "d", "e"], "best_of": 16})", "best_of"},
      {R"({"model": "m", "prompt": "x", "logprobs": 21})", "logprobs"},
      {R"({"model": "m", "prompt": "x", "logprobs": -1})", "logprobs"},
      {R"({"model": "m", "prompt": "x", "logprobs": true})", "logprobs"},
      {R"({"model": "m", "prompt": "x", "echo": 1})", "echo"},
      {R"({"model": "m", "prompt": "x", "presence_penalty": 2.5})", "presence_penalty"},
      {R"({"model": "m", "prompt": "x", "presence_penalty": "a"})", "presence_penalty"},
      {R"({"model": "m", "prompt": "x", "frequency_penalty": -2.01})", "frequency_penalty"},
      {R"({"model": "m", "prompt": "x", "repetition_penalty": 0})", "repetition_penalty"},
      {R"({"model": "m", "prompt": "x", "repetition_penalty": -1})", "repetition_penalty"},
      {R"({"model": "m", "prompt": "x", "repetition_penalty": 1e300})", "repetition_penalty"},
      {R"({"model": "m", "prompt": "x", "logit_bias": [1]})", "logit_bias"},
      {R"({"model": "m", "prompt": "x", "logit_bias": {"abc": 1}})", "logit_bias"},
      {R"({"model": "m", "prompt": "x", "logit_bias": {"-5": 1}})", "logit_bias"},
      {R"({"model": "m", "prompt": "x", "logit_bias": {"99999999999": 1}})", "logit_bias"},
      {R"({"model": "m", "prompt": "x", "logit_bias": {"5": 101}})", "logit_bias"},
      {R"({"model": "m", "prompt": "x", "logit_bias": {"5": "1"}})", "logit_bias"},
      {R"({"model": "m", "prompt": "x", "stop": 1})", "stop"},
      {R"({"model": "m", "prompt": "x", "stop": ["a", 2]})", "stop[1]"},
      {R"({"model": "m", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]})", "stop"},
      {R"({"model": "m", "prompt": "x", "stop": [""]})", "stop"},
      {R"({"model": "m", "prompt": "x", "stream": "yes"})", "stream"},
      {R"({"model": "m", "prompt": "x", "stream_options": {"include_usage": true}})", "stream_options"},
      {R"({"model": "m", "prompt": "x", "stream": true, "stream_options": {"include_usage": 1}})",
       "stream_options.include_usage"},
      {R"({"model": "m", "prompt": "x", "service_tier": "gold"})", "service_tier"},
      {R"({"model": "m", "prompt": "x", "service_tier": 1})", "service_tier"},
      {R"({"model": "m", "prompt": "x", "user": 7})", "user"},
      {R"({"model": "m", "prompt": "x", "ignore_eos": "no"})", "ignore_eos"},
  };
  for (const Case& c : cases) {
    ApiError e = ParseError(c.body);
    EXPECT_EQ(e.http_status, 400) << c.body;
    EXPECT_EQ(e.type, "invalid_request_error") << c.body;
    EXPECT_EQ(e.param, c.param) << c.body;
    EXPECT_THAT(e.message, HasSubstr(c.param)) << c.body;
  }
}

TEST(ParseCompletionRequest, MalformedAndNonObjectBodies) {
  for (const std::string body : {"{", "", "[1, 2]", "\"text\"", "null"}) {
    ApiError e = ParseError(body);
    EXPECT_EQ(e.http_status, 400) << body;
    EXPECT_EQ(e.type, "invalid_request_error");
    EXPECT_EQ(e.param, "") << body;
  }
  EXPECT_THAT(ParseError("{").message, HasSubstr("not valid JSON"));
  EXPECT_THAT(ParseError("[1]").message, HasSubstr("JSON object"));
}

TEST(ParseChatRequest, MessagesAndContentParts) {
  CompletionRequest r = ParseOk(
      R"({"model": "m", "messages": [
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]},
            {"role": "assistant", "content": null},
            {"role": "user", "content": "again"}],
          "max_tokens": 3, "max_completion_tokens": 5})",
      Endpoint::kChatCompletions);
  ASSERT_EQ(r.messages.size(), 4u);
  EXPECT_EQ(r.messages[0].role, "system");
  EXPECT_EQ(r.messages[1].content, "Hello");
  EXPECT_EQ(r.messages[2].content, "");
  EXPECT_EQ(r.max_tokens, 5);  // max_completion_tokens wins
}

TEST(ParseChatRequest, BadMessagesNameTheField) {
  struct Case {
    std::string messages;
    std::string param;
  };
  const Case cases[] = {
      {R"("hi")", "messages"},
      {R"([])", "messages"},
      {R"([1])", "messages[0]"},
      {R"([{"content": "x"}])", "messages[0].role"},
      {R"([{"role": "user", "content": "a"}, {"role": "tool", "content": "x"}])", "messages[1].role"},
      {R"([{"role": "user"}])", "messages[0].content"},
      {R"([{"role": "user", "content": 5}])", "messages[0].content"},
      {R"([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])", "messages[0].content[0].type"},
      {R"([{"role": "user", "content": [{"type": "text"}]}])", "messages[0].content[0].text"},
  };
  for (const Case& c : cases) {
    ApiError e = ParseError(R"({"model": "m", "messages": )" + c.messages + "}", Endpoint::kChatCompletions);
    EXPECT_EQ(e.http_status, 400) << c.messages;
    EXPECT_EQ(e.param, c.param) << c.messages;
  }
  // Chat has no prompt; completions have no messages.
  EXPECT_EQ(ParseError(R"({"model": "m", "prompt": "x"})", Endpoint::kChatCompletions).param, "messages");
}

TEST(ApiErrorTest, StatusCodesAndShape) {
  EXPECT_EQ(ToApiError(absl::NotFoundError("x")).http_status, 404);
  EXPECT_EQ(ToApiError(absl::UnauthenticatedError("x")).http_status, 401);
  ApiError busy = ToApiError(absl::ResourceExhaustedError("x"));
  EXPECT_EQ(busy.http_status, 429);
  EXPECT_EQ(busy.type, "rate_limit_error");
  EXPECT_EQ(ToApiError(absl::UnavailableError("x")).http_status, 503);
  EXPECT_EQ(ToApiError(WithHttpStatus(absl::InvalidArgumentError("x"), 413)).http_status, 413);

  const absl::Status s = WithErrorCode(InvalidField("prompt", "too long"), "context_length_exceeded");
  const Json j = Json::parse(ErrorJson(ToApiError(s)));
  EXPECT_EQ(j["error"]["message"], "prompt: too long");
  EXPECT_EQ(j["error"]["type"], "invalid_request_error");
  EXPECT_EQ(j["error"]["param"], "prompt");
  EXPECT_EQ(j["error"]["code"], "context_length_exceeded");
  const Json bare = Json::parse(ErrorJson(ToApiError(absl::InvalidArgumentError("bad"))));
  EXPECT_TRUE(bare["error"]["param"].is_null());
  EXPECT_TRUE(bare["error"]["code"].is_null());
}

// A 5xx tells the client the reason in fixed words; the Router's text around
// it (addresses, ids, transport errors) is for the log only.
TEST(ApiErrorTest, ServerErrorsSayTheReasonOnly) {
  const ApiError lost = ToApiError(absl::UnavailableError(
      "rank 2 died: worker unreachable: ipv4:10.0.0.3:5000: Connection refused (its Generate stream ended with "
      "UNAVAILABLE: UCX ERR_UNREACHABLE); no rank is left in the expert-parallel group (rank 2 died: request "
      "req-0123 failed)"));
  EXPECT_EQ(lost.http_status, 503);
  EXPECT_EQ(lost.message,
            "a worker serving the request died; no rank is left in the expert-parallel group; retry after a moment");
  EXPECT_EQ(ToApiError(absl::UnavailableError("no worker is ready (1 of 2 ranks registered, 0 ready)")).message,
            "no worker is ready; retry after a moment");
  EXPECT_EQ(ToApiError(absl::UnavailableError("rank 1 failed request cmpl-9 (10.1.1.1:7): INTERNAL: x")).message,
            "the cluster cannot serve the request now; retry after a moment");
  EXPECT_EQ(ToApiError(absl::DeadlineExceededError("request cmpl-9 did not finish on rank 0")).message,
            "the request did not finish before its deadline");
  const ApiError internal = ToApiError(absl::InternalError("/models/m/config.json: parse error at 10.0.0.1"));
  EXPECT_EQ(internal.http_status, 500);
  EXPECT_EQ(internal.type, "server_error");
  EXPECT_THAT(internal.message, ::testing::Not(::testing::HasSubstr("/models")));
  const ApiError cancelled = ToApiError(absl::CancelledError("request cmpl-9 was cancelled on rank 1"));
  EXPECT_EQ(cancelled.type, "cancelled");
  EXPECT_EQ(cancelled.message, "the request was cancelled before it finished");
  // 4xx keep their text: it describes the client's own request.
  EXPECT_EQ(ToApiError(absl::InvalidArgumentError("top_p: must be in (0, 1]")).message, "top_p: must be in (0, 1]");
}

ResponseHeader Header(Endpoint e) {
  return {.endpoint = e, .id = "id-1", .created = 1700000000, .model = "tiny", .tier = scheduler::Tier::kBatch};
}

ChoiceResult One(const std::string& text, const std::string& finish) {
  return {.index = 0, .text = text, .finish_reason = finish};
}

TEST(OpenAiResponse, CompletionAndChatBodies) {
  const Json c = Json::parse(CompletionJson(Header(Endpoint::kCompletions), {One("abc", "length")}, {5, 3}));
  EXPECT_EQ(c["object"], "text_completion");
  EXPECT_EQ(c["id"], "id-1");
  EXPECT_EQ(c["created"], 1700000000);
  EXPECT_EQ(c["model"], "tiny");
  EXPECT_EQ(c["service_tier"], "flex");
  EXPECT_EQ(c["choices"][0]["text"], "abc");
  EXPECT_EQ(c["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(c["usage"], (Json{{"prompt_tokens", 5}, {"completion_tokens", 3}, {"total_tokens", 8},
                              {"prompt_tokens_details", {{"cached_tokens", 0}}}}));

  const Json chat = Json::parse(CompletionJson(Header(Endpoint::kChatCompletions), {One("hi", "stop")}, {2, 1}));
  EXPECT_EQ(chat["object"], "chat.completion");
  EXPECT_EQ(chat["choices"][0]["message"], (Json{{"role", "assistant"}, {"content", "hi"}}));
  EXPECT_EQ(chat["choices"][0]["finish_reason"], "stop");

  // A request resumed after its rank died says how many tokens were recomputed.
  const Json resumed = Json::parse(CompletionJson(Header(Endpoint::kCompletions), {One("abc", "length")},
                                                  {.prompt_tokens = 5, .completion_tokens = 3,
                                                   .resumed_tokens = 2}));
  EXPECT_EQ(resumed["usage"]["resumed_tokens"], 2);
  EXPECT_EQ(resumed["usage"]["completion_tokens"], 3);

  // Prompt tokens the serving rank's prefix cache held.
  const Json cached = Json::parse(CompletionJson(Header(Endpoint::kChatCompletions), {One("hi", "stop")},
                                                 {.prompt_tokens = 40, .completion_tokens = 1,
                                                  .cached_tokens = 32}));
  EXPECT_EQ(cached["usage"]["prompt_tokens_details"], (Json{{"cached_tokens", 32}}));
}

TEST(OpenAiResponse, StreamChunks) {
  const ResponseHeader chat = Header(Endpoint::kChatCompletions);
  const Json role = Json::parse(ChunkJson(chat, {.role_only = true}));
  EXPECT_EQ(role["object"], "chat.completion.chunk");
  EXPECT_EQ(role["choices"][0]["delta"], (Json{{"role", "assistant"}, {"content", ""}}));
  EXPECT_TRUE(role["choices"][0]["finish_reason"].is_null());
  EXPECT_FALSE(role.contains("usage"));

  const Json token = Json::parse(ChunkJson(chat, {.text = "x", .usage_null = true}));
  EXPECT_EQ(token["choices"][0]["delta"], (Json{{"content", "x"}}));
  EXPECT_TRUE(token.contains("usage") && token["usage"].is_null());

  const Json last = Json::parse(ChunkJson(chat, {.finish_reason = "stop"}));
  EXPECT_EQ(last["choices"][0]["delta"], Json::object());
  EXPECT_EQ(last["choices"][0]["finish_reason"], "stop");

  const Json text = Json::parse(ChunkJson(Header(Endpoint::kCompletions), {.text = "y"}));
  EXPECT_EQ(text["object"], "text_completion");
  EXPECT_EQ(text["choices"][0]["text"], "y");

  const Json usage = Json::parse(UsageChunkJson(chat, {4, 2}));
  EXPECT_TRUE(usage["choices"].is_array() && usage["choices"].empty());
  EXPECT_EQ(usage["usage"]["total_tokens"], 6);
  EXPECT_EQ(usage["usage"]["prompt_tokens_details"]["cached_tokens"], 0);

  EXPECT_EQ(SseEvent("{}"), "data: {}\n\n");
  EXPECT_EQ(kSseDone, "data: [DONE]\n\n");
}

TEST(OpenAiResponse, ModelList) {
  const Json j = Json::parse(ModelListJson("tiny", 5, 64));
  EXPECT_EQ(j["object"], "list");
  ASSERT_EQ(j["data"].size(), 1u);
  EXPECT_EQ(j["data"][0]["id"], "tiny");
  EXPECT_EQ(j["data"][0]["object"], "model");
  EXPECT_EQ(j["data"][0]["owned_by"], "joule");
}

class TextStreamTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto t = tokenizer::ParseTokenizerJson(tokenizer::MakeByteLevelTokenizerJson(), "byte-level");
    ASSERT_TRUE(t.ok()) << t.status();
    tok_ = std::move(*t);
  }
  // Pushes the bytes of `text` one token each; returns the released pieces.
  std::vector<std::string> PushAll(TextStream& s, const std::string& text) {
    std::vector<std::string> out;
    for (unsigned char c : text) {
      out.push_back(s.Push(c));
      if (s.stopped()) break;
    }
    return out;
  }
  std::unique_ptr<tokenizer::Tokenizer> tok_;
};

TEST_F(TextStreamTest, NoStopStringsReleasesAtOnceAndSkipsSpecialTokens) {
  TextStream s(*tok_, {});
  EXPECT_EQ(s.Push('a'), "a");
  EXPECT_EQ(s.Push(258), "");  // <|im_end|>
  EXPECT_EQ(s.Push('b'), "b");
  EXPECT_EQ(s.Flush(), "");
}

TEST_F(TextStreamTest, HoldsMultiByteCharactersUntilWhole) {
  TextStream s(*tok_, {});
  const std::string e_acute = "\xc3\xa9";
  EXPECT_EQ(s.Push(0xc3), "");
  EXPECT_EQ(s.Push(0xa9), e_acute);
}

TEST_F(TextStreamTest, StopStringTruncatesAndNothingOfItLeaks) {
  TextStream s(*tok_, {"o w"});
  std::vector<std::string> pieces = PushAll(s, "hello world");
  std::string all;
  for (const auto& p : pieces) all += p;
  EXPECT_TRUE(s.stopped());
  EXPECT_EQ(all, "hell");
  EXPECT_EQ(pieces.size(), 7u);  // stopped at the token that completed "o w"
  EXPECT_EQ(pieces[4], "");       // "o" held back: it may start "o w"
  EXPECT_EQ(s.Push('x'), "");
  EXPECT_EQ(s.Flush(), "");
}

TEST_F(TextStreamTest, HeldPrefixIsReleasedWhenItIsNotAStop) {
  TextStream s(*tok_, {"STOP"});
  std::string all;
  for (const auto& p : PushAll(s, "a STOk")) all += p;
  EXPECT_FALSE(s.stopped());
  EXPECT_EQ(all, "a STOk");
  TextStream t(*tok_, {"STOP"});
  all.clear();
  for (const auto& p : PushAll(t, "xST")) all += p;
  all += t.Flush();
  EXPECT_EQ(all, "xST");  // the end of generation releases a held prefix
}

TEST_F(TextStreamTest, EarliestOfSeveralStopStringsWins) {
  TextStream s(*tok_, {"cd", "bcde"});
  std::string all;
  for (const auto& p : PushAll(s, "abcdef")) all += p;
  EXPECT_EQ(all, "ab");
}

}  // namespace
}  // namespace joule::http
