// Encode and decode with the real Qwen3 and DeepSeek-V3 tokenizers (the
// tokenizer.json files of tests/data/tokenizer, unpacked at configure time):
// the input is the text a client sends. Besides the checks every tokenizer
// gets (tokenizer_checks.h), text survives the round trip: DeepSeek-V3 has no
// normalizer, so Decode(Encode(text)) == text for any UTF-8; Qwen3 normalizes
// to NFC, so the same holds for text already in NFC.
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "coordinator/tokenizer/tokenizer.h"
#include "tests/fuzz/fuzz_check.h"
#include "tests/fuzz/tokenizer_checks.h"
#include "unicode/normalizer2.h"
#include "unicode/unistr.h"

namespace joule::fuzz {
namespace {

struct Loaded {
  std::unique_ptr<tokenizer::Tokenizer> tokenizer;
  bool nfc = false;  // the tokenizer normalizes to NFC
};

Loaded Load(const std::string& model, bool nfc) {
  auto t = tokenizer::LoadTokenizer(std::string(JOULE_HF_TOKENIZERS_DIR) + "/" + model);
  FUZZ_CHECK(t.ok(), "%s", t.status().ToString().c_str());
  return {std::move(*t), nfc};
}

bool IsNfc(std::string_view text) {
  UErrorCode status = U_ZERO_ERROR;
  const icu::Normalizer2* nfc = icu::Normalizer2::getNFCInstance(status);
  FUZZ_CHECK(U_SUCCESS(status), "ICU NFC: %s", u_errorName(status));
  const bool normalized =
      nfc->isNormalized(icu::UnicodeString::fromUTF8(icu::StringPiece(text.data(), text.size())), status);
  return U_SUCCESS(status) && normalized;
}

}  // namespace
}  // namespace joule::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using joule::fuzz::Loaded;
  static const Loaded* const kTokenizers =
      new Loaded[2]{joule::fuzz::Load("qwen3", /*nfc=*/true), joule::fuzz::Load("deepseek_v3", /*nfc=*/false)};
  const std::string_view text = joule::fuzz::Text(data, size);
  const bool utf8 = joule::fuzz::IsUtf8(text);
  for (int i = 0; i < 2; ++i) {
    const joule::tokenizer::Tokenizer& t = *kTokenizers[i].tokenizer;
    const std::vector<int32_t> ids = joule::fuzz::CheckEncode(t, text);
    FUZZ_CHECK(!utf8 || text.empty() || !ids.empty(), "non-empty text encoded to no tokens");
    joule::fuzz::CheckDecode(t, ids);
    if (utf8 && (!kTokenizers[i].nfc || joule::fuzz::IsNfc(text))) {
      FUZZ_CHECK(t.Decode(ids) == text, "the text does not survive Encode then Decode (tokenizer %d)", i);
    }
    joule::fuzz::CheckDecode(t, joule::fuzz::IdsFromBytes(t, text));
  }
  return 0;
}
