#include "worker/engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <map>
#include <random>
#include <string>

#include "gmock/gmock.h"
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

// --- Penalties, logit_bias and logprobs -------------------------------------

using ::testing::HasSubstr;

// Fixture of tests/reference/sampler_reference.py (vLLM's arithmetic in
// PyTorch, float32): the same logits, prompt and output.
const std::vector<float> kLogits = {1.5f, -0.5f, 3.0f, 0.0f, -2.0f, 0.75f, 2.25f, -1.25f, 0.25f, 2.25f};
const std::vector<int32_t> kPrompt = {0, 1, 1, 5, 9};
const std::vector<int32_t> kOutput = {2, 2, 4, 2, 6};

struct ReferenceCase {
  std::string name;
  SamplingParams params;
  std::vector<float> processed;  // after bias and penalties
  std::vector<float> logprobs;   // log_softmax(processed / T)
};

std::vector<ReferenceCase> ReferenceCases() {
  SamplingParams all;
  all.presence_penalty = 0.5f;
  all.frequency_penalty = 0.3f;
  all.repetition_penalty = 1.3f;
  all.logit_bias = {{1, 2.5f}, {7, -1.0f}};  // token 1 is in the prompt: the order matters
  all.temperature = 0.7f;
  SamplingParams repetition;
  repetition.repetition_penalty = 2.0f;
  SamplingParams negative;
  negative.presence_penalty = -0.75f;
  negative.frequency_penalty = -1.5f;
  negative.logit_bias = {{8, 100.0f}};
  negative.temperature = 0.0f;
  return {
      {"all", all,
       {1.15384614f, 1.53846157f, 0.907692194f, 0.0f, -3.39999986f, 0.576923072f, 0.930769205f,
        -2.25f, 0.25f, 1.73076928f},
       {-1.99579668f, -1.44634604f, -2.34744525f, -3.64414835f, -8.50129128f, -2.81997252f,
        -2.31447792f, -6.8584342f, -3.28700542f, -1.17162085f}},
      {"repetition_only", repetition,
       {0.75f, -1.0f, 1.5f, 0.0f, -4.0f, 0.375f, 1.125f, -1.25f, 0.25f, 1.125f},
       {-2.0932126f, -3.8432126f, -1.3432126f, -2.8432126f, -6.8432126f, -2.4682126f, -1.7182126f,
        -4.0932126f, -2.5932126f, -1.7182126f}},
      {"negative_penalties", negative,
       {1.5f, -0.5f, 8.25f, 0.0f, 0.25f, 0.75f, 4.5f, -1.25f, 100.25f, 2.25f},
       {-98.75f, -100.75f, -92.0f, -100.25f, -100.0f, -99.5f, -95.75f, -101.5f, 0.0f, -98.0f}},
  };
}

TokenHistory History(const std::vector<int32_t>& prompt, const std::vector<int32_t>& output) {
  TokenHistory h;
  h.AddPrompt(prompt);
  for (int32_t t : output) h.AddGenerated(t);
  return h;
}

TEST(SamplerPenaltiesTest, MatchVllmsArithmeticOnAFixture) {
  const TokenHistory history = History(kPrompt, kOutput);
  for (const ReferenceCase& c : ReferenceCases()) {
    SCOPED_TRACE(c.name);
    std::vector<float> l = kLogits;
    ProcessLogits(l.data(), l.size(), c.params, history);
    for (size_t i = 0; i < l.size(); ++i) EXPECT_FLOAT_EQ(l[i], c.processed[i]) << "token " << i;
    std::vector<std::pair<float, int32_t>> scratch;
    for (int32_t t = 0; t < static_cast<int32_t>(l.size()); ++t) {
      const TokenLogprob lp = ComputeLogprob(l.data(), l.size(), c.params.temperature, t, 0, &scratch);
      EXPECT_EQ(lp.token, t);
      EXPECT_NEAR(lp.logprob, c.logprobs[t], 2e-6f * (1.0f + std::abs(c.logprobs[t]))) << "token " << t;
      EXPECT_TRUE(lp.top.empty());
    }
  }
}

