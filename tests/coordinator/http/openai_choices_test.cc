// The request fields of issue 26 (n, best_of, several prompts, logprobs,
// echo, penalties, logit_bias) and their limits, the log-probability shapes of
// responses and chunks, and ChoiceStream's token texts, bytes and offsets;
// without a network.
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "coordinator/cluster/coordinator_options.h"
#include "coordinator/http/api_error.h"
#include "coordinator/http/choice_stream.h"
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
using ::testing::Pair;
using Json = nlohmann::json;

constexpr Endpoint kChat = Endpoint::kChatCompletions;
constexpr Endpoint kCompletions = Endpoint::kCompletions;

CompletionRequest ParseOk(const std::string& body, Endpoint e, const RequestLimits& limits = {}) {
  auto r = ParseCompletionRequest(body, e, limits);
  EXPECT_TRUE(r.ok()) << r.status() << " for " << body;
  return r.ok() ? *r : CompletionRequest{};
}

ApiError ParseError(const std::string& body, Endpoint e, const RequestLimits& limits = {}) {
  auto r = ParseCompletionRequest(body, e, limits);
  EXPECT_FALSE(r.ok()) << "accepted " << body;
  return r.ok() ? ApiError{} : ToApiError(r.status());
}

std::string Chat(const std::string& fields) {
  return R"({"model": "m", "messages": [{"role": "user", "content": "hi"}], )" + fields + "}";
}
std::string Completion(const std::string& fields) { return R"({"model": "m", "prompt": "hi", )" + fields + "}"; }

TEST(ParseChoices, ChatLogprobsNPenaltiesAndLogitBias) {
  CompletionRequest r = ParseOk(Chat(R"("logprobs": true, "top_logprobs": 5, "n": 3, "presence_penalty": -2,
                                       "frequency_penalty": 1.5, "repetition_penalty": 1.2,
                                       "logit_bias": {"65": 100, "10": -100, "7": 0.5},
                                       "best_of": 9, "echo": true)"),
                                kChat);
  EXPECT_TRUE(r.logprobs);
  EXPECT_EQ(r.top_logprobs, 5);
  EXPECT_EQ(r.n, 3);
  EXPECT_EQ(r.best_of, 3);  // chat has no best_of: ignored like any unknown field
  EXPECT_FALSE(r.echo);     // nor echo
  EXPECT_EQ(r.presence_penalty, -2.0);
  EXPECT_EQ(r.frequency_penalty, 1.5);
  EXPECT_EQ(r.repetition_penalty, 1.2);
  EXPECT_THAT(r.logit_bias, ElementsAre(Pair(7, 0.5), Pair(10, -100.0), Pair(65, 100.0)));

  EXPECT_FALSE(ParseOk(Chat(R"("logprobs": false)"), kChat).logprobs);
  EXPECT_EQ(ParseOk(Chat(R"("logprobs": true, "top_logprobs": 0)"), kChat).top_logprobs, 0);
  // Null is absent.
  EXPECT_EQ(ParseOk(Chat(R"("top_logprobs": null, "n": null)"), kChat).n, 1);
}

TEST(ParseChoices, ChatErrorsNameTheField) {
  struct Case {
    std::string fields;
    std::string param;
    std::string says;
  };
  const Case cases[] = {
      {R"("top_logprobs": 2)", "top_logprobs", "requires logprobs: true"},
      {R"("logprobs": false, "top_logprobs": 2)", "top_logprobs", "requires logprobs: true"},
      {R"("logprobs": true, "top_logprobs": 21)", "top_logprobs", "[0, 20]"},
      {R"("logprobs": true, "top_logprobs": -1)", "top_logprobs", "[0, 20]"},
      {R"("logprobs": 3)", "logprobs", "boolean"},
      {R"("n": 17)", "n", "[1, 16]"},
      {R"("n": 0)", "n", "[1, 16]"},
      {R"("frequency_penalty": 3)", "frequency_penalty", "[-2, 2]"},
      {R"("logit_bias": {"1": -100.5})", "logit_bias", "[-100, 100]"},
      {R"("logit_bias": {"1.5": 1})", "logit_bias", "not a token id"},
      {R"("logit_bias": {"": 1})", "logit_bias", "not a token id"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.fields);
    ApiError e = ParseError(Chat(c.fields), kChat);
    EXPECT_EQ(e.http_status, 400);
    EXPECT_EQ(e.type, "invalid_request_error");
    EXPECT_EQ(e.param, c.param);
    EXPECT_THAT(e.message, HasSubstr(c.says));
  }
}

