// Streaming detokenization: only whole UTF-8 characters leave the decoder.
#include <cstdint>

#include "coordinator/tokenizer/tokenizer.h"

namespace joule::tokenizer {
namespace {

constexpr std::string_view kReplacement = "\xEF\xBF\xBD";  // U+FFFD

bool IsContinuation(uint8_t c) { return (c & 0xC0) == 0x80; }

// A lead byte (>= 0x80): the character's length and the allowed range of its
// second byte (Unicode table 3-7: rejects overlongs, surrogates and code
// points above U+10FFFF). len 0: a stray continuation or impossible lead byte.
struct Utf8Lead {
  size_t len = 0;
  uint8_t lo = 0x80, hi = 0xBF;
};

Utf8Lead ParseLead(uint8_t c) {
  Utf8Lead l;
  if (c >= 0xC2 && c <= 0xDF) {
    l.len = 2;
  } else if (c >= 0xE0 && c <= 0xEF) {
    l.len = 3;
    if (c == 0xE0) l.lo = 0xA0;
    if (c == 0xED) l.hi = 0x9F;
  } else if (c >= 0xF0 && c <= 0xF4) {
    l.len = 4;
    if (c == 0xF0) l.lo = 0x90;
    if (c == 0xF4) l.hi = 0x8F;
  }
  return l;
}

// How many bytes of `s` (which starts with the lead byte) belong correctly to
// its character: 1..lead.len.
size_t GoodPrefix(std::string_view s, const Utf8Lead& lead) {
  size_t good = 1;
  while (good < lead.len && good < s.size()) {
    const uint8_t d = static_cast<uint8_t>(s[good]);
    const bool ok = good == 1 ? (d >= lead.lo && d <= lead.hi) : IsContinuation(d);
    if (!ok) break;
    ++good;
  }
  return good;
}

}  // namespace

size_t WholeUtf8Character(std::string_view s) {
  if (s.empty()) return 0;
  const uint8_t c = static_cast<uint8_t>(s[0]);
  if (c < 0x80) return 1;
  const Utf8Lead lead = ParseLead(c);
  if (lead.len == 0) return 0;
  return GoodPrefix(s, lead) == lead.len ? lead.len : 0;
}

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
    const Utf8Lead lead = ParseLead(c);
    const size_t len = lead.len;
    if (len == 0) {
      out->append(kReplacement);  // stray continuation or impossible lead byte
      ++i;
      continue;
    }
    const size_t good = GoodPrefix(bytes.substr(i), lead);
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
