// The reader against the real Qwen3 and DeepSeek-V3 tokenizer.json files: ids
// must equal those of the reference implementation (tests/data/tokenizer/
// *_fixtures.json, made by tests/reference/tokenizer_fixtures.mjs).
#include <algorithm>
#include <chrono>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "coordinator/tokenizer/chat_template.h"
#include "coordinator/tokenizer/tokenizer.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/coordinator/tokenizer/hf_fixtures.h"

namespace joule::tokenizer {
namespace {

using testing::DataDir;
using ::testing::HasSubstr;
using testing::ReadJson;
using testing::RealTokenizer;

bool IsValidUtf8(std::string_view s) {
  std::string out;
  return AppendValidUtf8(s, /*final=*/false, &out) == 0 && out == s;
}

// Token pieces around the first difference, for a readable failure.
std::string Explain(const Tokenizer& tok, const std::vector<int32_t>& got,
                    const std::vector<int32_t>& want) {
  size_t i = 0;
  while (i < got.size() && i < want.size() && got[i] == want[i]) ++i;
  std::string out = absl::StrCat("first difference at token ", i, ":");
  for (const auto* ids : {&got, &want}) {
    out += ids == &got ? "\n  got: " : "\n  want:";
    for (size_t k = i >= 2 ? i - 2 : 0; k < std::min(ids->size(), i + 4); ++k) {
      absl::StrAppend(&out, " ", (*ids)[k], "=",
                      nlohmann::json(tok.TokenBytes((*ids)[k]))
                          .dump(-1, ' ', false, nlohmann::json::error_handler_t::replace));
    }
  }
  return out;
}

class RealTokenizerTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    tok_ = RealTokenizer(GetParam());
    ASSERT_NE(tok_, nullptr);
    fixtures_ = ReadJson(DataDir() + "/" + GetParam() + "_fixtures.json");
    ASSERT_GT(fixtures_["cases"].size(), 40u);
  }
  const Tokenizer* tok_ = nullptr;
  nlohmann::json fixtures_;
};

TEST_P(RealTokenizerTest, EncodesLikeTheReference) {
  for (const auto& c : fixtures_["cases"]) {
    const std::string text = c["text"];
    const std::vector<int32_t> want = c["ids"];
    auto ids = tok_->Encode(text);
    ASSERT_TRUE(ids.ok()) << ids.status();
    EXPECT_EQ(*ids, want) << nlohmann::json(text).dump() << "\n" << Explain(*tok_, *ids, want);
  }
}

TEST_P(RealTokenizerTest, DecodesTheReferenceIds) {
  for (const auto& c : fixtures_["cases"]) {
    const std::string text = c["text"];
    const std::vector<int32_t> ids = c["ids"];
    // The reference's decoding; it differs from the text only where the
    // normalizer changed it (Qwen's NFC composes "e" + U+0301 into "é").
    EXPECT_EQ(tok_->Decode(ids), c["decoded"].get<std::string>()) << nlohmann::json(text).dump();
    // Round trip through our own encoder.
    auto again = tok_->Encode(tok_->Decode(ids));
    ASSERT_TRUE(again.ok()) << again.status();
    EXPECT_EQ(*again, ids) << nlohmann::json(text).dump();
  }
}

// Streaming: fed the ids one by one, the decoder never lets out part of a
// character, and the pieces add up to the full decoding.
TEST_P(RealTokenizerTest, IncrementalDecoderNeverSplitsACharacter) {
  int split_characters = 0;  // tokens that ended inside a character
  for (const auto& c : fixtures_["cases"]) {
    const std::vector<int32_t> ids = c["ids"];
    IncrementalDecoder dec(*tok_);
    std::string all;
    for (int32_t id : ids) {
      std::string piece = dec.Push(id);
      EXPECT_TRUE(IsValidUtf8(piece)) << "partial UTF-8 after id " << id;
      if (dec.pending_bytes() > 0) ++split_characters;
      all += piece;
    }
    all += dec.Flush();
    EXPECT_EQ(all, tok_->Decode(ids)) << nlohmann::json(c["text"]).dump();
  }
  // The texts include CJK and emoji that these vocabularies split mid-character,
  // so holding back is exercised, not just trivially passed.
  EXPECT_GT(split_characters, 10);
}

TEST_P(RealTokenizerTest, CorpusMatchesTheReference) {
  const std::vector<std::string> texts = testing::FixtureTexts();
  const auto& corpus = fixtures_["corpus"];
  ASSERT_EQ(corpus.size(), 200u);
  for (uint32_t i = 0; i < corpus.size(); ++i) {
    std::string chunk = testing::MakeCorpusChunk(texts, i);
    auto ids = tok_->Encode(chunk);
    ASSERT_TRUE(ids.ok()) << ids.status();
    EXPECT_EQ(ids->size(), corpus[i]["count"].get<size_t>()) << "corpus chunk " << i;
    EXPECT_EQ(testing::Fnv1a(*ids), corpus[i]["fnv1a"].get<uint32_t>())
        << "corpus chunk " << i << ": " << nlohmann::json(chunk).dump();
  }
}