TEST(ParseChoices, CompletionsLogprobsEchoAndBestOf) {
  CompletionRequest r = ParseOk(Completion(R"("logprobs": 3, "echo": true, "n": 2, "best_of": 5)"), kCompletions);
  EXPECT_TRUE(r.logprobs);
  EXPECT_EQ(r.top_logprobs, 3);
  EXPECT_TRUE(r.echo);
  EXPECT_EQ(r.n, 2);
  EXPECT_EQ(r.best_of, 5);
  // logprobs: 0 asks for the sampled tokens' log probabilities without alternatives.
  CompletionRequest zero = ParseOk(Completion(R"("logprobs": 0)"), kCompletions);
  EXPECT_TRUE(zero.logprobs);
  EXPECT_EQ(zero.top_logprobs, 0);
  EXPECT_FALSE(ParseOk(Completion(R"("logprobs": null)"), kCompletions).logprobs);
  // best_of defaults to n; best_of 1 (or equal to n when absent) streams.
  EXPECT_EQ(ParseOk(Completion(R"("n": 4)"), kCompletions).best_of, 4);
  EXPECT_TRUE(ParseOk(Completion(R"("best_of": 1, "stream": true)"), kCompletions).stream);
  EXPECT_EQ(ParseOk(Completion(R"("n": 3, "stream": true)"), kCompletions).best_of, 3);
}

TEST(ParseChoices, LimitsComeFromTheServer) {
  const RequestLimits tight{.max_n = 2, .max_best_of = 3, .max_logprobs = 1, .max_prompts = 2,
                            .max_logit_bias = 1, .max_generations = 4};
  EXPECT_EQ(ParseError(Completion(R"("n": 3)"), kCompletions, tight).param, "n");
  EXPECT_EQ(ParseError(Completion(R"("best_of": 4)"), kCompletions, tight).param, "best_of");
  EXPECT_EQ(ParseError(Completion(R"("logprobs": 2)"), kCompletions, tight).param, "logprobs");
  EXPECT_EQ(ParseError(Chat(R"("logprobs": true, "top_logprobs": 2)"), kChat, tight).param, "top_logprobs");
  ApiError bias = ParseError(Completion(R"("logit_bias": {"1": 1, "2": 2})"), kCompletions, tight);
  EXPECT_EQ(bias.param, "logit_bias");
  EXPECT_THAT(bias.message, HasSubstr("at most 1 entries, got 2"));
  ApiError prompts = ParseError(R"({"model": "m", "prompt": ["a", "b", "c"]})", kCompletions, tight);
  EXPECT_EQ(prompts.param, "prompt");
  // 2 prompts x best_of 3 = 6 generations > 4; 2 x n 2 = 4 is fine.
  ApiError generations = ParseError(R"({"model": "m", "prompt": ["a", "b"], "best_of": 3})", kCompletions, tight);
  EXPECT_EQ(generations.param, "best_of");
  EXPECT_THAT(generations.message, HasSubstr("6 generations"));
  EXPECT_EQ(ParseOk(R"({"model": "m", "prompt": ["a", "b"], "n": 2})", kCompletions, tight).prompts.size(), 2u);
  EXPECT_EQ(ParseOk(Completion(R"("logit_bias": {"4": -1})"), kCompletions, tight).logit_bias.size(), 1u);
}

TEST(ParseChoices, BestOfCannotStream) {
  ApiError e = ParseError(Completion(R"("best_of": 2, "stream": true)"), kCompletions);
  EXPECT_EQ(e.param, "best_of");
  EXPECT_THAT(e.message, HasSubstr("stream"));
  EXPECT_EQ(ParseError(Completion(R"("n": 2, "best_of": 2, "stream": true)"), kCompletions).param, "best_of");
}

