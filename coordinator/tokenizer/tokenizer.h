// Text <-> token ids for the coordinator. Callers depend on this interface only;
// the Hugging Face tokenizer.json reader behind LoadTokenizer lives in
// byte_level_bpe.cc (with pre_tokenizer.cc and bpe.cc).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace joule::tokenizer {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;

  // Token ids for `text`, as Hugging Face's tokenizer.encode(text,
  // add_special_tokens=False) gives them: no BOS/EOS is added (a chat template
  // writes its markers as text). Added tokens (<|im_start|>, ...) are matched
  // exactly, longest first, wherever they occur in the text. Thread-safe.
  // InvalidArgument for text that is not UTF-8 (except for tokenizers without
  // merges or normalizer, like the built-in one, which take any bytes).
  virtual absl::StatusOr<std::vector<int32_t>> Encode(std::string_view text) const = 0;

  // Token ids for `text` as Hugging Face's tokenizer(text) gives them by default
  // (add_special_tokens=True): Encode's ids between the special tokens the
  // post-processor adds, once each. DeepSeek-V3: its BOS first (tokenizer_config.json
  // has LlamaTokenizerFast add it); Qwen and the built-in ChatML models: none.
  // The prompt of /v1/completions; a rendered chat writes its BOS itself and uses Encode.
  virtual absl::StatusOr<std::vector<int32_t>> EncodeWithSpecialTokens(std::string_view text) const = 0;

  // The raw bytes one token stands for (an added token's content for added
  // tokens); empty for ids the tokenizer does not know. Bytes of consecutive
  // tokens concatenate; a multi-byte character may span several tokens.
  virtual std::string TokenBytes(int32_t id) const = 0;

  // Text of `ids`, special tokens included. Unknown ids are skipped (as Hugging
  // Face does); byte sequences that are not valid UTF-8 become U+FFFD, so the
  // result is always valid UTF-8.
  virtual std::string Decode(const std::vector<int32_t>& ids) const = 0;

  // One past the largest id of the vocabulary or the added tokens: the number
  // of rows the model's embedding must have at least.
  virtual int32_t vocab_size() const = 0;

  // Id of the added token whose content is exactly `content` ("<|im_end|>").
  virtual std::optional<int32_t> TokenId(std::string_view content) const = 0;

  // True for added tokens marked "special" (end-of-text, chat markers).
  virtual bool IsSpecial(int32_t id) const = 0;
};

// Reads MODEL_DIR/tokenizer.json (Hugging Face tokenizers format). Supported:
// what Qwen2/Qwen3 and DeepSeek-V3 use — model.type "BPE" with a byte-level
// vocabulary and merges (either spelling; ignore_merges), normalizer null/NFC/
// Sequence, pre_tokenizer ByteLevel/Split (regex, Isolated or Removed)/Sequence,
// decoder ByteLevel, added tokens (special or not, normalized or not),
// post_processor null/ByteLevel/TemplateProcessing/Sequence (see
// EncodeWithSpecialTokens). Anything else is refused; errors name the file and
// the offending field. MODEL_DIR/tokenizer_config.json, when present, can
// replace the post-processor as transformers does: for tokenizer_class
// LlamaTokenizerFast, add_bos_token (default true) and add_eos_token (default
// false) decide which of bos_token and eos_token are added.
absl::StatusOr<std::unique_ptr<Tokenizer>> LoadTokenizer(const std::string& model_dir);

// Same as LoadTokenizer, from the text of a tokenizer.json; `origin` names the
// source in error messages.
absl::StatusOr<std::unique_ptr<Tokenizer>> ParseTokenizerJson(std::string_view json,
                                                              std::string_view origin);
// With the text of the tokenizer_config.json beside it, named `config_origin`.
absl::StatusOr<std::unique_ptr<Tokenizer>> ParseTokenizerJson(std::string_view json,
                                                              std::string_view origin,
                                                              std::string_view config_json,
                                                              std::string_view config_origin);

// The tokenizer.json of the project's built-in models: ids 0..255 are the 256
// bytes (key = the GPT-2 bytes_to_unicode character of the byte, id = byte
// value), no merges, and the special added tokens 256 "<|endoftext|>",
// 257 "<|im_start|>", 258 "<|im_end|>". vocab_size() of it is 259.
std::string MakeByteLevelTokenizerJson();

// The tokenizer.json of the built-in DeepSeek-V3 models: the same 256 byte
// tokens, then DeepSeek-V3's special tokens 256 <｜begin▁of▁sentence｜>,
// 257 <｜▁pad▁｜>, 258 <｜end▁of▁sentence｜>, 259 <｜User｜>, 260 <｜Assistant｜>
// (256 and 258 are the bos_token_id and eos_token_id of joule-make-model's
// config.json). Like DeepSeek-V3's own, its post_processor adds nothing: the BOS
// comes from the tokenizer_config.json below.
std::string MakeDeepseekV3ByteLevelTokenizerJson();
// The tokenizer_config.json beside it, as DeepSeek-V3's: LlamaTokenizerFast with
// add_bos_token, and a chat_template that renders what RenderDeepseekV3Chat does.
std::string MakeDeepseekV3TokenizerConfigJson(int64_t model_max_length);

// Decodes a stream of ids one at a time and returns only complete UTF-8: the
// bytes of a character split over several tokens are held back until the
// character is whole. Invalid sequences become U+FFFD as soon as they are known
// to be invalid. The tokenizer must outlive the decoder.
class IncrementalDecoder {
 public:
  struct Options {
    bool skip_special_tokens = false;
  };
  explicit IncrementalDecoder(const Tokenizer& tokenizer) : IncrementalDecoder(tokenizer, Options{}) {}
  IncrementalDecoder(const Tokenizer& tokenizer, Options options)
      : tokenizer_(tokenizer), options_(options) {}

  // Text that became complete with `id` (possibly empty).
  std::string Push(int32_t id);

  // End of stream: whatever is still held back, incomplete characters as U+FFFD.
  std::string Flush();

  // Bytes held back waiting for the rest of a character (at most 3).
  size_t pending_bytes() const { return pending_.size(); }

 private:
  const Tokenizer& tokenizer_;
  Options options_;
  std::string pending_;
};

// Appends the valid UTF-8 prefix of `bytes` to `out`, invalid sequences as
// U+FFFD, and returns how many bytes at the end form an incomplete (so far
// valid) character; those are not consumed. With `final` they become U+FFFD
// and 0 is returned.
size_t AppendValidUtf8(std::string_view bytes, bool final, std::string* out);
// Length of the whole, valid UTF-8 character at the start of `s`; 0 when none
// starts there (an invalid or incomplete sequence, or `s` empty).
size_t WholeUtf8Character(std::string_view s);

}  // namespace joule::tokenizer
