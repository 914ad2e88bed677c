#include "coordinator/tokenizer/pre_tokenizer.h"

#include <unicode/normalizer2.h>
#include <unicode/regex.h>
#include <unicode/unistr.h>

#include <cstdint>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"

namespace joule::tokenizer::internal {
namespace {

using Json = nlohmann::json;

// GPT-2's pre-tokenizer regex, used by ByteLevel with use_regex.
constexpr char kGpt2Pattern[] =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

std::string TypeOf(const Json& node) {
  if (node.is_object()) {
    auto type = node.find("type");
    if (type != node.end() && type->is_string()) return type->get<std::string>();
  }
  return node.is_null() ? "null" : node.type_name();
}

absl::Status Bad(const std::string& field, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat(field, ": ", what));
}

// Hugging Face compiles these patterns with Oniguruma, whose \s is Unicode
// White_Space (it includes U+000B and U+0085). ICU's \s is [\t\n\f\r\p{Z}],
// which lacks both, so \s and \S are spelled out as the property.
std::string OnigurumaToIcu(const std::string& pattern) {
  std::string out;
  out.reserve(pattern.size() + 32);
  for (size_t i = 0; i < pattern.size(); ++i) {
    if (pattern[i] == '\\' && i + 1 < pattern.size()) {
      char c = pattern[i + 1];
      if (c == 's') {
        out += "\\p{White_Space}";
      } else if (c == 'S') {
        out += "\\P{White_Space}";
      } else {
        out += pattern[i];
        out += c;
      }
      ++i;
    } else {
      out += pattern[i];
    }
  }
  return out;
}

absl::StatusOr<std::unique_ptr<icu::RegexPattern>> Compile(const std::string& pattern,
                                                           uint32_t flags,
                                                           const std::string& field) {
  UErrorCode status = U_ZERO_ERROR;
  UParseError where{};
  std::unique_ptr<icu::RegexPattern> compiled(
      icu::RegexPattern::compile(icu::UnicodeString::fromUTF8(pattern), flags, where, status));
  if (U_FAILURE(status) || compiled == nullptr) {
    return Bad(field, absl::StrCat("regex does not compile (", u_errorName(status), " at offset ",
                                   where.offset, ")"));
  }
  return compiled;
}

// Text being pre-tokenized: UTF-8 for the words handed to BPE, UTF-16 for ICU,
// and the UTF-8 offset of every UTF-16 index so that pieces found by the regex
// (in UTF-16 indices) map back to UTF-8 without converting again.
struct Document {
  std::string owned;  // used when a step rewrote the text
  std::string_view utf8;
  icu::UnicodeString utf16;
  std::vector<int32_t> u8_offset;  // size utf16.length() + 1

  void Reset(std::string_view text) {
    utf8 = text;
    utf16.remove();
    u8_offset.clear();
    u8_offset.reserve(text.size() + 1);
    // `text` is well-formed UTF-8 (checked by the caller).
    char16_t* buf = utf16.getBuffer(static_cast<int32_t>(text.size()) + 1);
    int32_t n = 0;
    size_t i = 0;
    while (i < text.size()) {
      uint8_t c = static_cast<uint8_t>(text[i]);
      uint32_t cp;
      size_t len;
      if (c < 0x80) {
        cp = c;
        len = 1;
      } else if (c < 0xE0) {
        cp = ((c & 0x1F) << 6) | (static_cast<uint8_t>(text[i + 1]) & 0x3F);
        len = 2;
      } else if (c < 0xF0) {
        cp = ((c & 0x0F) << 12) | ((static_cast<uint8_t>(text[i + 1]) & 0x3F) << 6) |
             (static_cast<uint8_t>(text[i + 2]) & 0x3F);
        len = 3;
      } else {
        cp = ((c & 0x07) << 18) | ((static_cast<uint8_t>(text[i + 1]) & 0x3F) << 12) |
             ((static_cast<uint8_t>(text[i + 2]) & 0x3F) << 6) |
             (static_cast<uint8_t>(text[i + 3]) & 0x3F);
        len = 4;
      }
      if (cp < 0x10000) {
        buf[n++] = static_cast<char16_t>(cp);
        u8_offset.push_back(static_cast<int32_t>(i));
      } else {
        cp -= 0x10000;
        buf[n++] = static_cast<char16_t>(0xD800 + (cp >> 10));
        buf[n++] = static_cast<char16_t>(0xDC00 + (cp & 0x3FF));
        u8_offset.push_back(static_cast<int32_t>(i));
        u8_offset.push_back(static_cast<int32_t>(i));
      }
      i += len;
    }
    utf16.releaseBuffer(n);
    u8_offset.push_back(static_cast<int32_t>(text.size()));
  }

  std::string_view Utf8(int32_t begin16, int32_t end16) const {
    int32_t b = u8_offset[begin16];
    return utf8.substr(b, u8_offset[end16] - b);
  }
};

struct Range {
  int32_t begin;
  int32_t end;  // UTF-16 indices
};

}  // namespace