TEST(TokenDisplayText, WholeCharactersAsTextOtherBytesEscaped) {
  EXPECT_EQ(TokenDisplayText("abc", false), "abc");
  EXPECT_EQ(TokenDisplayText("\xc3\xa9", false), "\xc3\xa9");        // é
  EXPECT_EQ(TokenDisplayText("\xe2\x80", false), "\\xe2\\x80");       // 2 of the 3 bytes of an en dash
  EXPECT_EQ(TokenDisplayText(" \xf0\x9f", false), " \\xf0\\x9f");
  EXPECT_EQ(TokenDisplayText("\x99", false), "\\x99");                 // a continuation byte alone
  EXPECT_EQ(TokenDisplayText("\xe2\x80", true), "bytes:\\xe2\\x80");  // completions' legacy spelling
  EXPECT_EQ(TokenDisplayText("ok", true), "ok");
  EXPECT_EQ(TokenDisplayText("", false), "");
  EXPECT_EQ(CodePoints("a\xc3\xa9\xe2\x82\xac"), 3);
}

class ChoiceStreamTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto t = tokenizer::ParseTokenizerJson(tokenizer::MakeByteLevelTokenizerJson(), "byte-level");
    ASSERT_TRUE(t.ok()) << t.status();
    tok_ = std::move(*t);
  }
  static v1::TokenLogprob Lp(int32_t id, float logprob, std::vector<std::pair<int32_t, float>> top = {}) {
    v1::TokenLogprob lp;
    lp.set_token_id(id);
    lp.set_logprob(logprob);
    for (const auto& [t, l] : top) {
      v1::TopLogprob* e = lp.add_top();
      e->set_token_id(t);
      e->set_logprob(l);
    }
    return lp;
  }
  std::unique_ptr<tokenizer::Tokenizer> tok_;
};

TEST_F(ChoiceStreamTest, PartialCharactersHaveExactBytesAndEscapedText) {
  const std::string euro = "\xe2\x82\xac";
  const v1::TokenLogprob lps[] = {Lp(0xe2, -0.5f, {{0xe2, -0.5f}, {'x', -2.0f}}), Lp(0x82, -0.25f), Lp(0xac, 0.0f),
                                  Lp('a', -1.0f)};
  ChoiceStream t(*tok_, {.logprobs = true});
  ChoiceStream::Delta e;
  const int32_t ids[] = {0xe2, 0x82, 0xac, 'a'};
  for (int i = 0; i < 4; ++i) t.Push(ids[i], &lps[i], &e);
  EXPECT_EQ(e.text, euro + "a");
  ASSERT_EQ(e.logprobs.size(), 4u);
  EXPECT_EQ(e.logprobs[0].token, "\\xe2");
  EXPECT_EQ(e.logprobs[0].bytes, "\xe2");
  EXPECT_EQ(e.logprobs[1].token, "\\x82");
  EXPECT_EQ(e.logprobs[2].bytes, "\xac");
  EXPECT_EQ(e.logprobs[3].token, "a");
  EXPECT_EQ(e.logprobs[0].logprob, -0.5);
  ASSERT_EQ(e.logprobs[0].top.size(), 2u);
  EXPECT_EQ(e.logprobs[0].top[1].token, "x");
  EXPECT_EQ(e.logprobs[0].top[1].logprob, -2.0);
  // Offsets in code points of the text: the euro sign starts at 0, "a" at 1.
  EXPECT_EQ(e.logprobs[0].text_offset, 0);
  EXPECT_EQ(e.logprobs[2].text_offset, 0);
  EXPECT_EQ(e.logprobs[3].text_offset, 1);
  EXPECT_DOUBLE_EQ(t.cumulative_logprob(), -1.75);

  ChoiceStream legacy(*tok_, {.logprobs = true, .legacy = true});
  ChoiceStream::Delta l;
  legacy.Push(0xe2, &lps[0], &l);
  EXPECT_EQ(l.logprobs[0].token, "bytes:\\xe2");
}