TEST_P(RealTokenizerTest, LongRunsStayFastAndBadUtf8IsRefused) {
  // Quadratic work in the regex or in BPE would take minutes here.
  const std::vector<std::string> inputs = {std::string(1 << 20, ' '), std::string(1 << 18, 'a'),
                                           std::string(1 << 18, '\n'),
                                           absl::StrCat("x", std::string(1 << 19, ' '), "y")};
  for (const std::string& text : inputs) {
    auto start = std::chrono::steady_clock::now();
    auto ids = tok_->Encode(text);
    double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    ASSERT_TRUE(ids.ok()) << ids.status();
    EXPECT_LT(ids->size(), text.size() / 4);  // merged, not byte by byte
    EXPECT_EQ(tok_->Decode(*ids), text);
    EXPECT_LT(seconds, 20.0) << text.size() << " bytes took " << seconds << " s";
  }
  auto bad = tok_->Encode("ok \xC3\x28 bad");
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad.status().message(), HasSubstr("not valid UTF-8 (byte offset 3)"));
}

INSTANTIATE_TEST_SUITE_P(Models, RealTokenizerTest, ::testing::Values("qwen3", "deepseek_v3"));

TEST(Qwen3Tokenizer, ChatMarkersAreSingleSpecialTokens) {
  const Tokenizer* tok = RealTokenizer("qwen3");
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(tok->vocab_size(), 151669);  // 151643 BPE tokens + 26 added
  auto im_start = tok->TokenId("<|im_start|>");
  auto im_end = tok->TokenId("<|im_end|>");
  auto tool_call = tok->TokenId("<tool_call>");
  ASSERT_TRUE(im_start && im_end && tool_call);
  EXPECT_TRUE(tok->IsSpecial(*im_start));
  EXPECT_TRUE(tok->IsSpecial(*im_end));
  EXPECT_FALSE(tok->IsSpecial(*tool_call));  // added, but not special
  auto ids = tok->Encode("<|im_start|>user\nhi<|im_end|>");
  ASSERT_TRUE(ids.ok());
  ASSERT_GE(ids->size(), 3u);
  EXPECT_EQ(ids->front(), *im_start);
  EXPECT_EQ(ids->back(), *im_end);
  IncrementalDecoder dec(*tok, {.skip_special_tokens = true});
  std::string text;
  for (int32_t id : *ids) text += dec.Push(id);
  EXPECT_EQ(text + dec.Flush(), "user\nhi");
}

// /v1/completions encodes with the special tokens: none for Qwen3 (its tokenizer_config.json
// has add_bos_token false), DeepSeek-V3's BOS for DeepSeek-V3 (LlamaTokenizerFast with
// add_bos_token; its tokenizer.json post_processor alone adds nothing).
TEST(Qwen3Tokenizer, CompletionPromptGetsNoSpecialTokens) {
  const Tokenizer* tok = RealTokenizer("qwen3");
  ASSERT_NE(tok, nullptr);
  auto plain = tok->Encode("Hello, world!");
  auto special = tok->EncodeWithSpecialTokens("Hello, world!");
  ASSERT_TRUE(plain.ok() && special.ok());
  EXPECT_EQ(*special, *plain);
}

TEST(DeepSeekV3Tokenizer, CompletionPromptGetsTheBosOnce) {
  const Tokenizer* tok = RealTokenizer("deepseek_v3");
  ASSERT_NE(tok, nullptr);
  auto ids = tok->EncodeWithSpecialTokens("Hello, world!");
  ASSERT_TRUE(ids.ok()) << ids.status();
  EXPECT_EQ(*ids, (std::vector<int32_t>{0, 19923, 14, 2058, 3}));  // the fixture's ids after BOS 0
}

// The chat template's markers are single tokens of the real vocabulary, and the
// rendered conversation encodes with its one BOS.
TEST(DeepSeekV3Tokenizer, ChatPromptHasOneBosAndSingleTokenMarkers) {
  const Tokenizer* tok = RealTokenizer("deepseek_v3");
  ASSERT_NE(tok, nullptr);
  ASSERT_TRUE(CheckChatTokens(ChatFormat::kDeepseekV3, *tok).ok());
  EXPECT_EQ(tok->TokenId("<｜User｜>"), 128803);
  EXPECT_EQ(tok->TokenId("<｜Assistant｜>"), 128804);
  auto text = RenderChat(ChatFormat::kDeepseekV3,
                         {{"system", "Be brief."}, {"user", "Hi"}, {"assistant", "Hello"}, {"user", "Bye"}},
                         /*add_generation_prompt=*/true);
  ASSERT_TRUE(text.ok()) << text.status();
  auto ids = tok->Encode(*text);
  ASSERT_TRUE(ids.ok()) << ids.status();
  ASSERT_GE(ids->size(), 8u);
  EXPECT_EQ(ids->front(), 0);
  EXPECT_EQ(std::count(ids->begin(), ids->end(), 0), 1);
  EXPECT_EQ(ids->back(), 128804);
  EXPECT_EQ(std::count(ids->begin(), ids->end(), 128803), 2);
  EXPECT_EQ(std::count(ids->begin(), ids->end(), 1), 1);  // the assistant turn's end
  EXPECT_EQ(tok->Decode(*ids), *text);
  EXPECT_EQ(ChatStopTokenIds(ChatFormat::kDeepseekV3, *tok), (std::vector<int32_t>{1}));
}

TEST(DeepSeekV3Tokenizer, SentenceMarkersAreSpecialTokens) {
  const Tokenizer* tok = RealTokenizer("deepseek_v3");
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(tok->TokenId("<｜begin▁of▁sentence｜>"), 0);
  EXPECT_EQ(tok->TokenId("<｜end▁of▁sentence｜>"), 1);
  EXPECT_TRUE(tok->IsSpecial(0));
  EXPECT_EQ(tok->Decode({0}), "<｜begin▁of▁sentence｜>");
}

}  // namespace
}  // namespace joule::tokenizer
