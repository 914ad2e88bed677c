// The tokenizer files of the built-in models (joule-make-model): a byte-level
// vocabulary without merges, ids 0..255 are the bytes, then a family's special
// tokens.
#include <initializer_list>
#include <string>
#include <string_view>

#include "coordinator/tokenizer/byte_level.h"
#include "coordinator/tokenizer/chat_template.h"
#include "coordinator/tokenizer/tokenizer.h"
#include "nlohmann/json.hpp"

namespace joule::tokenizer {
namespace {

using OrderedJson = nlohmann::ordered_json;

// tokenizer.json: the 256 byte tokens, `specials` from id 256 on.
std::string ByteLevelTokenizerJson(std::initializer_list<const char*> specials,
                                   const OrderedJson& post_processor) {
  OrderedJson byte_level = {{"type", "ByteLevel"},
                            {"add_prefix_space", false},
                            {"trim_offsets", true},
                            {"use_regex", true}};
  OrderedJson added = OrderedJson::array();
  int32_t id = 256;
  for (const char* content : specials) {
    added.push_back({{"id", id++},
                     {"content", content},
                     {"single_word", false},
                     {"lstrip", false},
                     {"rstrip", false},
                     {"normalized", false},
                     {"special", true}});
  }
  OrderedJson vocab = OrderedJson::object();
  for (int b = 0; b < 256; ++b) vocab[internal::ByteToVocabKey(static_cast<uint8_t>(b))] = b;
  OrderedJson model = {{"type", "BPE"},
                       {"dropout", nullptr},
                       {"unk_token", nullptr},
                       {"continuing_subword_prefix", nullptr},
                       {"end_of_word_suffix", nullptr},
                       {"fuse_unk", false},
                       {"byte_fallback", false},
                       {"vocab", std::move(vocab)},
                       {"merges", OrderedJson::array()}};
  OrderedJson root = {{"version", "1.0"},
                      {"truncation", nullptr},
                      {"padding", nullptr},
                      {"added_tokens", std::move(added)},
                      {"normalizer", nullptr},
                      {"pre_tokenizer", byte_level},
                      {"post_processor", post_processor.is_null() ? byte_level : post_processor},
                      {"decoder", byte_level},
                      {"model", std::move(model)}};
  return root.dump(2) + "\n";
}

// Renders what DeepSeek-V3's own chat_template renders for system/user/assistant
// conversations (RenderDeepseekV3Chat), for tools that run the Jinja template;
// tests/reference/deepseek_v3_chat_fixtures.py --check compares the two.
constexpr char kDeepseekV3ChatTemplate[] =
    "{% set ns = namespace(system='', first=true) %}"
    "{% for m in messages %}{% if m['role'] == 'system' %}"
    "{% set ns.system = m['content'] if ns.first else ns.system + '\\n\\n' + m['content'] %}"
    "{% set ns.first = false %}{% endif %}{% endfor %}"
    "{{ bos_token }}{{ ns.system }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
    "{% elif m['role'] == 'assistant' %}"
    "{{ '<｜Assistant｜>' + m['content'] + '<｜end▁of▁sentence｜>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}";

}  // namespace

std::string MakeByteLevelTokenizerJson() {
  return ByteLevelTokenizerJson({"<|endoftext|>", "<|im_start|>", "<|im_end|>"}, nullptr);
}

std::string MakeDeepseekV3ByteLevelTokenizerJson() {
  // DeepSeek-V3's post_processor: ByteLevel, which adds no token.
  const OrderedJson post_processor = {{"type", "ByteLevel"},
                                      {"add_prefix_space", true},
                                      {"trim_offsets", false},
                                      {"use_regex", true}};
  return ByteLevelTokenizerJson({deepseek_v3::kBos, deepseek_v3::kPad, deepseek_v3::kEos,
                                 deepseek_v3::kUser, deepseek_v3::kAssistant},
                                post_processor);
}

std::string MakeDeepseekV3TokenizerConfigJson(int64_t model_max_length) {
  const OrderedJson config = {{"add_bos_token", true},
                              {"add_eos_token", false},
                              {"bos_token", std::string(deepseek_v3::kBos)},
                              {"eos_token", std::string(deepseek_v3::kEos)},
                              {"pad_token", std::string(deepseek_v3::kEos)},
                              {"clean_up_tokenization_spaces", false},
                              {"legacy", true},
                              {"model_max_length", model_max_length},
                              {"tokenizer_class", "LlamaTokenizerFast"},
                              {"chat_template", kDeepseekV3ChatTemplate}};
  return config.dump(2) + "\n";
}

}  // namespace joule::tokenizer