TEST_F(ChoiceStreamTest, SpecialTokensHaveNoEntryButCountTowardTheSum) {
  ChoiceStream s(*tok_, {.logprobs = true});
  ChoiceStream::Delta d;
  const v1::TokenLogprob a = Lp('a', -1.0f), end = Lp(258, -3.0f);
  s.Push('a', &a, &d);
  s.Push(258, &end, &d);  // <|im_end|>
  EXPECT_EQ(d.text, "a");
  ASSERT_EQ(d.logprobs.size(), 1u);
  EXPECT_DOUBLE_EQ(s.cumulative_logprob(), -4.0);

  // Without logprobs for the client, no entries, but the sum still (best_of).
  ChoiceStream quiet(*tok_, {});
  ChoiceStream::Delta q;
  quiet.Push('a', &a, &q);
  EXPECT_TRUE(q.logprobs.empty());
  EXPECT_DOUBLE_EQ(quiet.cumulative_logprob(), -1.0);
}

TEST_F(ChoiceStreamTest, EchoPutsThePromptFirstWithItsLogprobs) {
  ChoiceStream s(*tok_, {.logprobs = true, .legacy = true});
  ChoiceStream::Delta d;
  google::protobuf::RepeatedPtrField<v1::TokenLogprob> prompt;
  *prompt.Add() = Lp('h', std::numeric_limits<float>::quiet_NaN());
  *prompt.Add() = Lp(0xc3, -0.5f, {{0xc3, -0.5f}});
  *prompt.Add() = Lp(0xa9, -0.1f);
  s.Echo("h\xc3\xa9", {'h', 0xc3, 0xa9}, prompt, &d);
  const v1::TokenLogprob x = Lp('x', -2.0f);
  s.Push('x', &x, &d);
  EXPECT_EQ(d.text, "h\xc3\xa9x");
  ASSERT_EQ(d.logprobs.size(), 4u);
  EXPECT_FALSE(d.logprobs[0].logprob.has_value());  // nothing predicts the first token
  EXPECT_EQ(d.logprobs[1].logprob, -0.5);
  EXPECT_EQ(d.logprobs[1].token, "bytes:\\xc3");
  EXPECT_EQ(d.logprobs[1].top.at(0).token, "bytes:\\xc3");
  EXPECT_EQ(d.logprobs[0].text_offset, 0);
  EXPECT_EQ(d.logprobs[1].text_offset, 1);
  EXPECT_EQ(d.logprobs[2].text_offset, 1);
  EXPECT_EQ(d.logprobs[3].text_offset, 2);  // after "hé"
  EXPECT_DOUBLE_EQ(s.cumulative_logprob(), -2.0);  // the prompt's do not count

  // A worker that sent no prompt log probabilities: the tokens, no values.
  ChoiceStream bare(*tok_, {.logprobs = true, .legacy = true});
  ChoiceStream::Delta b;
  bare.Echo("hi", {'h', 'i'}, {}, &b);
  ASSERT_EQ(b.logprobs.size(), 2u);
  EXPECT_FALSE(b.logprobs[1].logprob.has_value());
}

// A token the tokenizer put before the text (a BOS, here id 256) is not in the
// echoed text: its entry is there, with no width, and the offsets stay in the
// text. Written in the prompt, the same token has its width.
TEST_F(ChoiceStreamTest, EchoedTokensTheTokenizerAddedHaveNoWidth) {
  ChoiceStream s(*tok_, {.logprobs = true});
  ChoiceStream::Delta d;
  s.Echo("ab", {256, 'a', 'b'}, {}, &d);
  const v1::TokenLogprob x = Lp('x', -2.0f);
  s.Push('x', &x, &d);
  EXPECT_EQ(d.text, "abx");
  ASSERT_EQ(d.logprobs.size(), 4u);
  EXPECT_EQ(d.logprobs[0].text_offset, 0);
  EXPECT_EQ(d.logprobs[1].text_offset, 0);
  EXPECT_EQ(d.logprobs[2].text_offset, 1);
  EXPECT_EQ(d.logprobs[3].text_offset, 2);

  ChoiceStream written(*tok_, {.logprobs = true});
  ChoiceStream::Delta w;
  const std::string special = tok_->Decode({256});
  written.Echo(special + "a", {256, 'a'}, {}, &w);
  ASSERT_EQ(w.logprobs.size(), 2u);
  EXPECT_EQ(w.logprobs[1].text_offset, static_cast<int64_t>(special.size()));  // ASCII content
}

