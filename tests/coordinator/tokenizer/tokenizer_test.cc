#include "coordinator/tokenizer/tokenizer.h"

#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace joule::tokenizer {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using Json = nlohmann::json;

std::unique_ptr<Tokenizer> BuiltIn() {
  auto tok = ParseTokenizerJson(MakeByteLevelTokenizerJson(), "built-in");
  EXPECT_TRUE(tok.ok()) << tok.status();
  return tok.ok() ? std::move(tok).value() : nullptr;
}

std::vector<int32_t> Bytes(std::string_view s) {
  std::vector<int32_t> ids;
  for (unsigned char c : s) ids.push_back(c);
  return ids;
}

bool IsValidUtf8(std::string_view s) {
  std::string out;
  return AppendValidUtf8(s, /*final=*/false, &out) == 0 && out == s;
}

TEST(ByteLevelTokenizerJson, HasTheBuiltInLayout) {
  Json j = Json::parse(MakeByteLevelTokenizerJson());
  EXPECT_EQ(j["model"]["type"], "BPE");
  EXPECT_TRUE(j["model"]["merges"].empty());
  EXPECT_EQ(j["pre_tokenizer"]["type"], "ByteLevel");
  EXPECT_EQ(j["decoder"]["type"], "ByteLevel");
  const Json& vocab = j["model"]["vocab"];
  ASSERT_EQ(vocab.size(), 256u);
  EXPECT_EQ(vocab["A"], 65);
  EXPECT_EQ(vocab["!"], 33);
  EXPECT_EQ(vocab["\xC4\x80"], 0);     // U+0100 is byte 0x00
  EXPECT_EQ(vocab["\xC4\xA0"], 32);    // U+0120 'Ġ' is the space
  EXPECT_EQ(vocab["\xC5\x83"], 0xAD);  // U+0143 is the soft hyphen, the 68th remapped byte
  EXPECT_EQ(vocab["\xC3\xBF"], 255);   // 'ÿ' stands for itself
  ASSERT_EQ(j["added_tokens"].size(), 3u);
  EXPECT_EQ(j["added_tokens"][0]["id"], 256);
  EXPECT_EQ(j["added_tokens"][0]["content"], "<|endoftext|>");
  EXPECT_EQ(j["added_tokens"][1]["content"], "<|im_start|>");
  EXPECT_EQ(j["added_tokens"][2]["id"], 258);
  EXPECT_EQ(j["added_tokens"][2]["content"], "<|im_end|>");
  EXPECT_EQ(j["added_tokens"][2]["special"], true);
}

TEST(ByteLevelTokenizer, VocabAndSpecialTokens) {
  auto tok = BuiltIn();
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(tok->vocab_size(), 259);
  EXPECT_EQ(tok->TokenId("<|endoftext|>"), 256);
  EXPECT_EQ(tok->TokenId("<|im_start|>"), 257);
  EXPECT_EQ(tok->TokenId("<|im_end|>"), 258);
  EXPECT_EQ(tok->TokenId("<|nope|>"), std::nullopt);
  EXPECT_TRUE(tok->IsSpecial(258));
  EXPECT_FALSE(tok->IsSpecial(65));
  EXPECT_FALSE(tok->IsSpecial(-1));
  EXPECT_FALSE(tok->IsSpecial(259));
  EXPECT_EQ(tok->TokenBytes(32), " ");
  EXPECT_EQ(tok->TokenBytes(0), std::string(1, '\0'));
  EXPECT_EQ(tok->TokenBytes(257), "<|im_start|>");
  EXPECT_EQ(tok->TokenBytes(259), "");
}

TEST(ByteLevelTokenizer, RoundTripsText) {
  auto tok = BuiltIn();
  ASSERT_NE(tok, nullptr);
  const std::vector<std::string> texts = {
      "Hello, world! 0123456789 ~`@#$%^&*()_+-={}[]|\\:;\"'<>,.?/\t\r\n",
      "Grüße, ça va? Ελληνικά, русский, עברית, العربية, हिन्दी, 中文, 日本語, 한국어",
      "emoji 😀🚀 family 👨‍👩‍👧‍👦 flag 🇯🇵 skin 👍🏽",
      "",
  };
  for (const std::string& text : texts) {
    auto ids = tok->Encode(text);
    ASSERT_TRUE(ids.ok()) << ids.status();
    EXPECT_EQ(*ids, Bytes(text)) << text;  // one id per byte, id = byte value
    EXPECT_EQ(tok->Decode(*ids), text);
  }
}