// The same definitions written out once more, in double precision, over
// random logits, histories and parameters.
std::vector<double> ReferencePenalties(const std::vector<float>& logits, const SamplingParams& p,
                                       const std::vector<int32_t>& prompt,
                                       const std::vector<int32_t>& output) {
  std::vector<double> out(logits.begin(), logits.end());
  for (const auto& [token, bias] : p.logit_bias) out[token] += bias;
  for (size_t v = 0; v < out.size(); ++v) {
    const int count = static_cast<int>(std::count(output.begin(), output.end(), v));
    const bool in_prompt = std::find(prompt.begin(), prompt.end(), v) != prompt.end();
    if (in_prompt || count > 0) out[v] = out[v] > 0 ? out[v] / p.repetition_penalty : out[v] * p.repetition_penalty;
    out[v] -= count * p.frequency_penalty + (count > 0 ? p.presence_penalty : 0.0);
  }
  return out;
}

TEST(SamplerPenaltiesTest, MatchADoublePrecisionReferenceOnRandomInputs) {
  std::mt19937 gen(20240611);
  std::uniform_real_distribution<float> logit(-8.0f, 8.0f), penalty(-2.0f, 2.0f), rep(0.25f, 3.0f);
  std::uniform_int_distribution<int32_t> token(0, 63);
  for (int trial = 0; trial < 200; ++trial) {
    std::vector<float> l(64);
    for (float& x : l) x = logit(gen);
    std::vector<int32_t> prompt(1 + trial % 20), output(trial % 30);
    for (int32_t& t : prompt) t = token(gen);
    for (int32_t& t : output) t = token(gen) % 16;  // repeats
    SamplingParams p;
    p.presence_penalty = penalty(gen);
    p.frequency_penalty = penalty(gen);
    p.repetition_penalty = trial % 3 == 0 ? 1.0f : rep(gen);
    for (int b = 0; b < trial % 4; ++b) p.logit_bias[token(gen)] = 25.0f * penalty(gen);
    const std::vector<double> want = ReferencePenalties(l, p, prompt, output);
    ProcessLogits(l.data(), l.size(), p, History(prompt, output));
    for (size_t v = 0; v < l.size(); ++v) {
      ASSERT_NEAR(l[v], want[v], 1e-5 * (1 + std::abs(want[v]))) << "trial " << trial << " token " << v;
    }
  }
}

TEST(SamplerLogprobsTest, EqualLogSoftmaxAndListTheMostLikelyFirst) {
  std::mt19937 gen(7);
  std::uniform_real_distribution<float> logit(-10.0f, 10.0f);
  std::vector<float> l(300);
  for (float& x : l) x = logit(gen);
  std::vector<std::pair<float, int32_t>> scratch;
  for (float t : {0.0f, 0.5f, 1.0f, 1.7f}) {
    const double scale = t > 0 ? t : 1.0;
    double z = 0;
    for (float x : l) z += std::exp(x / scale);
    auto want = [&](int32_t v) { return l[v] / scale - std::log(z); };
    const TokenLogprob lp = ComputeLogprob(l.data(), l.size(), t, 123, 5, &scratch);
    EXPECT_NEAR(lp.logprob, want(123), 1e-5) << "temperature " << t;
    std::vector<int32_t> order(l.size());
    for (size_t v = 0; v < l.size(); ++v) order[v] = static_cast<int32_t>(v);
    std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return l[a] > l[b]; });
    ASSERT_EQ(lp.top.size(), 5u);
    for (size_t k = 0; k < 5; ++k) {
      EXPECT_EQ(lp.top[k].token, order[k]) << "rank " << k;
      EXPECT_NEAR(lp.top[k].logprob, want(order[k]), 1e-5) << "rank " << k;
    }
  }
}

TEST(SamplerLogprobsTest, TiesListTheLowerTokenIdFirstAndTopIsBoundedByTheVocabulary) {
  // Tokens 6 and 9 tie after the repetition penalty (torch.topk lists them
  // either way; we list the lower id first).
  const ReferenceCase c = ReferenceCases()[1];
  std::vector<std::pair<float, int32_t>> scratch;
  const TokenLogprob lp = ComputeLogprob(c.processed.data(), c.processed.size(), 1.0f, 4, 4, &scratch);
  std::vector<int32_t> ids;
  for (const TopLogprob& t : lp.top) ids.push_back(t.token);
  EXPECT_EQ(ids, (std::vector<int32_t>{2, 6, 9, 0}));
  EXPECT_EQ(lp.top[1].logprob, lp.top[2].logprob);
  EXPECT_NEAR(lp.logprob, c.logprobs[4], 1e-5f);
  const TokenLogprob all = ComputeLogprob(c.processed.data(), 3, 1.0f, 0, kMaxTopLogprobs, &scratch);
  EXPECT_EQ(all.top.size(), 3u);
}