TEST_F(ChoiceStreamTest, StopStringsStillEndTheText) {
  ChoiceStream s(*tok_, {.stop = {"b"}, .logprobs = true});
  ChoiceStream::Delta d;
  const v1::TokenLogprob a = Lp('a', -1.0f), b = Lp('b', -1.0f);
  s.Push('a', &a, &d);
  s.Push('b', &b, &d);
  EXPECT_TRUE(s.stopped());
  EXPECT_EQ(d.text, "a");
  EXPECT_EQ(d.logprobs.size(), 2u);  // the token that completed the stop string was generated
}

ResponseHeader Header(Endpoint e) {
  return {.endpoint = e, .id = "id-1", .created = 1700000000, .model = "tiny", .tier = scheduler::Tier::kStandard};
}

std::vector<TokenLogprobEntry> Entries() {
  return {{.token = "\\xe2", .bytes = "\xe2", .logprob = -0.5, .top = {{"\\xe2", "\xe2", -0.5}, {"x", "x", -2}},
           .text_offset = 0},
          {.token = "a", .bytes = "a", .logprob = -std::numeric_limits<double>::infinity(), .text_offset = 1}};
}

TEST(LogprobsJson, ChatChoicesCarryContentEntries) {
  std::vector<ChoiceResult> choices = {{.index = 0, .text = "x", .finish_reason = "stop"},
                                       {.index = 1, .text = "y", .finish_reason = "length",
                                        .has_logprobs = true, .logprobs = Entries()}};
  const Json j = Json::parse(CompletionJson(Header(kChat), choices, {3, 2}));
  ASSERT_EQ(j["choices"].size(), 2u);
  EXPECT_TRUE(j["choices"][0]["logprobs"].is_null());
  EXPECT_EQ(j["choices"][1]["index"], 1);
  EXPECT_EQ(j["choices"][1]["message"]["content"], "y");
  EXPECT_EQ(j["choices"][1]["logprobs"],
            Json::parse(R"({"content": [
                {"token": "\\xe2", "logprob": -0.5, "bytes": [226],
                 "top_logprobs": [{"token": "\\xe2", "logprob": -0.5, "bytes": [226]},
                                  {"token": "x", "logprob": -2.0, "bytes": [120]}]},
                {"token": "a", "logprob": -9999.0, "bytes": [97], "top_logprobs": []}],
              "refusal": null})"));
}

TEST(LogprobsJson, CompletionChoicesCarryTheLegacyShape) {
  std::vector<TokenLogprobEntry> entries = {{.token = "h", .bytes = "h", .text_offset = 0}};
  for (TokenLogprobEntry& e : Entries()) entries.push_back(e);
  const Json j = Json::parse(CompletionJson(
      Header(kCompletions), {{.index = 3, .text = "h", .finish_reason = "length", .has_logprobs = true,
                              .logprobs = entries}},
      {1, 2}));
  EXPECT_EQ(j["choices"][0]["index"], 3);
  EXPECT_EQ(j["choices"][0]["logprobs"], Json::parse(R"({
      "tokens": ["h", "\\xe2", "a"],
      "token_logprobs": [null, -0.5, -9999.0],
      "top_logprobs": [null, {"\\xe2": -0.5, "x": -2.0}, {}],
      "text_offset": [0, 0, 1]})"));
}