// ---------------------------------------------------------------- Normalizer

absl::StatusOr<Normalizer> Normalizer::Parse(const Json& node, const std::string& field) {
  Normalizer n;
  if (node.is_null()) return n;
  std::string type = TypeOf(node);
  if (type == "NFC") {
    n.nfc_ = true;
    return n;
  }
  if (type == "Sequence") {
    auto list = node.find("normalizers");
    if (list == node.end() || !list->is_array()) {
      return Bad(field + ".normalizers", "expected an array");
    }
    for (size_t i = 0; i < list->size(); ++i) {
      auto child = Parse((*list)[i], absl::StrCat(field, ".normalizers[", i, "]"));
      if (!child.ok()) return child.status();
      n.nfc_ = n.nfc_ || child->nfc_;  // NFC is idempotent
    }
    return n;
  }
  return Bad(
      field + (node.is_object() ? ".type" : ""),
      absl::StrCat("unsupported normalizer \"", type, "\" (supported: null, NFC, Sequence)"));
}

absl::Status Normalizer::Apply(std::string_view text, std::string* out) const {
  out->clear();
  if (!nfc_) {
    out->assign(text);
    return absl::OkStatus();
  }
  UErrorCode status = U_ZERO_ERROR;
  const icu::Normalizer2* nfc = icu::Normalizer2::getNFCInstance(status);
  if (U_FAILURE(status)) {
    return absl::InternalError(absl::StrCat("ICU NFC normalizer: ", u_errorName(status)));
  }
  icu::StringPiece piece(text.data(), static_cast<int32_t>(text.size()));
  if (nfc->isNormalizedUTF8(piece, status) && U_SUCCESS(status)) {
    out->assign(text);
    return absl::OkStatus();
  }
  status = U_ZERO_ERROR;
  icu::StringByteSink<std::string> sink(out, static_cast<int32_t>(text.size()));
  nfc->normalizeUTF8(0, piece, sink, nullptr, status);
  if (U_FAILURE(status)) {
    return absl::InternalError(absl::StrCat("ICU NFC normalization: ", u_errorName(status)));
  }
  return absl::OkStatus();
}

// -------------------------------------------------------------- PreTokenizer

struct PreTokenizer::Step {
  // A Split step, or ByteLevel's regex when `pattern` is GPT-2's.
  std::unique_ptr<icu::RegexPattern> pattern;  // null: no splitting
  bool remove_matches = false;                 // behavior Removed
  bool invert = false;
  bool add_prefix_space = false;  // ByteLevel
  bool byte_level = false;
};

PreTokenizer::PreTokenizer() = default;
PreTokenizer::~PreTokenizer() = default;
PreTokenizer::PreTokenizer(PreTokenizer&&) noexcept = default;

absl::StatusOr<PreTokenizer> PreTokenizer::Parse(const Json& root) {
  PreTokenizer pre;
  // Depth-first over nested Sequences, so steps run in the file's order.
  auto visit = [&](auto&& self, const Json& node, const std::string& field) -> absl::Status {
    std::string type = TypeOf(node);
    std::string type_field = node.is_object() ? field + ".type" : field;
    if (type == "Sequence") {
      auto list = node.find("pretokenizers");
      if (list == node.end() || !list->is_array()) {
        return Bad(field + ".pretokenizers", "expected an array");
      }
      for (size_t i = 0; i < list->size(); ++i) {
        absl::Status s = self(self, (*list)[i], absl::StrCat(field, ".pretokenizers[", i, "]"));
        if (!s.ok()) return s;
      }
      return absl::OkStatus();
    }
    auto flag = [&](const char* key, bool fallback, bool* value) -> absl::Status {
      auto it = node.find(key);
      if (it == node.end() || it->is_null()) {
        *value = fallback;
      } else if (it->is_boolean()) {
        *value = it->get<bool>();
      } else {
        return Bad(absl::StrCat(field, ".", key), "expected true or false");
      }
      return absl::OkStatus();
    };
    Step step;
    if (type == "ByteLevel") {
      // Hugging Face's defaults: add_prefix_space and use_regex are true.
      bool use_regex = true;
      absl::Status s = flag("add_prefix_space", true, &step.add_prefix_space);
      if (s.ok()) s = flag("use_regex", true, &use_regex);
      if (!s.ok()) return s;
      step.byte_level = true;
      if (use_regex) {
        auto compiled = Compile(OnigurumaToIcu(kGpt2Pattern), 0, field);
        if (!compiled.ok()) return compiled.status();
        step.pattern = std::move(compiled).value();
      }
    } else if (type == "Split") {
      auto pattern = node.find("pattern");
      if (pattern == node.end() || !pattern->is_object()) {
        return Bad(field + ".pattern", "expected {\"Regex\": ...} or {\"String\": ...}");
      }
      auto regex = pattern->find("Regex");
      auto literal = pattern->find("String");
      absl::StatusOr<std::unique_ptr<icu::RegexPattern>> compiled;
      if (regex != pattern->end() && regex->is_string()) {
        compiled = Compile(OnigurumaToIcu(regex->get<std::string>()), 0, field + ".pattern.Regex");
      } else if (literal != pattern->end() && literal->is_string() &&
                 !literal->get<std::string>().empty()) {
        compiled = Compile(literal->get<std::string>(), UREGEX_LITERAL, field + ".pattern.String");
      } else {
        return Bad(field + ".pattern", "expected {\"Regex\": ...} or {\"String\": ...}");
      }
      if (!compiled.ok()) return compiled.status();
      step.pattern = std::move(compiled).value();
      auto behavior = node.find("behavior");
      std::string b = behavior != node.end() && behavior->is_string()
                          ? behavior->get<std::string>()
                          : (behavior == node.end() ? "(missing)" : behavior->dump());
      if (b == "Removed") {
        step.remove_matches = true;
      } else if (b != "Isolated") {
        return Bad(field + ".behavior",
                   absl::StrCat("unsupported \"", b, "\" (supported: Isolated, Removed)"));
      }
      absl::Status s = flag("invert", false, &step.invert);
      if (!s.ok()) return s;
    } else {
      return Bad(type_field, absl::StrCat("unsupported pre-tokenizer \"", type,
                                          "\" (supported: ByteLevel, Split, Sequence)"));
    }
    pre.steps_.push_back(std::move(step));
    return absl::OkStatus();
  };
  absl::Status s = visit(visit, root, "pre_tokenizer");
  if (!s.ok()) return s;
  bool has_byte_level = false;
  for (const Step& step : pre.steps_) has_byte_level = has_byte_level || step.byte_level;
  if (!has_byte_level) {
    return Bad("pre_tokenizer", absl::StrCat("expected ByteLevel or a Sequence containing it, got ",
                                             TypeOf(root), "; only byte-level BPE is supported"));
  }
  return pre;
}