TEST(SamplerPenaltiesTest, HostSamplingAsksForNothingTheDeviceCannotDoUnlessNeeded) {
  SamplingParams p;
  EXPECT_TRUE(SamplesOnDevice(p, 100));
  for (auto set : std::vector<std::function<void(SamplingParams&)>>{
           [](SamplingParams& s) { s.presence_penalty = 0.1f; },
           [](SamplingParams& s) { s.frequency_penalty = -0.1f; },
           [](SamplingParams& s) { s.repetition_penalty = 1.1f; },
           [](SamplingParams& s) { s.logit_bias[3] = 1.0f; },
           [](SamplingParams& s) { s.logprobs = true; },
           [](SamplingParams& s) { s.prompt_logprobs = true; }}) {
    SamplingParams q;
    set(q);
    EXPECT_FALSE(SamplesOnDevice(q, 100));
    q.temperature = 0.0f;
    EXPECT_FALSE(SamplesOnDevice(q, 100));
  }
}

TEST(SamplerLogprobsTest, AskingForLogprobsDoesNotChangeTheSampledTokens) {
  // Host sampling for a logprobs request runs the device's arithmetic, so the
  // same seed gives the same tokens with or without logprobs.
  auto l = Logits();
  SamplingParams plain, with;
  with.logprobs = true;
  with.top_logprobs = 3;
  std::vector<std::pair<float, int32_t>> scratch;
  SamplerRng a(5), b(5);
  for (int i = 0; i < 200; ++i) {
    ASSERT_EQ(SampleToken(l.data(), l.size(), plain, &a, &scratch),
              SampleToken(l.data(), l.size(), with, &b, &scratch));
  }
}

TEST(SamplerPenaltiesTest, ValidateNamesTheFieldAndTheBadValue) {
  auto message = [](SamplingParams p, int64_t vocab = 0) {
    return std::string(p.Validate(vocab).message());
  };
  SamplingParams p;
  p.presence_penalty = 2.5f;
  EXPECT_THAT(message(p), HasSubstr("presence_penalty: must be in [-2, 2], got 2.5"));
  p = {};
  p.frequency_penalty = std::nanf("");
  EXPECT_THAT(message(p), HasSubstr("frequency_penalty"));
  p = {};
  p.repetition_penalty = 0.0f;
  EXPECT_THAT(message(p), HasSubstr("repetition_penalty: must be > 0"));
  p = {};
  p.logit_bias[151936] = 1.0f;
  EXPECT_TRUE(p.Validate().ok()) << "no vocabulary known: only the sign is checked";
  EXPECT_TRUE(p.Validate(151937).ok());
  EXPECT_EQ(message(p, 151936), "logit_bias: token id 151936 is out of range [0, 151936)");
  p.logit_bias = {{-1, 1.0f}};
  EXPECT_THAT(message(p), HasSubstr("logit_bias: token id -1"));
  p.logit_bias = {{5, 100.5f}};
  EXPECT_THAT(message(p), HasSubstr("logit_bias: bias 100.5 for token id 5 must be in [-100, 100]"));
  p.logit_bias = {{5, -100.0f}, {6, 100.0f}};
  EXPECT_TRUE(p.Validate(10).ok());
  p = {};
  p.logprobs = true;
  p.top_logprobs = kMaxTopLogprobs + 1;
  EXPECT_THAT(message(p), HasSubstr("top_logprobs: must be in [0, 20], got 21"));
  p.top_logprobs = kMaxTopLogprobs;
  EXPECT_TRUE(p.Validate().ok());
  p.logprobs = false;
  EXPECT_THAT(message(p), HasSubstr("top_logprobs: needs logprobs"));
  p.prompt_logprobs = true;
  EXPECT_TRUE(p.Validate().ok());
}

}  // namespace
}  // namespace joule
