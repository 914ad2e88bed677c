// The chat and completion prompts of the built-in DeepSeek-V3 tiny model, from the
// tokenizer files joule-make-model writes: the chat template's markers are single
// tokens, the BOS comes exactly once on either path, and the ChatML families keep
// their prompts (no BOS).
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "coordinator/tokenizer/chat_template.h"
#include "coordinator/tokenizer/tokenizer.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace joule::tokenizer {
namespace {

using ::testing::ElementsAreArray;

// ids of the built-in DeepSeek-V3 tokenizer (tokenizer.h).
constexpr int32_t kBos = 256, kEos = 258, kUser = 259, kAssistant = 260;

// The tokenizer of `joule-make-model --family FAMILY --preset tiny --config-only`.
std::unique_ptr<Tokenizer> MadeTokenizer(const std::string& family) {
  char tmpl[] = "/tmp/joule-chat-XXXXXX";
  if (mkdtemp(tmpl) == nullptr) return nullptr;
  const std::string dir = tmpl;
  const std::string cmd = absl::StrCat(JOULE_MAKE_MODEL_BIN, " --family ", family,
                                       " --preset tiny --config-only --out ", dir, " >/dev/null 2>&1");
  const int status = std::system(cmd.c_str());
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << cmd;
  auto tok = LoadTokenizer(dir);
  std::filesystem::remove_all(dir);
  EXPECT_TRUE(tok.ok()) << tok.status();
  return tok.ok() ? std::move(tok).value() : nullptr;
}

std::vector<int32_t> Concat(std::initializer_list<std::vector<int32_t>> parts) {
  std::vector<int32_t> out;
  for (const auto& p : parts) out.insert(out.end(), p.begin(), p.end());
  return out;
}

std::vector<int32_t> Bytes(std::string_view s) { return std::vector<int32_t>(s.begin(), s.end()); }

const std::vector<ChatMessage> kConversation = {
    {"system", "Be brief."}, {"user", "Hi"}, {"assistant", "Hello"}, {"user", "Bye"}};

TEST(DeepseekV3TinyModel, ChatPromptHasOneBosAndSingleTokenMarkers) {
  auto tok = MadeTokenizer("deepseek_v3");
  ASSERT_NE(tok, nullptr);
  ASSERT_TRUE(CheckChatTokens(ChatFormat::kDeepseekV3, *tok).ok());
  auto text = RenderChat(ChatFormat::kDeepseekV3, kConversation, /*add_generation_prompt=*/true);
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_EQ(*text,
            "<｜begin▁of▁sentence｜>Be brief.<｜User｜>Hi<｜Assistant｜>Hello<｜end▁of▁sentence｜>"
            "<｜User｜>Bye<｜Assistant｜>");
  // The chat path encodes without special tokens: the template's BOS is the only one.
  auto ids = tok->Encode(*text);
  ASSERT_TRUE(ids.ok()) << ids.status();
  EXPECT_THAT(*ids, ElementsAreArray(Concat({{kBos}, Bytes("Be brief."), {kUser}, Bytes("Hi"), {kAssistant},
                                             Bytes("Hello"), {kEos}, {kUser}, Bytes("Bye"), {kAssistant}})));
  EXPECT_EQ(std::count(ids->begin(), ids->end(), kBos), 1);
  EXPECT_THAT(ChatStopTokenIds(ChatFormat::kDeepseekV3, *tok), ElementsAreArray({kEos}));
}

TEST(DeepseekV3TinyModel, CompletionPromptGetsTheBosOnce) {
  auto tok = MadeTokenizer("deepseek_v3");
  ASSERT_NE(tok, nullptr);
  auto ids = tok->EncodeWithSpecialTokens("The sky");
  ASSERT_TRUE(ids.ok()) << ids.status();
  EXPECT_THAT(*ids, ElementsAreArray(Concat({{kBos}, Bytes("The sky")})));
  EXPECT_EQ(tok->Decode(*ids), "<｜begin▁of▁sentence｜>The sky");
}

TEST(DeepseekV3TinyModel, ChatMlFamiliesAreUnchanged) {
  for (const char* family : {"qwen3_moe", "qwen2_moe", "mixtral"}) {
    auto tok = MadeTokenizer(family);
    ASSERT_NE(tok, nullptr) << family;
    EXPECT_TRUE(CheckChatTokens(ChatFormat::kChatMl, *tok).ok()) << family;
    auto ids = tok->EncodeWithSpecialTokens("The sky");
    ASSERT_TRUE(ids.ok()) << ids.status();
    EXPECT_THAT(*ids, ElementsAreArray(Bytes("The sky"))) << family;
  }
}

}  // namespace
}  // namespace joule::tokenizer
