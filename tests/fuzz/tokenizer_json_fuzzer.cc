// tokenizer.json loading (coordinator/tokenizer: ParseTokenizerJson) on any
// bytes, then encode and decode with whatever loads. Input: the tokenizer.json
// text, a NUL byte, then the text to encode (its bytes also serve as ids to
// decode). The seeds are small hand-written tokenizers covering each supported
// model, normalizer, pre-tokenizer and added-token form.
#include <cstddef>
#include <cstdint>

#include "coordinator/tokenizer/tokenizer.h"
#include "tests/fuzz/fuzz_check.h"
#include "tests/fuzz/tokenizer_checks.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto [json, text] = joule::fuzz::SplitAtNul(joule::fuzz::Text(data, size));
  auto tok = joule::tokenizer::ParseTokenizerJson(json, "fuzz/tokenizer.json");
  if (!tok.ok()) {
    FUZZ_CHECK(!tok.status().message().empty(), "refused without a message");
    return 0;
  }
  const joule::tokenizer::Tokenizer& t = **tok;
  FUZZ_CHECK(t.vocab_size() > 0, "loaded with vocab_size %d", t.vocab_size());
  const std::vector<int32_t> ids = joule::fuzz::CheckEncode(t, text);
  joule::fuzz::CheckDecode(t, ids);
  joule::fuzz::CheckDecode(t, joule::fuzz::IdsFromBytes(t, text));
  return 0;
}
