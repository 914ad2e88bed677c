#include "coordinator/tokenizer/byte_level.h"

#include <array>
#include <string>
#include <string_view>

#include "absl/container/flat_hash_map.h"
#include "coordinator/tokenizer/tokenizer.h"

namespace joule::tokenizer::internal {
namespace {

// Printable latin-1 bytes stand for themselves, the other 68 bytes map to
// U+0100.. in byte order.
std::array<uint32_t, 256> BuildByteToCodepoint() {
  std::array<uint32_t, 256> table{};
  auto printable = [](int b) {
    return (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
  };
  uint32_t next = 256;
  for (int b = 0; b < 256; ++b) table[b] = printable(b) ? static_cast<uint32_t>(b) : next++;
  return table;
}

const std::array<uint32_t, 256>& ByteToCodepoint() {
  static const std::array<uint32_t, 256> table = BuildByteToCodepoint();
  return table;
}

}  // namespace

void AppendUtf8(uint32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

std::string ByteToVocabKey(uint8_t b) {
  std::string key;
  AppendUtf8(ByteToCodepoint()[b], &key);
  return key;
}

std::string VocabKeyToBytes(std::string_view key) {
  static const absl::flat_hash_map<uint32_t, uint8_t> inverse = [] {
    absl::flat_hash_map<uint32_t, uint8_t> m;
    for (int b = 0; b < 256; ++b) m[ByteToCodepoint()[b]] = static_cast<uint8_t>(b);
    return m;
  }();
  std::string out;
  size_t i = 0;
  while (i < key.size()) {
    uint8_t c = static_cast<uint8_t>(key[i]);
    size_t len = c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4;
    if (i + len > key.size()) len = key.size() - i;
    uint32_t cp = len == 1 ? c : len == 2 ? (c & 0x1F) : len == 3 ? (c & 0x0F) : (c & 0x07);
    for (size_t j = 1; j < len; ++j) cp = (cp << 6) | (static_cast<uint8_t>(key[i + j]) & 0x3F);
    auto it = inverse.find(cp);
    if (it != inverse.end()) {
      out.push_back(static_cast<char>(it->second));
    } else {
      out.append(key.substr(i, len));
    }
    i += len;
  }
  return out;
}

size_t FindInvalidUtf8(std::string_view text) {
  // Fast path over ASCII; AppendValidUtf8 knows the exact rules for the rest.
  size_t i = 0;
  while (i < text.size() && static_cast<uint8_t>(text[i]) < 0x80) ++i;
  if (i == text.size()) return i;
  std::string scratch;
  scratch.reserve(text.size() - i);
  size_t held = AppendValidUtf8(text.substr(i), /*final=*/false, &scratch);
  // Equal sizes are not enough: a 3-byte invalid sequence (a 4-byte character
  // cut short) is replaced by the 3 bytes of U+FFFD.
  if (held == 0 && std::string_view(scratch) == text.substr(i)) return text.size();
  // Find where the copy first differs (U+FFFD was written for an invalid byte).
  size_t j = 0;
  while (j < scratch.size() && j < text.size() - i && scratch[j] == text[i + j]) ++j;
  return i + j;
}

}  // namespace joule::tokenizer::internal
