// The text of one generation as tokens arrive: UTF-8-safe incremental
// detokenization (special tokens left out) plus stop strings. Text that might
// be the start of a stop string is held back until it is known not to be, so
// a client never sees part of a stop string; once one appears, the text ends
// just before it.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "coordinator/tokenizer/tokenizer.h"

namespace joule::http {

class TextStream {
 public:
  // `tokenizer` must outlive the stream.
  TextStream(const tokenizer::Tokenizer& tokenizer, std::vector<std::string> stop);

  // Text that became final with `id` (possibly empty). After a stop string
  // was found, stopped() is true and further tokens give nothing.
  std::string Push(int32_t id);

  // End of generation: whatever is still held back.
  std::string Flush();

  bool stopped() const { return stopped_; }

  // Unicode code points decoded so far (released or held back): where the
  // next token's text begins in the output (completions' text_offset).
  int64_t code_points() const { return code_points_; }

 private:
  tokenizer::IncrementalDecoder decoder_;
  std::vector<std::string> stop_;
  std::string held_;  // decoded, not yet released: a possible stop-string prefix
  bool stopped_ = false;
  int64_t code_points_ = 0;
};

// How the API shows one token's bytes: as text where they are whole UTF-8
// characters, each other byte as a \xNN escape (OpenAI's chat logprobs: a
// token with part of a character reads "\xe2\x80"; `bytes` is exact). With
// `legacy`, as completions' logprobs show it: such a token is "bytes:\xe2\x80".
std::string TokenDisplayText(std::string_view bytes, bool legacy);

// Unicode code points in UTF-8 text (a stray byte counts as one).
int64_t CodePoints(std::string_view utf8);

}  // namespace joule::http