TEST(ByteLevelTokenizer, EncodesEveryByte) {
  auto tok = BuiltIn();
  ASSERT_NE(tok, nullptr);
  std::string all;
  for (int b = 0; b < 256; ++b) all.push_back(static_cast<char>(b));
  auto ids = tok->Encode(all);
  ASSERT_TRUE(ids.ok()) << ids.status();
  EXPECT_EQ(*ids, Bytes(all));
  std::string back;
  for (int32_t id : *ids) back += tok->TokenBytes(id);
  EXPECT_EQ(back, all);
  // Decode is for display: invalid UTF-8 comes out as U+FFFD, never raw.
  EXPECT_TRUE(IsValidUtf8(tok->Decode(*ids)));
}

TEST(ByteLevelTokenizer, SplitsOutSpecialTokensInsideText) {
  auto tok = BuiltIn();
  ASSERT_NE(tok, nullptr);
  const std::string text = "<|im_start|>user\nHi 👋<|im_end|>\n<|im_start|>assistant\n";
  auto ids = tok->Encode(text);
  ASSERT_TRUE(ids.ok()) << ids.status();
  std::vector<int32_t> want = {257};
  for (int32_t b : Bytes("user\nHi 👋")) want.push_back(b);
  want.push_back(258);
  want.push_back('\n');
  want.push_back(257);
  for (int32_t b : Bytes("assistant\n")) want.push_back(b);
  EXPECT_EQ(*ids, want);
  EXPECT_EQ(tok->Decode(*ids), text);

  // Near misses stay plain bytes.
  auto near = tok->Encode("<|im_sta<|im_end|<|endoftext|>");
  ASSERT_TRUE(near.ok());
  std::vector<int32_t> near_want = Bytes("<|im_sta<|im_end|");
  near_want.push_back(256);
  EXPECT_EQ(*near, near_want);
}

TEST(ByteLevelTokenizer, PrefersTheLongestAddedToken) {
  Json j = Json::parse(MakeByteLevelTokenizerJson());
  j["added_tokens"].push_back({{"id", 300}, {"content", "<|im"}, {"special", false}});
  auto tok = ParseTokenizerJson(j.dump(), "test");
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->vocab_size(), 301);
  EXPECT_FALSE((*tok)->IsSpecial(300));
  auto ids = (*tok)->Encode("<|im_end|><|imx");
  ASSERT_TRUE(ids.ok());
  EXPECT_THAT(*ids, ElementsAre(258, 300, 'x'));
  // Ids between the vocabulary and the added tokens are unknown: skipped.
  EXPECT_EQ((*tok)->Decode({'a', 280, 'b'}), "ab");
}

TEST(ByteLevelTokenizer, LoadsFromModelDirectory) {
  std::filesystem::path dir = std::filesystem::path(::testing::TempDir()) /
                              ("joule_tokenizer_test_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  {
    std::ofstream out(dir / "tokenizer.json", std::ios::binary);
    out << MakeByteLevelTokenizerJson();
  }
  auto tok = LoadTokenizer(dir.string());
  std::filesystem::remove_all(dir);
  ASSERT_TRUE(tok.ok()) << tok.status();
  auto ids = (*tok)->Encode("hi<|endoftext|>");
  ASSERT_TRUE(ids.ok());
  EXPECT_THAT(*ids, ElementsAre('h', 'i', 256));
}

