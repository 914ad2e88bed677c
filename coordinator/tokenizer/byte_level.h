// GPT-2's byte-level alphabet (bytes_to_unicode), shared by the tokenizer.json
// reader and writer. Internal to joule_tokenizer.
//
// Byte level means every token string is spelled with one printable character
// per byte, so any byte string can be encoded and decoding is a table lookup.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace joule::tokenizer::internal {

// The vocabulary key of one byte ("Ġ" for the space).
std::string ByteToVocabKey(uint8_t b);

// Raw bytes spelled by a vocabulary key. Characters outside the byte alphabet
// (not produced by byte-level vocabularies, but tolerated as Hugging Face's
// ByteLevel decoder does) stand for their own UTF-8.
std::string VocabKeyToBytes(std::string_view key);

// Appends the UTF-8 of code point `cp`.
void AppendUtf8(uint32_t cp, std::string* out);

// Offset of the first byte of `text` that is not part of well-formed UTF-8, or
// text.size() when it is all well formed.
size_t FindInvalidUtf8(std::string_view text);

}  // namespace joule::tokenizer::internal
