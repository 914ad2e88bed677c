// Chat rendering. ChatML matches what Qwen3's tokenizer_config.json
// chat_template produces for plain system/user/assistant conversations without
// tools or reasoning content (tests/data/tokenizer/chat_fixtures.json); the
// DeepSeek-V3 rendering matches DeepSeek-V3's chat_template on the same kind of
// conversations (deepseek_v3_chat_fixtures.json).
#include "coordinator/tokenizer/chat_template.h"

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace joule::tokenizer {
namespace {

absl::Status CheckRoles(const std::vector<ChatMessage>& messages) {
  for (size_t i = 0; i < messages.size(); ++i) {
    const std::string& role = messages[i].role;
    if (role != "system" && role != "user" && role != "assistant") {
      return absl::InvalidArgumentError(absl::StrCat(
          "messages[", i, "].role: expected \"system\", \"user\" or \"assistant\", got \"", role,
          "\""));
    }
  }
  return absl::OkStatus();
}

std::vector<const char*> ChatMarkers(ChatFormat format) {
  if (format == ChatFormat::kDeepseekV3) {
    return {deepseek_v3::kBos, deepseek_v3::kEos, deepseek_v3::kUser, deepseek_v3::kAssistant};
  }
  return {"<|im_start|>", "<|im_end|>"};
}

}  // namespace

absl::StatusOr<std::string> RenderChatMl(const std::vector<ChatMessage>& messages,
                                         bool add_generation_prompt) {
  if (absl::Status s = CheckRoles(messages); !s.ok()) return s;
  std::string out;
  for (const ChatMessage& m : messages) {
    absl::StrAppend(&out, "<|im_start|>", m.role, "\n", m.content, "<|im_end|>\n");
  }
  if (add_generation_prompt) out += "<|im_start|>assistant\n";
  return out;
}

absl::StatusOr<std::string> RenderDeepseekV3Chat(const std::vector<ChatMessage>& messages,
                                                 bool add_generation_prompt) {
  if (absl::Status s = CheckRoles(messages); !s.ok()) return s;
  // The template gathers the system prompts first and writes them after the BOS.
  std::string out(deepseek_v3::kBos);
  bool first_system = true;
  for (const ChatMessage& m : messages) {
    if (m.role != "system") continue;
    absl::StrAppend(&out, first_system ? "" : "\n\n", m.content);
    first_system = false;
  }
  for (const ChatMessage& m : messages) {
    if (m.role == "user") absl::StrAppend(&out, deepseek_v3::kUser, m.content);
    if (m.role == "assistant") {
      absl::StrAppend(&out, deepseek_v3::kAssistant, m.content, deepseek_v3::kEos);
    }
  }
  if (add_generation_prompt) out += deepseek_v3::kAssistant;
  return out;
}

absl::StatusOr<std::string> RenderChat(ChatFormat format, const std::vector<ChatMessage>& messages,
                                       bool add_generation_prompt) {
  if (format == ChatFormat::kDeepseekV3) return RenderDeepseekV3Chat(messages, add_generation_prompt);
  return RenderChatMl(messages, add_generation_prompt);
}

absl::Status CheckChatTokens(ChatFormat format, const Tokenizer& tokenizer) {
  for (const char* marker : ChatMarkers(format)) {
    if (!tokenizer.TokenId(marker)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "the tokenizer has no added token \"", marker, "\", which the ",
          format == ChatFormat::kDeepseekV3 ? "DeepSeek-V3" : "ChatML", " chat template writes"));
    }
  }
  return absl::OkStatus();
}

std::vector<int32_t> ChatStopTokenIds(ChatFormat format, const Tokenizer& tokenizer) {
  std::vector<const char*> stops = {"<|im_end|>", "<|endoftext|>"};
  if (format == ChatFormat::kDeepseekV3) stops = {deepseek_v3::kEos};
  std::vector<int32_t> ids;
  for (const char* stop : stops) {
    if (auto id = tokenizer.TokenId(stop)) ids.push_back(*id);
  }
  return ids;
}

}  // namespace joule::tokenizer