TEST(ByteLevelTokenizer, MissingFileNamesThePath) {
  auto tok = LoadTokenizer("/nonexistent/joule-model");
  ASSERT_FALSE(tok.ok());
  EXPECT_EQ(tok.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(tok.status().message(), HasSubstr("/nonexistent/joule-model/tokenizer.json"));
}

TEST(ByteLevelTokenizer, BadJsonGivesClearErrors) {
  auto err = [](const std::string& text) {
    auto tok = ParseTokenizerJson(text, "m/tokenizer.json");
    EXPECT_FALSE(tok.ok());
    EXPECT_EQ(tok.status().code(), absl::StatusCode::kInvalidArgument);
    return std::string(tok.status().message());
  };
  EXPECT_THAT(err("{not json"), HasSubstr("not valid JSON"));
  EXPECT_THAT(err("[]"), HasSubstr("expected a JSON object"));

  Json base = Json::parse(MakeByteLevelTokenizerJson());
  Json j = base;
  j.erase("model");
  EXPECT_THAT(err(j.dump()), HasSubstr("m/tokenizer.json: model: missing"));

  j = base;
  j["model"]["type"] = "WordPiece";
  EXPECT_THAT(err(j.dump()), HasSubstr("model.type: expected \"BPE\", got \"WordPiece\""));

  j = base;
  j["model"]["vocab"].erase("A");
  EXPECT_THAT(err(j.dump()), HasSubstr("model.vocab: no token for byte 0x41"));

  j = base;
  j["model"]["vocab"]["A"] = "sixty-five";
  EXPECT_THAT(err(j.dump()), HasSubstr("model.vocab[\"A\"]"));

  j = base;
  j["pre_tokenizer"] = {{"type", "Whitespace"}};
  EXPECT_THAT(err(j.dump()),
              HasSubstr("pre_tokenizer.type: unsupported pre-tokenizer \"Whitespace\""));

  j = base;
  j["decoder"] = nullptr;
  EXPECT_THAT(err(j.dump()), HasSubstr("decoder: expected ByteLevel, got null"));

  j = base;
  j["added_tokens"][1].erase("content");
  EXPECT_THAT(err(j.dump()), HasSubstr("added_tokens[1].content"));
}

// A small byte-level BPE tokenizer: the built-in vocabulary plus `tokens`
// (ids from 259 on) and `merges`, with Qwen's normalizer and pre-tokenizer.
Json SmallBpe(const std::vector<std::string>& tokens, const Json& merges) {
  Json j = Json::parse(MakeByteLevelTokenizerJson());
  int32_t id = 259;
  for (const std::string& t : tokens) j["model"]["vocab"][t] = id++;
  j["model"]["merges"] = merges;
  j["normalizer"] = {{"type", "NFC"}};
  j["pre_tokenizer"] = Json::parse(R"({"type": "Sequence", "pretokenizers": [
      {"type": "Split", "pattern": {"Regex":
        "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
       "behavior": "Isolated", "invert": false},
      {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}]})");
  return j;
}

std::unique_ptr<Tokenizer> Parse(const Json& j) {
  auto tok = ParseTokenizerJson(j.dump(), "test");
  EXPECT_TRUE(tok.ok()) << tok.status();
  return tok.ok() ? std::move(tok).value() : nullptr;
}

std::vector<int32_t> EncodeOk(const Tokenizer& tok, std::string_view text) {
  auto ids = tok.Encode(text);
  EXPECT_TRUE(ids.ok()) << ids.status();
  return ids.ok() ? *ids : std::vector<int32_t>{};
}

TEST(BpeTokenizer, AppliesMergesInRankOrder) {
  // "Ġ" is the byte-level spelling of the space.
  auto tok = Parse(SmallBpe({"he", "ll", "hell", "el", "Ġw", "Ġwo"},
                            {"h e", "l l", "he ll", "e l", "Ġ w", "Ġw o"}));
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(tok->vocab_size(), 265);
  // hello -> h e l l o -> he l l o -> he ll o -> hell o
  EXPECT_THAT(EncodeOk(*tok, "hello"), ElementsAre(261, 'o'));
  // " world": the pre-tokenizer keeps the space with the word.
  EXPECT_THAT(EncodeOk(*tok, "hello world"), ElementsAre(261, 'o', 264, 'r', 'l', 'd'));
  // With "e l" ranked first, "hel" becomes h + el instead of he + l.
  auto swapped = Parse(SmallBpe({"he", "el"}, {"e l", "h e"}));
  ASSERT_NE(swapped, nullptr);
  EXPECT_THAT(EncodeOk(*swapped, "hel"), ElementsAre('h', 260));
  auto original = Parse(SmallBpe({"he", "el"}, {"h e", "e l"}));
  ASSERT_NE(original, nullptr);
  EXPECT_THAT(EncodeOk(*original, "hel"), ElementsAre(259, 'l'));
}

TEST(BpeTokenizer, AcceptsBothMergeSpellings) {
  auto strings = Parse(SmallBpe({"he", "ll"}, {"h e", "l l"}));
  auto pairs = Parse(SmallBpe({"he", "ll"}, Json::parse(R"([["h", "e"], ["l", "l"]])")));
  ASSERT_NE(strings, nullptr);
  ASSERT_NE(pairs, nullptr);
  EXPECT_THAT(EncodeOk(*strings, "hello"), ElementsAre(259, 260, 'o'));
  EXPECT_EQ(EncodeOk(*pairs, "hello"), EncodeOk(*strings, "hello"));
}

