// The text of one generation as tokens arrive: UTF-8-safe incremental
// detokenization (special tokens left out) plus stop strings. Text that might
// be the start of a stop string is held back until it is known not to be, so
// a client never sees part of a stop string; once one appears, the text ends
// just before it.
#pragma once

#include <cstdint>
#include <string>
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

 private:
  tokenizer::IncrementalDecoder decoder_;
  std::vector<std::string> stop_;
  std::string held_;  // decoded, not yet released: a possible stop-string prefix
  bool stopped_ = false;
};

}  // namespace joule::http
