// Encode throughput (MB/s) of the real Qwen3 and DeepSeek-V3 tokenizers on a
// few hundred KB of mixed text (the fixture corpus: multilingual, code,
// emoji, whitespace runs), cold (empty word cache) and warm, against the
// built-in byte-level tokenizer (no regex, no merges) in the same run.
// Times are CPU seconds of the encoding thread.
// ctest -L bench -R tokenizer_bench --output-on-failure -V
#include <time.h>

#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "coordinator/tokenizer/tokenizer.h"
#include "gtest/gtest.h"
#include "tests/coordinator/tokenizer/hf_fixtures.h"

namespace joule::tokenizer {
namespace {

// CPU time of this thread: the machines these run on are shared, and wall
// time would count other processes' turns on the core.
double ThreadSeconds() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

double EncodeSeconds(const Tokenizer& tok, const std::vector<std::string>& docs, size_t* tokens) {
  const double start = ThreadSeconds();
  *tokens = 0;
  for (const std::string& doc : docs) {
    auto ids = tok.Encode(doc);
    EXPECT_TRUE(ids.ok()) << ids.status();
    if (ids.ok()) *tokens += ids->size();
  }
  return ThreadSeconds() - start;
}

TEST(TokenizerBench, EncodeThroughput) {
  const std::vector<std::string> texts = testing::FixtureTexts();
  std::vector<std::string> docs;
  size_t bytes = 0;
  for (uint32_t i = 0; bytes < 400 * 1024; ++i) {
    docs.push_back(testing::MakeCorpusChunk(texts, i));
    bytes += docs.back().size();
  }
  const double mb = bytes / 1e6;
  auto builtin = ParseTokenizerJson(MakeByteLevelTokenizerJson(), "built-in");
  ASSERT_TRUE(builtin.ok());
  size_t tokens = 0;
  const double base = EncodeSeconds(**builtin, docs, &tokens);
  std::printf("corpus: %zu documents, %.2f MB\n", docs.size(), mb);
  std::printf("%-12s %-5s %9s %10s %9s\n", "tokenizer", "cache", "MB/s", "tokens", "x builtin");
  std::printf("%-12s %-5s %9.1f %10zu %9.2f\n", "built-in", "-", mb / base, tokens, 1.0);
  for (const char* model : {"qwen3", "deepseek_v3"}) {
    const double load_start = ThreadSeconds();
    auto tok = LoadTokenizer(std::string(JOULE_HF_TOKENIZERS_DIR) + "/" + model);
    ASSERT_TRUE(tok.ok()) << tok.status();
    const double load = ThreadSeconds() - load_start;
    double cold = EncodeSeconds(**tok, docs, &tokens);
    std::printf("%-12s %-5s %9.1f %10zu %9.3f   (load %.2f s)\n", model, "cold", mb / cold, tokens,
                base / cold, load);
    double warm = EncodeSeconds(**tok, docs, &tokens);
    std::printf("%-12s %-5s %9.1f %10zu %9.3f\n", model, "warm", mb / warm, tokens, base / warm);
  }
}

}  // namespace
}  // namespace joule::tokenizer
