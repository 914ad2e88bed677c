// Properties of any loaded tokenizer, shared by the tokenizer harnesses:
// well-formed text encodes, ids stay inside the vocabulary, decoding always
// gives UTF-8, and streaming decoding (IncrementalDecoder, what SSE clients
// see) gives exactly the text of a whole decode.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "coordinator/tokenizer/tokenizer.h"
#include "tests/fuzz/fuzz_check.h"

namespace joule::fuzz {

// Decode(ids) and the same ids streamed through an IncrementalDecoder (with
// and without special tokens) must agree, and both must be UTF-8.
inline void CheckDecode(const tokenizer::Tokenizer& tok, const std::vector<int32_t>& ids) {
  const std::string whole = tok.Decode(ids);
  FUZZ_CHECK(IsUtf8(whole), "Decode gave malformed UTF-8");
  tokenizer::IncrementalDecoder stream(tok);
  tokenizer::IncrementalDecoder no_special(tok, {.skip_special_tokens = true});
  std::string streamed, streamed_no_special;
  std::vector<int32_t> not_special;
  for (int32_t id : ids) {
    std::string piece = stream.Push(id);
    FUZZ_CHECK(IsUtf8(piece), "IncrementalDecoder::Push gave malformed UTF-8");
    FUZZ_CHECK(stream.pending_bytes() <= 3, "%zu bytes held back", stream.pending_bytes());
    streamed += piece;
    streamed_no_special += no_special.Push(id);
    if (!tok.IsSpecial(id)) not_special.push_back(id);
  }
  streamed += stream.Flush();
  streamed_no_special += no_special.Flush();
  FUZZ_CHECK(streamed == whole, "streamed text (%zu bytes) differs from Decode (%zu bytes)", streamed.size(),
             whole.size());
  FUZZ_CHECK(streamed_no_special == tok.Decode(not_special),
             "streaming without special tokens differs from decoding the other ids");
}

// Ids from raw bytes (two per id, little-endian, a few past the vocabulary
// and negative ones included), for decoding what no encoder would produce.
inline std::vector<int32_t> IdsFromBytes(const tokenizer::Tokenizer& tok, std::string_view bytes) {
  std::vector<int32_t> ids;
  const int32_t span = tok.vocab_size() + 16;
  for (size_t i = 0; i + 1 < bytes.size(); i += 2) {
    const int32_t raw = static_cast<uint8_t>(bytes[i]) | (static_cast<uint8_t>(bytes[i + 1]) << 8);
    ids.push_back(raw % span - 8);
  }
  return ids;
}

// Encodes `text`; returns the ids (empty when refused) after checking them.
inline std::vector<int32_t> CheckEncode(const tokenizer::Tokenizer& tok, std::string_view text) {
  absl::StatusOr<std::vector<int32_t>> ids = tok.Encode(text);
  if (!ids.ok()) {
    FUZZ_CHECK(!IsUtf8(text), "well-formed UTF-8 refused: %s", ids.status().ToString().c_str());
    FUZZ_CHECK(ids.status().code() == absl::StatusCode::kInvalidArgument, "%s", ids.status().ToString().c_str());
    return {};
  }
  for (int32_t id : *ids) {
    FUZZ_CHECK(id >= 0 && id < tok.vocab_size(), "id %d outside [0, %d)", id, tok.vocab_size());
  }
  return *std::move(ids);
}

}  // namespace joule::fuzz