bool PreTokenizer::preserves_text() const {
  for (const Step& step : steps_) {
    if (step.add_prefix_space || (step.pattern != nullptr && (step.remove_matches || step.invert)))
      return false;
  }
  return true;
}

absl::Status PreTokenizer::Split(std::string_view text,
                                 absl::FunctionRef<void(std::string_view)> emit) const {
  if (text.empty()) return absl::OkStatus();
  Document doc;
  doc.Reset(text);
  std::vector<Range> pieces = {{0, doc.utf16.length()}};
  std::vector<Range> next;
  UErrorCode status = U_ZERO_ERROR;
  for (const Step& step : steps_) {
    if (step.add_prefix_space) {
      // Hugging Face prepends a space to every piece that does not start with
      // one; rebuild the text with those spaces.
      std::string rebuilt;
      rebuilt.reserve(doc.utf8.size() + pieces.size());
      next.clear();
      int32_t begin16 = 0;
      for (const Range& r : pieces) {
        std::string_view p = doc.Utf8(r.begin, r.end);
        int32_t len16 = r.end - r.begin;
        if (p.empty() || p[0] != ' ') {
          rebuilt.push_back(' ');
          ++len16;
        }
        rebuilt.append(p);
        next.push_back({begin16, begin16 + len16});
        begin16 += len16;
      }
      doc.owned = std::move(rebuilt);
      doc.Reset(doc.owned);
      pieces.swap(next);
    }
    if (step.pattern == nullptr) continue;
    std::unique_ptr<icu::RegexMatcher> matcher(step.pattern->matcher(doc.utf16, status));
    if (U_FAILURE(status)) {
      return absl::InternalError(absl::StrCat("ICU regex matcher: ", u_errorName(status)));
    }
    next.clear();
    next.reserve(pieces.size() * 2);
    // Keep matches (Isolated) or drop them (Removed); invert swaps the roles
    // of matches and the text between them.
    auto keep = [&](int32_t b, int32_t e, bool is_match) {
      if (b >= e) return;
      if (step.invert) is_match = !is_match;
      if (is_match && step.remove_matches) return;
      next.push_back({b, e});
    };
    for (const Range& r : pieces) {
      matcher->region(r.begin, r.end, status);
      int32_t prev = r.begin;
      while (matcher->find(status)) {
        int32_t b = matcher->start(status);
        int32_t e = matcher->end(status);
        keep(prev, b, false);
        keep(b, e, true);
        prev = e;
      }
      if (U_FAILURE(status)) {
        return absl::ResourceExhaustedError(
            absl::StrCat("pre-tokenizer regex failed on the text (ICU ", u_errorName(status), ")"));
      }
      keep(prev, r.end, false);
    }
    pieces.swap(next);
  }
  for (const Range& r : pieces) emit(doc.Utf8(r.begin, r.end));
  return absl::OkStatus();
}

}  // namespace joule::tokenizer::internal