TEST(BpeTokenizer, IgnoreMergesTakesWholeWordsFromTheVocabulary) {
  Json j = SmallBpe({"he", "hello"}, {"h e"});  // no merge path reaches "hello"
  auto merging = Parse(j);
  j["model"]["ignore_merges"] = true;
  auto ignoring = Parse(j);
  ASSERT_NE(merging, nullptr);
  ASSERT_NE(ignoring, nullptr);
  EXPECT_THAT(EncodeOk(*merging, "hello"), ElementsAre(259, 'l', 'l', 'o'));
  EXPECT_THAT(EncodeOk(*ignoring, "hello"), ElementsAre(260));
  EXPECT_THAT(EncodeOk(*ignoring, "help"), ElementsAre(259, 'l', 'p'));  // not a word: merges
}

TEST(BpeTokenizer, NormalizesToNfcButNotAddedTokens) {
  auto tok = Parse(SmallBpe({}, Json::array()));
  ASSERT_NE(tok, nullptr);
  // "e" + U+0301 COMBINING ACUTE becomes "é" (C3 A9) before BPE.
  EXPECT_EQ(EncodeOk(*tok, "e\xCC\x81"), Bytes("\xC3\xA9"));
  EXPECT_EQ(EncodeOk(*tok, "<|im_end|>e\xCC\x81"), (std::vector<int32_t>{258, 0xC3, 0xA9}));
  // Without a normalizer the text is kept as is.
  Json j = SmallBpe({}, Json::array());
  j["normalizer"] = Json::parse(R"({"type": "Sequence", "normalizers": []})");
  auto plain = Parse(j);
  ASSERT_NE(plain, nullptr);
  EXPECT_EQ(EncodeOk(*plain, "e\xCC\x81"), Bytes("e\xCC\x81"));
}

TEST(BpeTokenizer, SplitRemovedAndInvert) {
  Json j = SmallBpe({"ab"}, {"a b"});
  j["normalizer"] = nullptr;
  // Removed drops the matches (here: digits); invert keeps only them.
  j["pre_tokenizer"] = Json::parse(R"({"type": "Sequence", "pretokenizers": [
      {"type": "Split", "pattern": {"Regex": "\\p{N}+"}, "behavior": "Removed", "invert": false},
      {"type": "ByteLevel", "add_prefix_space": false, "use_regex": false}]})");
  auto removed = Parse(j);
  ASSERT_NE(removed, nullptr);
  EXPECT_THAT(EncodeOk(*removed, "a12b"), ElementsAre('a', 'b'));  // "a" and "b" are apart
  EXPECT_THAT(EncodeOk(*removed, "ab12"), ElementsAre(259));
  j["pre_tokenizer"]["pretokenizers"][0]["invert"] = true;
  auto inverted = Parse(j);
  ASSERT_NE(inverted, nullptr);
  EXPECT_THAT(EncodeOk(*inverted, "a12b"), ElementsAre('1', '2'));
}

TEST(BpeTokenizer, ByteLevelRegexAndPrefixSpace) {
  Json j = SmallBpe({"Ġa", "Ġab"}, {"Ġ a", "Ġa b"});
  j["normalizer"] = nullptr;
  j["pre_tokenizer"] = {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"use_regex", true}};
  auto tok = Parse(j);
  ASSERT_NE(tok, nullptr);
  // A space is put before the text, then GPT-2's regex splits " ab" "!" " ab".
  EXPECT_THAT(EncodeOk(*tok, "ab! ab"), ElementsAre(260, '!', 260));
  EXPECT_EQ(tok->Decode(EncodeOk(*tok, "ab! ab")), " ab! ab");
}

