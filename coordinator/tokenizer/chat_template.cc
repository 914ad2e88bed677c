// ChatML rendering. The text matches what Qwen3's tokenizer_config.json
// chat_template produces for plain system/user/assistant conversations without
// tools or reasoning content (checked by tests/data/tokenizer/chat_fixtures.json).
#include "coordinator/tokenizer/chat_template.h"

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace joule::tokenizer {

absl::StatusOr<std::string> RenderChatMl(const std::vector<ChatMessage>& messages,
                                         bool add_generation_prompt) {
  std::string out;
  for (size_t i = 0; i < messages.size(); ++i) {
    const ChatMessage& m = messages[i];
    if (m.role != "system" && m.role != "user" && m.role != "assistant") {
      return absl::InvalidArgumentError(absl::StrCat(
          "messages[", i, "].role: expected \"system\", \"user\" or \"assistant\", got \"", m.role,
          "\""));
    }
    absl::StrAppend(&out, "<|im_start|>", m.role, "\n", m.content, "<|im_end|>\n");
  }
  if (add_generation_prompt) out += "<|im_start|>assistant\n";
  return out;
}

}  // namespace joule::tokenizer
