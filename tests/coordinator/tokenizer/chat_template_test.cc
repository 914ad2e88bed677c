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

}  // namespace
}  // namespace joule::tokenizer
