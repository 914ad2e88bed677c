#include "worker/engine/sampler.h"

#include <cmath>
#include <map>

#include "gtest/gtest.h"

namespace joule {
namespace {

std::vector<float> Logits() { return {1.0f, 3.0f, 2.0f, 0.5f, 3.0f - 1e-3f}; }

TEST(SamplerTest, GreedyPicksFirstMaximum) {
  std::vector<float> l = {1.0f, 5.0f, 5.0f, 2.0f};
  SamplingParams p;
  p.temperature = 0.0f;
  SamplerRng rng(1);
  std::vector<std::pair<float, int32_t>> scratch;
  EXPECT_EQ(SampleToken(l.data(), 4, p, &rng, &scratch), 1);
  p.temperature = 1.0f;
  p.top_k = 1;  // top_k 1 is greedy too
  EXPECT_EQ(SampleToken(l.data(), 4, p, &rng, &scratch), 1);
}

TEST(SamplerTest, SameSeedSameTokens) {
  auto l = Logits();
  SamplingParams p;
  std::vector<std::pair<float, int32_t>> scratch;
  SamplerRng a(42), b(42), c(43);
  std::vector<int32_t> sa, sb, sc;
  for (int i = 0; i < 64; ++i) {
    sa.push_back(SampleToken(l.data(), l.size(), p, &a, &scratch));
    sb.push_back(SampleToken(l.data(), l.size(), p, &b, &scratch));
    sc.push_back(SampleToken(l.data(), l.size(), p, &c, &scratch));
  }
  EXPECT_EQ(sa, sb);
  EXPECT_NE(sa, sc);
}

TEST(SamplerTest, FrequenciesFollowSoftmaxWithTemperature) {
  auto l = Logits();
  SamplingParams p;
  p.temperature = 2.0f;
  std::vector<double> prob(l.size());
  double z = 0;
  for (size_t i = 0; i < l.size(); ++i) z += prob[i] = std::exp(l[i] / 2.0);
  SamplerRng rng(7);
  std::vector<std::pair<float, int32_t>> scratch;
  std::map<int32_t, int> count;
  const int n = 40000;
  for (int i = 0; i < n; ++i) ++count[SampleToken(l.data(), l.size(), p, &rng, &scratch)];
  for (size_t i = 0; i < l.size(); ++i) {
    const double expected = prob[i] / z;
    const double sigma = std::sqrt(expected * (1 - expected) / n);
    EXPECT_NEAR(count[i] / double(n), expected, 5 * sigma) << "token " << i;
  }
}

TEST(SamplerTest, TopKAndTopPRestrictTheCandidates) {
  auto l = Logits();  // order by logit: 1, 4, 2, 0, 3
  std::vector<std::pair<float, int32_t>> scratch;
  SamplerRng rng(9);
  SamplingParams k2;
  k2.top_k = 2;
  for (int i = 0; i < 2000; ++i) {
    int32_t t = SampleToken(l.data(), l.size(), k2, &rng, &scratch);
    EXPECT_TRUE(t == 1 || t == 4) << t;
  }
  // Tokens 1 and 4 carry ~0.77 of the mass (0.39 each); top_p 0.6 keeps exactly those two.
  SamplingParams p06;
  p06.top_p = 0.6f;
  std::map<int32_t, int> seen;
  for (int i = 0; i < 2000; ++i) ++seen[SampleToken(l.data(), l.size(), p06, &rng, &scratch)];
  EXPECT_EQ(seen.size(), 2u);
  EXPECT_GT(seen[1], 0);
  EXPECT_GT(seen[4], 0);
}

TEST(SamplerTest, ValidateNamesTheField) {
  SamplingParams p;
  p.top_p = 0.0f;
  EXPECT_NE(std::string(p.Validate().message()).find("top_p"), std::string::npos);
  p = {};
  p.temperature = -1;
  EXPECT_NE(std::string(p.Validate().message()).find("temperature"), std::string::npos);
  p = {};
  p.max_tokens = 0;
  EXPECT_NE(std::string(p.Validate().message()).find("max_tokens"), std::string::npos);
  p = {};
  p.top_k = -2;
  EXPECT_NE(std::string(p.Validate().message()).find("top_k"), std::string::npos);
  EXPECT_TRUE(SamplingParams{}.Validate().ok());
}

}  // namespace
}  // namespace joule
