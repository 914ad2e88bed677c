// Shared by the tests that use the real Hugging Face tokenizers: loading the
// unpacked tokenizer.json files and the fixtures of tests/data/tokenizer/.
#pragma once

#include <cstdint>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "coordinator/tokenizer/tokenizer.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/testing/paths.h"

namespace joule::tokenizer::testing {

inline std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

inline nlohmann::json ReadJson(const std::string& path) {
  return nlohmann::json::parse(ReadFile(path));
}

inline std::string DataDir() { return joule::testing::SourceDir() + "/tests/data/tokenizer"; }

#ifdef JOULE_HF_TOKENIZERS_DIR
// The tokenizer of `model` ("qwen3", "deepseek_v3"), loaded once per process.
inline const Tokenizer* RealTokenizer(const std::string& model) {
  static std::map<std::string, std::unique_ptr<Tokenizer>>* loaded =
      new std::map<std::string, std::unique_ptr<Tokenizer>>();
  auto it = loaded->find(model);
  if (it == loaded->end()) {
    auto tok = LoadTokenizer(std::string(JOULE_HF_TOKENIZERS_DIR) + "/" + model);
    EXPECT_TRUE(tok.ok()) << tok.status();
    if (!tok.ok()) return nullptr;
    it = loaded->emplace(model, std::move(tok).value()).first;
  }
  return it->second.get();
}
#endif

// The texts of texts.json.
inline std::vector<std::string> FixtureTexts() {
  return ReadJson(DataDir() + "/texts.json")["texts"].get<std::vector<std::string>>();
}

// Chunk `index` of the pseudo-random corpus; the same generator as
// makeCorpusChunk in tests/reference/tokenizer_fixtures.mjs.
inline std::string MakeCorpusChunk(const std::vector<std::string>& texts, uint32_t index) {
  static const char* const kSeparators[] = {" ", "\n", "", "  ", "\t", ". "};
  uint32_t s = static_cast<uint32_t>(static_cast<uint64_t>(index) * 2654435761ull + 12345u);
  auto next = [&] {
    s = s * 1664525u + 1013904223u;
    return s >> 8;
  };
  uint32_t n = 1 + next() % 8;
  std::string out;
  for (uint32_t i = 0; i < n; ++i) {
    if (i > 0) out += kSeparators[next() % 6];
    out += texts[next() % texts.size()];
  }
  return out;
}

inline uint32_t Fnv1a(const std::vector<int32_t>& ids) {
  uint32_t h = 2166136261u;
  for (int32_t id : ids) {
    for (int k = 0; k < 4; ++k) {
      h ^= (static_cast<uint32_t>(id) >> (8 * k)) & 0xFF;
      h *= 16777619u;
    }
  }
  return h;
}

}  // namespace joule::tokenizer::testing
