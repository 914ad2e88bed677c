#include "coordinator/tokenizer/chat_template.h"

#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/coordinator/tokenizer/hf_fixtures.h"

namespace joule::tokenizer {
namespace {

using ::testing::HasSubstr;

// chat_fixtures.json holds what Qwen3's own Jinja chat_template renders
// (tests/reference/tokenizer_fixtures.mjs).
TEST(RenderChatMl, MatchesQwen3ChatTemplate) {
  nlohmann::json fixtures = testing::ReadJson(testing::DataDir() + "/chat_fixtures.json");
  ASSERT_GE(fixtures["cases"].size(), 8u);
  for (const auto& c : fixtures["cases"]) {
    std::vector<ChatMessage> messages;
    for (const auto& m : c["messages"]) messages.push_back({m["role"], m["content"]});
    auto rendered = RenderChatMl(messages, c["add_generation_prompt"].get<bool>());
    ASSERT_TRUE(rendered.ok()) << rendered.status();
    EXPECT_EQ(*rendered, c["rendered"].get<std::string>()) << c.dump();
  }
}

TEST(RenderChatMl, AppendsTheGenerationPrompt) {
  std::vector<ChatMessage> messages = {{"system", "Be brief."}, {"user", "Hi"}};
  auto without = RenderChatMl(messages, false);
  auto with = RenderChatMl(messages, true);
  ASSERT_TRUE(without.ok() && with.ok());
  EXPECT_EQ(*without, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n");
  EXPECT_EQ(*with, *without + "<|im_start|>assistant\n");
  auto empty = RenderChatMl({}, true);
  ASSERT_TRUE(empty.ok());
  EXPECT_EQ(*empty, "<|im_start|>assistant\n");
}

TEST(RenderChatMl, RejectsUnknownRolesNamingTheMessage) {
  auto r = RenderChatMl({{"user", "a"}, {"tool", "b"}}, true);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(r.status().message(), HasSubstr("messages[1].role"));
  EXPECT_THAT(r.status().message(), HasSubstr("\"tool\""));
  EXPECT_FALSE(RenderChatMl({{"User", "a"}}, false).ok());  // roles are case-sensitive
}

// deepseek_v3_chat_fixtures.json holds what DeepSeek-V3's own Jinja chat_template
// renders (tests/reference/deepseek_v3_chat_fixtures.py).
TEST(RenderDeepseekV3Chat, MatchesDeepseekV3ChatTemplate) {
  nlohmann::json fixtures = testing::ReadJson(testing::DataDir() + "/deepseek_v3_chat_fixtures.json");
  ASSERT_GE(fixtures["cases"].size(), 10u);
  for (const auto& c : fixtures["cases"]) {
    std::vector<ChatMessage> messages;
    for (const auto& m : c["messages"]) messages.push_back({m["role"], m["content"]});
    auto rendered = RenderDeepseekV3Chat(messages, c["add_generation_prompt"].get<bool>());
    ASSERT_TRUE(rendered.ok()) << rendered.status();
    EXPECT_EQ(*rendered, c["rendered"].get<std::string>()) << c.dump();
  }
}

TEST(RenderDeepseekV3Chat, MultiTurnConversation) {
  const std::vector<ChatMessage> messages = {
      {"system", "Be brief."}, {"user", "Hi"}, {"assistant", "Hello"}, {"user", "Bye"}};
  auto with = RenderChat(ChatFormat::kDeepseekV3, messages, true);
  ASSERT_TRUE(with.ok()) << with.status();
  // "｜" is U+FF5C (EF BD 9C), "▁" U+2581 (E2 96 81).
  EXPECT_EQ(*with,
            "<\xEF\xBD\x9C" "begin\xE2\x96\x81of\xE2\x96\x81sentence\xEF\xBD\x9C>Be brief."
            "<\xEF\xBD\x9CUser\xEF\xBD\x9C>Hi<\xEF\xBD\x9C" "Assistant\xEF\xBD\x9C>Hello"
            "<\xEF\xBD\x9C" "end\xE2\x96\x81of\xE2\x96\x81sentence\xEF\xBD\x9C>"
            "<\xEF\xBD\x9CUser\xEF\xBD\x9C>Bye<\xEF\xBD\x9C" "Assistant\xEF\xBD\x9C>");
  auto without = RenderChat(ChatFormat::kDeepseekV3, messages, false);
  ASSERT_TRUE(without.ok());
  EXPECT_EQ(*with, *without + "<｜Assistant｜>");
  // Exactly one BOS, at the start, however many turns.
  EXPECT_EQ(with->find("<｜begin▁of▁sentence｜>"), 0u);
  EXPECT_EQ(with->find("<｜begin▁of▁sentence｜>", 1), std::string::npos);
  auto empty = RenderDeepseekV3Chat({}, true);
  ASSERT_TRUE(empty.ok());
  EXPECT_EQ(*empty, "<｜begin▁of▁sentence｜><｜Assistant｜>");
}

TEST(RenderDeepseekV3Chat, RejectsToolAndUnknownRolesNamingTheMessage) {
  auto r = RenderDeepseekV3Chat({{"system", "s"}, {"user", "a"}, {"tool", "b"}}, true);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(r.status().message(), HasSubstr("messages[2].role"));
  EXPECT_THAT(r.status().message(), HasSubstr("\"tool\""));
  EXPECT_FALSE(RenderChat(ChatFormat::kDeepseekV3, {{"Assistant", "a"}}, false).ok());
}

TEST(RenderChat, ChatMlIsTheDefaultFormat) {
  const std::vector<ChatMessage> messages = {{"user", "Hi"}};
  EXPECT_EQ(*RenderChat(ChatFormat::kChatMl, messages, true), *RenderChatMl(messages, true));
}

// The markers must be single tokens of the model's tokenizer; the start-up check names
// the first one missing.
TEST(CheckChatTokens, NamesTheMissingMarker) {
  auto chatml = ParseTokenizerJson(MakeByteLevelTokenizerJson(), "chatml");
  auto deepseek = ParseTokenizerJson(MakeDeepseekV3ByteLevelTokenizerJson(), "deepseek");
  ASSERT_TRUE(chatml.ok() && deepseek.ok());
  EXPECT_TRUE(CheckChatTokens(ChatFormat::kChatMl, **chatml).ok());
  EXPECT_TRUE(CheckChatTokens(ChatFormat::kDeepseekV3, **deepseek).ok());
  absl::Status s = CheckChatTokens(ChatFormat::kDeepseekV3, **chatml);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("no added token \"<｜begin▁of▁sentence｜>\""));
  EXPECT_THAT(s.message(), HasSubstr("DeepSeek-V3 chat template"));
  s = CheckChatTokens(ChatFormat::kChatMl, **deepseek);
  EXPECT_THAT(s.message(), HasSubstr("no added token \"<|im_start|>\""));
}

TEST(ChatStopTokenIds, EndOfTurnPerFormat) {
  auto chatml = ParseTokenizerJson(MakeByteLevelTokenizerJson(), "chatml");
  auto deepseek = ParseTokenizerJson(MakeDeepseekV3ByteLevelTokenizerJson(), "deepseek");
  ASSERT_TRUE(chatml.ok() && deepseek.ok());
  EXPECT_THAT(ChatStopTokenIds(ChatFormat::kChatMl, **chatml), ::testing::ElementsAre(258, 256));
  EXPECT_THAT(ChatStopTokenIds(ChatFormat::kDeepseekV3, **deepseek), ::testing::ElementsAre(258));
}

}  // namespace
}  // namespace joule::tokenizer
