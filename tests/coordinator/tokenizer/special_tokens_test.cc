// EncodeWithSpecialTokens: the special tokens Hugging Face's tokenizer(text) adds,
// from tokenizer.json's post_processor or, for LlamaTokenizerFast (DeepSeek-V3),
// from tokenizer_config.json's add_bos_token / add_eos_token.
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "coordinator/tokenizer/tokenizer.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace joule::tokenizer {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using Json = nlohmann::json;

constexpr int32_t kBos = 256;  // <｜begin▁of▁sentence｜> of the built-in DeepSeek-V3 tokenizer
constexpr int32_t kEos = 258;  // <｜end▁of▁sentence｜>

// Llama 3's post_processor: ByteLevel, then a template with the BOS (here <|endoftext|>).
const Json kLlama3PostProcessor = Json::parse(R"({"type": "Sequence", "processors": [
    {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
    {"type": "TemplateProcessing",
     "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}}],
     "pair": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
              {"SpecialToken": {"id": "<|endoftext|>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
     "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [256], "tokens": ["<|endoftext|>"]}}}]})");

Json WithPostProcessor(const Json& post_processor) {
  Json j = Json::parse(MakeByteLevelTokenizerJson());
  j["post_processor"] = post_processor;
  return j;
}

std::vector<int32_t> EncodeSpecial(const Tokenizer& tok, std::string_view text) {
  auto ids = tok.EncodeWithSpecialTokens(text);
  EXPECT_TRUE(ids.ok()) << ids.status();
  return ids.ok() ? *ids : std::vector<int32_t>{};
}

std::string ParseError(const Json& tokenizer_json, const std::string& config = "") {
  auto tok = config.empty() ? ParseTokenizerJson(tokenizer_json.dump(), "m/tokenizer.json")
                            : ParseTokenizerJson(tokenizer_json.dump(), "m/tokenizer.json", config,
                                                 "m/tokenizer_config.json");
  EXPECT_FALSE(tok.ok());
  EXPECT_EQ(tok.status().code(), absl::StatusCode::kInvalidArgument);
  return std::string(tok.status().message());
}

TEST(PostProcessor, ByteLevelAddsNothing) {
  auto tok = ParseTokenizerJson(MakeByteLevelTokenizerJson(), "built-in");
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_THAT(EncodeSpecial(**tok, "hi"), ElementsAre('h', 'i'));
  EXPECT_TRUE(EncodeSpecial(**tok, "").empty());
  auto null = ParseTokenizerJson(WithPostProcessor(nullptr).dump(), "null");
  ASSERT_TRUE(null.ok()) << null.status();
  EXPECT_THAT(EncodeSpecial(**null, "hi"), ElementsAre('h', 'i'));
}

TEST(PostProcessor, TemplateProcessingAddsItsTokensOnce) {
  auto tok = ParseTokenizerJson(WithPostProcessor(kLlama3PostProcessor).dump(), "llama3");
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_THAT(EncodeSpecial(**tok, "hi"), ElementsAre(256, 'h', 'i'));
  EXPECT_THAT(EncodeSpecial(**tok, ""), ElementsAre(256));
  auto plain = (*tok)->Encode("hi");  // add_special_tokens=False
  ASSERT_TRUE(plain.ok());
  EXPECT_THAT(*plain, ElementsAre('h', 'i'));
  // A BOS written in the text is the text's: Hugging Face adds its own as well.
  EXPECT_THAT(EncodeSpecial(**tok, "<|endoftext|>hi"), ElementsAre(256, 256, 'h', 'i'));

  // After the text, and several ids per special token; a later processor wraps an earlier one.
  Json both = Json::parse(R"({"type": "Sequence", "processors": [
      {"type": "TemplateProcessing",
       "single": [{"SpecialToken": {"id": "S", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                  {"SpecialToken": {"id": "E", "type_id": 0}}],
       "special_tokens": {"S": {"id": "S", "ids": [257]}, "E": {"id": "E", "ids": [258, 256]}}},
      {"type": "TemplateProcessing",
       "single": [{"SpecialToken": {"id": "B", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
       "special_tokens": {"B": {"id": "B", "ids": [256]}}}]})");
  tok = ParseTokenizerJson(WithPostProcessor(both).dump(), "both");
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_THAT(EncodeSpecial(**tok, "x"), ElementsAre(256, 257, 'x', 258, 256));
}

TEST(PostProcessor, UnsupportedOrMalformedIsRefusedNamingTheField) {
  EXPECT_THAT(ParseError(WithPostProcessor({{"type", "RobertaProcessing"}})),
              HasSubstr("m/tokenizer.json: post_processor.type: \"RobertaProcessing\" is not supported"));
  Json j = kLlama3PostProcessor;
  j["processors"][1]["special_tokens"].erase("<|endoftext|>");
  EXPECT_THAT(ParseError(WithPostProcessor(j)),
              HasSubstr("post_processor.processors[1].special_tokens[\"<|endoftext|>\"]: missing"));
  j = kLlama3PostProcessor;
  j["processors"][1]["special_tokens"]["<|endoftext|>"]["ids"] = {300};
  EXPECT_THAT(ParseError(WithPostProcessor(j)),
              HasSubstr("special_tokens[\"<|endoftext|>\"].ids: id 300 is not in the vocabulary [0, 259)"));
  j = kLlama3PostProcessor;
  j["processors"][1]["single"][1]["Sequence"]["id"] = "B";
  EXPECT_THAT(ParseError(WithPostProcessor(j)),
              HasSubstr("post_processor.processors[1].single[1]: expected the text, sequence \"A\""));
  j = kLlama3PostProcessor;
  j["processors"][1]["single"].erase(1);
  EXPECT_THAT(ParseError(WithPostProcessor(j)), HasSubstr("single: has no sequence \"A\""));
  j = kLlama3PostProcessor;
  j["processors"][1]["single"][0] = "<|endoftext|>";
  EXPECT_THAT(ParseError(WithPostProcessor(j)), HasSubstr("single[0]: expected {\"SpecialToken\""));
}

std::unique_ptr<Tokenizer> DeepseekV3(const std::string& config) {
  auto tok = ParseTokenizerJson(MakeDeepseekV3ByteLevelTokenizerJson(), "m/tokenizer.json", config,
                                "m/tokenizer_config.json");
  EXPECT_TRUE(tok.ok()) << tok.status();
  return tok.ok() ? std::move(tok).value() : nullptr;
}

TEST(TokenizerConfig, LlamaTokenizerFastAddsTheBos) {
  // The built-in DeepSeek-V3 files: tokenizer.json's ByteLevel post_processor adds
  // nothing; tokenizer_config.json's LlamaTokenizerFast adds the BOS.
  auto alone = ParseTokenizerJson(MakeDeepseekV3ByteLevelTokenizerJson(), "m/tokenizer.json");
  ASSERT_TRUE(alone.ok()) << alone.status();
  EXPECT_THAT(EncodeSpecial(**alone, "hi"), ElementsAre('h', 'i'));
  auto tok = DeepseekV3(MakeDeepseekV3TokenizerConfigJson(512));
  ASSERT_NE(tok, nullptr);
  EXPECT_THAT(EncodeSpecial(*tok, "hi"), ElementsAre(kBos, 'h', 'i'));
  EXPECT_THAT(*tok->Encode("hi"), ElementsAre('h', 'i'));

  // transformers' defaults: add_bos_token true, add_eos_token false.
  const Json llama = {{"tokenizer_class", "LlamaTokenizerFast"},
                      {"bos_token", {{"__type", "AddedToken"}, {"content", "<｜begin▁of▁sentence｜>"}}},
                      {"eos_token", "<｜end▁of▁sentence｜>"}};
  tok = DeepseekV3(llama.dump());
  EXPECT_THAT(EncodeSpecial(*tok, "x"), ElementsAre(kBos, 'x'));
  Json c = llama;
  c["add_bos_token"] = false;
  c["add_eos_token"] = true;
  tok = DeepseekV3(c.dump());
  EXPECT_THAT(EncodeSpecial(*tok, "x"), ElementsAre('x', kEos));
  // Other classes keep tokenizer.json's post_processor.
  c = llama;
  c["tokenizer_class"] = "PreTrainedTokenizerFast";
  tok = DeepseekV3(c.dump());
  EXPECT_THAT(EncodeSpecial(*tok, "x"), ElementsAre('x'));
}

TEST(TokenizerConfig, BadTokensAreRefusedNamingTheField) {
  const Json tokenizer_json = Json::parse(MakeDeepseekV3ByteLevelTokenizerJson());
  Json c = {{"tokenizer_class", "LlamaTokenizerFast"}, {"bos_token", "<s>"}};
  EXPECT_THAT(ParseError(tokenizer_json, c.dump()),
              HasSubstr("m/tokenizer_config.json: bos_token: \"<s>\" is not an added token of tokenizer.json"));
  c = {{"tokenizer_class", "LlamaTokenizerFast"}, {"bos_token", nullptr}};
  EXPECT_THAT(ParseError(tokenizer_json, c.dump()), HasSubstr("m/tokenizer_config.json: bos_token: expected a token"));
  c = {{"tokenizer_class", "LlamaTokenizerFast"}, {"add_bos_token", "yes"}};
  EXPECT_THAT(ParseError(tokenizer_json, c.dump()), HasSubstr("add_bos_token: expected true or false"));
  EXPECT_THAT(ParseError(tokenizer_json, "{oops"), HasSubstr("m/tokenizer_config.json: (document): not valid JSON"));
}

TEST(TokenizerConfig, LoadTokenizerReadsItBesideTokenizerJson) {
  const std::filesystem::path dir = std::filesystem::path(::testing::TempDir()) /
                                    ("joule_special_tokens_test_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  std::ofstream(dir / "tokenizer.json", std::ios::binary) << MakeDeepseekV3ByteLevelTokenizerJson();
  auto without = LoadTokenizer(dir.string());
  std::ofstream(dir / "tokenizer_config.json", std::ios::binary) << MakeDeepseekV3TokenizerConfigJson(512);
  auto with = LoadTokenizer(dir.string());
  std::ofstream(dir / "tokenizer_config.json", std::ios::binary) << "[]";
  auto bad = LoadTokenizer(dir.string());
  std::filesystem::remove_all(dir);
  ASSERT_TRUE(without.ok()) << without.status();
  ASSERT_TRUE(with.ok()) << with.status();
  EXPECT_THAT(EncodeSpecial(**without, "a"), ElementsAre('a'));
  EXPECT_THAT(EncodeSpecial(**with, "a"), ElementsAre(kBos, 'a'));
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(bad.status().message(), HasSubstr("tokenizer_config.json: (document): expected a JSON object"));
}

TEST(DeepseekV3TokenizerJson, HasDeepseekV3SpecialTokens) {
  auto tok = ParseTokenizerJson(MakeDeepseekV3ByteLevelTokenizerJson(), "deepseek");
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->vocab_size(), 261);
  EXPECT_EQ((*tok)->TokenId("<｜begin▁of▁sentence｜>"), kBos);
  EXPECT_EQ((*tok)->TokenId("<｜▁pad▁｜>"), 257);
  EXPECT_EQ((*tok)->TokenId("<｜end▁of▁sentence｜>"), kEos);
  EXPECT_EQ((*tok)->TokenId("<｜User｜>"), 259);
  EXPECT_EQ((*tok)->TokenId("<｜Assistant｜>"), 260);
  for (int32_t id = 256; id <= 260; ++id) EXPECT_TRUE((*tok)->IsSpecial(id)) << id;
  EXPECT_EQ((*tok)->TokenId("<|im_end|>"), std::nullopt);
  const Json config = Json::parse(MakeDeepseekV3TokenizerConfigJson(512));
  EXPECT_EQ(config["tokenizer_class"], "LlamaTokenizerFast");
  EXPECT_EQ(config["add_bos_token"], true);
  EXPECT_EQ(config["bos_token"], "<｜begin▁of▁sentence｜>");
  EXPECT_EQ(config["model_max_length"], 512);
}

}  // namespace
}  // namespace joule::tokenizer
