#include "coordinator/http/text_stream.h"

#include <algorithm>
#include <cstdio>
#include <string_view>

namespace joule::http {

TextStream::TextStream(const tokenizer::Tokenizer& tokenizer, std::vector<std::string> stop)
    : decoder_(tokenizer, tokenizer::IncrementalDecoder::Options{.skip_special_tokens = true}),
      stop_(std::move(stop)) {}

std::string TextStream::Push(int32_t id) {
  if (stopped_) return {};
  const std::string decoded = decoder_.Push(id);
  code_points_ += CodePoints(decoded);
  held_ += decoded;
  if (stop_.empty()) return std::exchange(held_, {});

  // Everything released so far is free of stop strings and of any suffix that
  // could begin one, so a stop string can only start inside held_.
  size_t first = std::string::npos;
  for (const std::string& s : stop_) first = std::min(first, held_.find(s));
  if (first != std::string::npos) {
    stopped_ = true;
    std::string out = held_.substr(0, first);
    held_.clear();
    return out;
  }
  // Keep the longest suffix that is a proper prefix of some stop string.
  size_t keep = 0;
  for (const std::string& s : stop_) {
    for (size_t n = std::min(s.size() - 1, held_.size()); n > keep; --n) {
      if (std::string_view(held_).substr(held_.size() - n) == std::string_view(s).substr(0, n)) {
        keep = n;
        break;
      }
    }
  }
  std::string out = held_.substr(0, held_.size() - keep);
  held_.erase(0, held_.size() - keep);
  return out;
}

std::string TextStream::Flush() {
  if (stopped_) return {};
  const std::string decoded = decoder_.Flush();
  code_points_ += CodePoints(decoded);
  std::string rest = held_ + decoded;
  held_.clear();
  // The final bytes (an incomplete character turned U+FFFD) may complete a stop string.
  for (const std::string& s : stop_) {
    const size_t at = rest.find(s);
    if (at != std::string::npos) {
      stopped_ = true;
      rest.resize(at);
    }
  }
  return rest;
}

std::string TokenDisplayText(std::string_view bytes, bool legacy) {
  std::string out;
  bool escaped = false;
  for (size_t i = 0; i < bytes.size();) {
    const size_t len = tokenizer::WholeUtf8Character(bytes.substr(i));
    if (len > 0) {
      out.append(bytes.substr(i, len));
      i += len;
      continue;
    }
    char hex[5];
    std::snprintf(hex, sizeof(hex), "\\x%02x", static_cast<uint8_t>(bytes[i]));
    out += hex;
    escaped = true;
    ++i;
  }
  return legacy && escaped ? "bytes:" + out : out;
}

int64_t CodePoints(std::string_view utf8) {
  int64_t n = 0;
  for (char c : utf8) n += (static_cast<uint8_t>(c) & 0xC0) != 0x80;
  return n;
}

}  // namespace joule::http
