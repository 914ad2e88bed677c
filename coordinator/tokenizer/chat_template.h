// Chat messages -> prompt text. The Qwen family's chat template (ChatML) is the
// only one the front door renders; other models' Jinja templates are not run.
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace joule::tokenizer {

struct ChatMessage {
  std::string role;
  std::string content;
};

// ChatML as the Qwen family uses it: "<|im_start|>ROLE\nCONTENT<|im_end|>\n" per message,
// then "<|im_start|>assistant\n" when add_generation_prompt. Errors name messages[i].role for
// roles other than system/user/assistant.
absl::StatusOr<std::string> RenderChatMl(const std::vector<ChatMessage>& messages,
                                         bool add_generation_prompt);

}  // namespace joule::tokenizer
