// Chat messages -> prompt text. The front door renders two formats, chosen per
// model family: ChatML as the Qwen family (and the built-in Qwen and Mixtral
// models) use it, and DeepSeek-V3's. The models' Jinja templates are not run.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "coordinator/tokenizer/tokenizer.h"

namespace joule::tokenizer {

struct ChatMessage {
  std::string role;
  std::string content;
};

enum class ChatFormat {
  kChatMl,      // Qwen2/Qwen3, the built-in Qwen and Mixtral models
  kDeepseekV3,  // DeepseekV3ForCausalLM
};

// DeepSeek-V3's special tokens, as its tokenizer.json spells them: "｜" is
// U+FF5C (fullwidth vertical line), "▁" is U+2581 (lower one eighth block).
namespace deepseek_v3 {
inline constexpr char kBos[] = "<｜begin▁of▁sentence｜>";
inline constexpr char kEos[] = "<｜end▁of▁sentence｜>";
inline constexpr char kPad[] = "<｜▁pad▁｜>";
inline constexpr char kUser[] = "<｜User｜>";
inline constexpr char kAssistant[] = "<｜Assistant｜>";
}  // namespace deepseek_v3

// ChatML as the Qwen family uses it: "<|im_start|>ROLE\nCONTENT<|im_end|>\n" per message,
// then "<|im_start|>assistant\n" when add_generation_prompt. Errors name messages[i].role for
// roles other than system/user/assistant.
absl::StatusOr<std::string> RenderChatMl(const std::vector<ChatMessage>& messages,
                                         bool add_generation_prompt);

// What DeepSeek-V3's chat_template renders for system/user/assistant
// conversations: the BOS, then every system message's content (joined by a
// blank line, wherever they stand), then "<｜User｜>CONTENT" per user message and
// "<｜Assistant｜>CONTENT<｜end▁of▁sentence｜>" per assistant message, then
// "<｜Assistant｜>" when add_generation_prompt. The text starts with the BOS, so
// it is encoded without special tokens (Tokenizer::Encode). Tool messages and
// tool calls are not rendered: other roles are errors naming messages[i].role.
absl::StatusOr<std::string> RenderDeepseekV3Chat(const std::vector<ChatMessage>& messages,
                                                 bool add_generation_prompt);

absl::StatusOr<std::string> RenderChat(ChatFormat format, const std::vector<ChatMessage>& messages,
                                       bool add_generation_prompt);

// OK when `tokenizer` has every marker `format` writes as one added token;
// otherwise an error naming the first missing one (spelled byte by byte, a
// marker would mean nothing to the model).
absl::Status CheckChatTokens(ChatFormat format, const Tokenizer& tokenizer);

// The ids that end the assistant's turn, where the tokenizer has them: ChatML's
// <|im_end|> and <|endoftext|>; DeepSeek-V3's <｜end▁of▁sentence｜>.
std::vector<int32_t> ChatStopTokenIds(ChatFormat format, const Tokenizer& tokenizer);

}  // namespace joule::tokenizer