TEST(BpeTokenizer, RejectsTextThatIsNotUtf8) {
  auto tok = Parse(SmallBpe({"he"}, {"h e"}));
  ASSERT_NE(tok, nullptr);
  auto ids = tok->Encode("he\xFF");
  ASSERT_FALSE(ids.ok());
  EXPECT_EQ(ids.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(ids.status().message(), HasSubstr("not valid UTF-8 (byte offset 2)"));
  // A 4-byte character cut after 3 bytes is as long as the U+FFFD replacing it;
  // it used to pass the check and the pre-tokenizer read past the text's end
  // (tests/fuzz/corpus/tokenizer_text/regress-truncated_4_byte_char).
  for (const char* text : {"he\xF0\x9F\x92!", "he\xF0\x9F\x92\xF0\x9F\x92\xBB", "he\xF0\x9F\x92"}) {
    auto cut = tok->Encode(text);
    ASSERT_FALSE(cut.ok()) << text;
    EXPECT_THAT(cut.status().message(), HasSubstr("not valid UTF-8 (byte offset 2)"));
  }
}

TEST(BpeTokenizer, MalformedFilesGetErrorsNamingTheField) {
  auto err = [](const Json& j) {
    auto tok = ParseTokenizerJson(j.dump(), "m/tokenizer.json");
    EXPECT_FALSE(tok.ok());
    EXPECT_EQ(tok.status().code(), absl::StatusCode::kInvalidArgument);
    return std::string(tok.status().message());
  };
  const Json base = SmallBpe({"he"}, {"h e"});
  Json j = base;
  j["model"]["merges"] = {"h e", "l"};
  EXPECT_THAT(
      err(j),
      HasSubstr(
          "m/tokenizer.json: model.merges[1]: expected \"A B\" or [\"A\", \"B\"], got \"l\""));
  j["model"]["merges"] = {"h e", "x y z"};
  EXPECT_THAT(err(j), HasSubstr("model.merges[1]: expected"));
  j["model"]["merges"] = Json::parse(R"([["h", "e"], ["h"]])");
  EXPECT_THAT(err(j), HasSubstr("model.merges[1]: expected"));
  j["model"]["merges"] = {"h e", "l l"};
  EXPECT_THAT(err(j), HasSubstr("model.merges[1]: merged token \"ll\" is not in model.vocab"));
  j["model"]["merges"] = {"h \xE2\x82\xAC"};
  EXPECT_THAT(err(j), HasSubstr("model.merges[0]: token \"€\" is not in model.vocab"));
  j["model"]["merges"] = "h e";
  EXPECT_THAT(err(j), HasSubstr("model.merges: expected an array"));

  j = base;
  j["pre_tokenizer"]["pretokenizers"][1] = {{"type", "Digits"}, {"individual_digits", true}};
  EXPECT_THAT(err(j), HasSubstr("pre_tokenizer.pretokenizers[1].type: unsupported pre-tokenizer "
                                "\"Digits\" (supported: ByteLevel, Split, Sequence)"));
  j = base;
  j["pre_tokenizer"]["pretokenizers"].erase(1);
  EXPECT_THAT(err(j), HasSubstr("pre_tokenizer: expected ByteLevel or a Sequence containing it"));
  j = base;
  j["pre_tokenizer"]["pretokenizers"][0]["behavior"] = "Contiguous";
  EXPECT_THAT(err(j),
              HasSubstr("pre_tokenizer.pretokenizers[0].behavior: unsupported \"Contiguous\""));
  j = base;
  j["pre_tokenizer"]["pretokenizers"][0]["pattern"] = {{"Regex", "(unclosed"}};
  EXPECT_THAT(err(j),
              HasSubstr("pre_tokenizer.pretokenizers[0].pattern.Regex: regex does not compile"));
  j = base;
  j["pre_tokenizer"]["pretokenizers"][0]["pattern"] = "\\s+";
  EXPECT_THAT(err(j), HasSubstr("pre_tokenizer.pretokenizers[0].pattern: expected {\"Regex\""));
  j = base;
  j["pre_tokenizer"] = nullptr;
  EXPECT_THAT(err(j), HasSubstr("pre_tokenizer: unsupported pre-tokenizer \"null\""));

  j = base;
  j["normalizer"] = {{"type", "NFKC"}};
  EXPECT_THAT(err(j), HasSubstr("normalizer.type: unsupported normalizer \"NFKC\""));
  j["normalizer"] = Json::parse(
      R"({"type": "Sequence", "normalizers": [{"type": "NFC"}, {"type": "Lowercase"}]})");
  EXPECT_THAT(err(j),
              HasSubstr("normalizer.normalizers[1].type: unsupported normalizer \"Lowercase\""));

  j = base;
  j["added_tokens"][2]["lstrip"] = true;
  EXPECT_THAT(err(j), HasSubstr("added_tokens[2].lstrip: true is not supported"));
  j = base;
  j["model"]["continuing_subword_prefix"] = "##";
  EXPECT_THAT(err(j), HasSubstr("model.continuing_subword_prefix: \"##\" is not supported"));
  j = base;
  j["model"]["ignore_merges"] = "yes";
  EXPECT_THAT(err(j), HasSubstr("model.ignore_merges: expected true or false"));
  j = base;
  j["decoder"] = {{"type", "Metaspace"}};
  EXPECT_THAT(err(j), HasSubstr("decoder: expected ByteLevel, got Metaspace"));

  // One huge id made the id table gigabytes long
  // (tests/fuzz/corpus/tokenizer_json/regress-huge_added_token_id).
  j = base;
  j["added_tokens"][2]["id"] = 179999812;
  EXPECT_THAT(err(j), HasSubstr("added_tokens[2].id: expected an integer in [0, 4194303]"));
  j = base;
  j["model"]["vocab"]["he"] = 4194304;
  EXPECT_THAT(err(j), HasSubstr("model.vocab[\"he\"]: expected an integer id in [0, 4194303]"));
}

TEST(BpeTokenizer, SharedAcrossThreads) {
  auto tok = Parse(SmallBpe({"he", "ll", "hell"}, {"h e", "l l", "he ll"}));
  ASSERT_NE(tok, nullptr);
  const std::vector<int32_t> want = EncodeOk(*tok, "hello hello, hell!");
  std::vector<std::thread> threads;
  std::atomic<int> mismatches{0};
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 500; ++i) {
        auto ids = tok->Encode("hello hello, hell!");
        if (!ids.ok() || *ids != want) ++mismatches;
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(mismatches.load(), 0);
}

TEST(IncrementalDecoder, HoldsBackSplitCharacters) {
  auto tok = BuiltIn();
  ASSERT_NE(tok, nullptr);
  IncrementalDecoder dec(*tok);
  // "€" is E2 82 AC: nothing leaves until the third byte.
  EXPECT_EQ(dec.Push('a'), "a");
  EXPECT_EQ(dec.Push(0xE2), "");
  EXPECT_EQ(dec.pending_bytes(), 1u);
  EXPECT_EQ(dec.Push(0x82), "");
  EXPECT_EQ(dec.Push(0xAC), "\xE2\x82\xAC");
  EXPECT_EQ(dec.pending_bytes(), 0u);
  // A 4-byte emoji followed by a special token.
  EXPECT_EQ(dec.Push(0xF0), "");
  EXPECT_EQ(dec.Push(0x9F), "");
  EXPECT_EQ(dec.Push(0x98), "");
  EXPECT_EQ(dec.Push(0x80), "😀");
  EXPECT_EQ(dec.Push(258), "<|im_end|>");
  EXPECT_EQ(dec.Flush(), "");
}

TEST(IncrementalDecoder, NeverEmitsPartialUtf8) {
  auto tok = BuiltIn();
  ASSERT_NE(tok, nullptr);
  const std::string text = "a€😀é中<|im_end|>👨‍👩‍👧 done ñ";
  auto ids = tok->Encode(text);
  ASSERT_TRUE(ids.ok());
  IncrementalDecoder dec(*tok);
  std::string all;
  for (int32_t id : *ids) {
    std::string piece = dec.Push(id);
    EXPECT_TRUE(IsValidUtf8(piece)) << "partial UTF-8 after id " << id;
    all += piece;
  }
  all += dec.Flush();
  EXPECT_EQ(all, text);
}

TEST(IncrementalDecoder, InvalidBytesBecomeReplacementCharacters) {
  auto tok = BuiltIn();
  ASSERT_NE(tok, nullptr);
  IncrementalDecoder dec(*tok);
  EXPECT_EQ(dec.Push(0xFF), "\xEF\xBF\xBD");  // can never start a character
  EXPECT_EQ(dec.Push(0x80), "\xEF\xBF\xBD");  // stray continuation
  EXPECT_EQ(dec.Push(0xE2), "");
  EXPECT_EQ(dec.Push('x'), "\xEF\xBF\xBDx");  // broken by an ASCII byte
  EXPECT_EQ(dec.Push(0xED), "");
  EXPECT_EQ(dec.Push(0xA0), "\xEF\xBF\xBD\xEF\xBF\xBD");  // surrogate: invalid at once
  EXPECT_EQ(dec.Push(0xF0), "");
  EXPECT_EQ(dec.Push(0x9F), "");
  EXPECT_EQ(dec.Flush(), "\xEF\xBF\xBD");  // truncated at end of stream
  EXPECT_EQ(dec.pending_bytes(), 0u);
}

TEST(IncrementalDecoder, CanSkipSpecialTokens) {
  auto tok = BuiltIn();
  ASSERT_NE(tok, nullptr);
  IncrementalDecoder dec(*tok, {.skip_special_tokens = true});
  std::string out;
  for (int32_t id : std::vector<int32_t>{'o', 'k', 258, 256}) out += dec.Push(id);
  EXPECT_EQ(out + dec.Flush(), "ok");
}

}  // namespace
}  // namespace joule::tokenizer
