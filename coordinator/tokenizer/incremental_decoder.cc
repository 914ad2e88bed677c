// Streaming detokenization: only whole UTF-8 characters leave the decoder.
#include <cstdint>

#include "coordinator/tokenizer/tokenizer.h"

namespace joule::tokenizer {
namespace {

constexpr std::string_view kReplacement = "\xEF\xBF\xBD";  // U+FFFD

bool IsContinuation(uint8_t c) { return (c & 0xC0) == 0x80; }

}  // namespace

size_t AppendValidUtf8(std::string_view bytes, bool final, std::string* out) {
  size_t i = 0;
  const size_t n = bytes.size();
  while (i < n) {
    uint8_t c = static_cast<uint8_t>(bytes[i]);
    if (c < 0x80) {
      out->push_back(static_cast<char>(c));
      ++i;
      continue;
    }
    // Length and the allowed range of the second byte (Unicode table 3-7:
    // rejects overlongs, surrogates and code points above U+10FFFF).
    size_t len = 0;
    uint8_t lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) {
      len = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
      len = 3;
      if (c == 0xE0) lo = 0xA0;
      if (c == 0xED) hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
      len = 4;
      if (c == 0xF0) lo = 0x90;
      if (c == 0xF4) hi = 0x8F;
    } else {
      out->append(kReplacement);  // stray continuation or impossible lead byte
      ++i;
      continue;
    }
    // Count the bytes that continue this character correctly.
    size_t good = 1;
    while (good < len && i + good < n) {
      uint8_t d = static_cast<uint8_t>(bytes[i + good]);
      bool ok = good == 1 ? (d >= lo && d <= hi) : IsContinuation(d);
      if (!ok) break;
      ++good;
    }
    if (good == len) {
      out->append(bytes.substr(i, len));
      i += len;
    } else if (i + good == n && !final) {
      return n - i;  // a valid start whose remaining bytes have not arrived yet
    } else {
      out->append(kReplacement);  // maximal invalid subpart, as WHATWG/Python do
      i += good;
    }
  }
  return 0;
}

std::string IncrementalDecoder::Push(int32_t id) {
  if (options_.skip_special_tokens && tokenizer_.IsSpecial(id)) return std::string();
  pending_ += tokenizer_.TokenBytes(id);
  std::string out;
  size_t held = AppendValidUtf8(pending_, /*final=*/false, &out);
  pending_.erase(0, pending_.size() - held);
  return out;
}

std::string IncrementalDecoder::Flush() {
  std::string out;
  AppendValidUtf8(pending_, /*final=*/true, &out);
  pending_.clear();
  return out;
}

}  // namespace joule::tokenizer