TEST(LogprobsJson, CompletionTopLogprobsKeepMostLikelyFirst) {
  const std::string body = CompletionJson(
      Header(kCompletions),
      {{.text = "z", .has_logprobs = true,
        .logprobs = {{.token = "z", .bytes = "z", .logprob = -0.25, .top = {{"z", "z", -0.25}, {"a", "a", -3}}}}}},
      {1, 1});
  EXPECT_THAT(body, HasSubstr(R"("top_logprobs":[{"z":-0.25,"a":-3.0}])"));
  // OpenAI's field order.
  EXPECT_THAT(body, HasSubstr(R"({"id":"id-1","object":"text_completion","created":1700000000,"model":"tiny")"));
  EXPECT_THAT(body, HasSubstr(R"("choices":[{"index":0,"text":"z","logprobs":{"tokens")"));
}

TEST(LogprobsJson, ChunksCarryTheirIndexAndTheirTokensLogprobs) {
  const std::vector<TokenLogprobEntry> entries = Entries();
  const Json chat = Json::parse(ChunkJson(Header(kChat), {.index = 2, .text = "a", .logprobs = &entries}));
  EXPECT_EQ(chat["choices"][0]["index"], 2);
  EXPECT_EQ(chat["choices"][0]["logprobs"]["content"].size(), 2u);
  EXPECT_EQ(chat["choices"][0]["logprobs"]["content"][0]["bytes"], Json::array({226}));
  const std::vector<TokenLogprobEntry> none;
  const Json empty = Json::parse(ChunkJson(Header(kChat), {.text = "", .logprobs = &none}));
  EXPECT_EQ(empty["choices"][0]["logprobs"], (Json{{"content", Json::array()}, {"refusal", nullptr}}));
  EXPECT_TRUE(Json::parse(ChunkJson(Header(kChat), {.text = "a"}))["choices"][0]["logprobs"].is_null());
  const Json text = Json::parse(ChunkJson(Header(kCompletions), {.index = 1, .text = "a", .logprobs = &entries}));
  EXPECT_EQ(text["choices"][0]["logprobs"]["tokens"], Json::array({"\\xe2", "a"}));
  EXPECT_EQ(text["choices"][0]["logprobs"]["text_offset"], Json::array({0, 1}));
}

// The limits are coordinator flags, declared once and checked at start-up.
TEST(RequestLimitFlags, DefaultsAndBadValuesNameTheFlag) {
  const auto parse = [](std::vector<const char*> args) {
    args.insert(args.begin(), {"joule-coordinator", "--model", "/m"});
    return cluster::ParseCoordinatorOptions(static_cast<int>(args.size()), args.data());
  };
  auto defaults = parse({});
  ASSERT_TRUE(defaults.ok()) << defaults.status();
  EXPECT_EQ(defaults->max_n, 16);
  EXPECT_EQ(defaults->max_best_of, 16);
  EXPECT_EQ(defaults->max_logprobs, 20);
  EXPECT_EQ(defaults->max_prompts_per_request, 16);
  EXPECT_EQ(defaults->max_logit_bias_entries, 300);
  EXPECT_EQ(defaults->max_generations_per_request, 64);
  auto set = parse({"--max-n", "4", "--max-logprobs", "5", "--max-logit-bias-entries", "0"});
  ASSERT_TRUE(set.ok()) << set.status();
  EXPECT_EQ(set->max_n, 4);
  EXPECT_EQ(set->max_logprobs, 5);
  for (const char* flag : {"--max-n", "--max-best-of", "--max-prompts-per-request", "--max-generations-per-request"}) {
    auto bad = parse({flag, "0"});
    ASSERT_FALSE(bad.ok()) << flag;
    EXPECT_THAT(std::string(bad.status().message()), HasSubstr(flag));
  }
  auto too_many = parse({"--max-logprobs", "21"});  // workers return at most 20
  ASSERT_FALSE(too_many.ok());
  EXPECT_THAT(std::string(too_many.status().message()), HasSubstr("--max-logprobs"));
  EXPECT_FALSE(parse({"--max-logit-bias-entries", "-1"}).ok());
}

}  // namespace
}  // namespace joule::http
