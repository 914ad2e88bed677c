// Logprobs, prompt logprobs, penalties and logit_bias through the engine, as
// a user sees them: the numbers are the log-softmax of the model's logits
// (after the penalties, at the temperature), the prompt's come once, and
// neither preemption, a failed step, a resumed request nor the prefix cache
// changes a token or a logprob.
#include <algorithm>
#include <cmath>
#include <map>
#include <set>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/paths.h"
#include "tests/worker/model/golden_harness.h"
#include "worker/engine/engine.h"

namespace joule {
namespace {

using ::testing::HasSubstr;

std::vector<int32_t> Tokens(int len, int salt) {
  std::vector<int32_t> p;
  for (int i = 0; i < len; ++i) p.push_back((i * 37 + salt * 11 + 3) % 256);
  return p;
}

SamplingParams Greedy(int max_tokens) {
  SamplingParams s;
  s.temperature = 0.0f;
  s.max_tokens = max_tokens;
  s.ignore_eos = true;
  return s;
}

SamplingParams Seeded(uint64_t seed, int max_tokens) {
  SamplingParams s = Greedy(max_tokens);
  s.temperature = 0.8f;
  s.seed = seed;
  return s;
}

std::vector<double> LogSoftmax(const std::vector<double>& x) {
  const double max = *std::max_element(x.begin(), x.end());
  double total = 0;
  for (double v : x) total += std::exp(v - max);
  std::vector<double> out;
  for (double v : x) out.push_back(v - max - std::log(total));
  return out;
}

// What a request got: its tokens, their logprob entries, its prompt's entries
// (each report appended), and how many messages carried prompt entries.
struct Got {
  std::vector<int32_t> tokens;
  std::vector<TokenLogprob> logprobs;
  std::vector<TokenLogprob> prompt;
  int prompt_reports = 0;
  int cached_tokens = 0;
  int preemptions = 0;
  std::vector<std::vector<float>> raw;  // the model's logits per token (observer)
};

class LogprobsTest : public ::testing::Test {
 protected:
  void SetUp() override { model_ = Load("qwen3_moe-tiny"); }

  static std::unique_ptr<Model> Load(const std::string& name) {
    auto m = Model::Load(testing::TinyModelDir(name), {.num_threads = 2});
    EXPECT_TRUE(m.ok()) << m.status();
    return m.ok() ? std::move(*m) : nullptr;
  }
  std::unique_ptr<Engine> MakeEngine(EngineOptions opts = {}, Model* model = nullptr) {
    auto e = Engine::Create(model != nullptr ? model : model_.get(), opts);
    EXPECT_TRUE(e.ok()) << e.status();
    return e.ok() ? std::move(*e) : nullptr;
  }
  int64_t Vocab() const { return model_->config().vocab_size; }

  static void Record(const StepResult& r, std::map<uint64_t, Got>* out) {
    for (uint64_t id : r.preempted) ++(*out)[id].preemptions;
    for (const TokenOutput& t : r.tokens) {
      Got& g = (*out)[t.id];
      g.tokens.push_back(t.token);
      if (t.logprob.has_value()) g.logprobs.push_back(*t.logprob);
      if (!t.prompt_logprobs.empty()) ++g.prompt_reports;
      g.prompt.insert(g.prompt.end(), t.prompt_logprobs.begin(), t.prompt_logprobs.end());
      g.cached_tokens = t.cached_tokens;
    }
  }
  // Steps to the end; `before_step(i)` runs before step i. With `observe` the
  // model's logits of every sampled token are kept.
  static std::map<uint64_t, Got> Drain(Engine& e, bool observe = false,
                                       const std::function<void(int)>& before_step = nullptr,
                                       int* failed_steps = nullptr) {
    std::map<uint64_t, Got> out;
    if (observe) {
      e.set_logits_observer([&](uint64_t id, const float* row, int64_t vocab) {
        out[id].raw.emplace_back(row, row + vocab);
      });
    }
    for (int step = 0; e.HasWork() && step < 10000; ++step) {
      if (before_step) before_step(step);
      auto r = e.Step();
      if (!r.ok() && failed_steps != nullptr) {
        ++*failed_steps;
        continue;
      }
      EXPECT_TRUE(r.ok()) << r.status();
      if (!r.ok()) break;
      Record(*r, &out);
    }
    e.set_logits_observer(nullptr);
    return out;
  }

  std::unique_ptr<Model> model_;
};

void ExpectSameLogprobs(const std::vector<TokenLogprob>& a, const std::vector<TokenLogprob>& b,
                        const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].token, b[i].token) << what << " entry " << i;
    if (!(std::isnan(a[i].logprob) && std::isnan(b[i].logprob))) {
      EXPECT_EQ(a[i].logprob, b[i].logprob) << what << " entry " << i;  // bitwise
    }
    ASSERT_EQ(a[i].top.size(), b[i].top.size()) << what << " entry " << i;
    for (size_t k = 0; k < a[i].top.size(); ++k) {
      EXPECT_EQ(a[i].top[k].token, b[i].top[k].token) << what << " entry " << i;
      EXPECT_EQ(a[i].top[k].logprob, b[i].top[k].logprob) << what << " entry " << i;
    }
  }
}

// Greedy, plain temperature and top-p requests side by side: each token's
// logprob is log_softmax(logits / T) of the model's logits at that token, the
// alternatives are the most likely tokens in order, and asking for logprobs
// changes no token.
TEST_F(LogprobsTest, EachTokensLogprobIsTheLogSoftmaxOfTheModelsLogits) {
  std::vector<SamplingParams> params = {Greedy(10), Seeded(3, 10), Seeded(4, 10)};
  params[2].top_p = 0.9f;
  auto run = [&](bool logprobs) {
    auto e = MakeEngine();
    for (uint64_t id = 0; id < params.size(); ++id) {
      SamplingParams p = params[id];
      p.logprobs = logprobs;
      p.top_logprobs = logprobs ? 5 : 0;
      EXPECT_TRUE(e->Add({.id = id, .prompt = Tokens(7 + 2 * id, id), .sampling = p}).ok());
    }
    return Drain(*e, /*observe=*/logprobs);
  };
  const std::map<uint64_t, Got> without = run(false);
  const std::map<uint64_t, Got> with = run(true);
  for (uint64_t id = 0; id < params.size(); ++id) {
    const Got& g = with.at(id);
    EXPECT_EQ(g.tokens, without.at(id).tokens) << "request " << id;
    ASSERT_EQ(g.logprobs.size(), 10u);
    ASSERT_EQ(g.raw.size(), 10u);
    EXPECT_TRUE(without.at(id).logprobs.empty());
    const double t = params[id].temperature > 0 ? params[id].temperature : 1.0;
    for (size_t i = 0; i < g.tokens.size(); ++i) {
      std::vector<double> scaled;
      for (float x : g.raw[i]) scaled.push_back(x / t);
      const std::vector<double> want = LogSoftmax(scaled);
      const TokenLogprob& lp = g.logprobs[i];
      EXPECT_EQ(lp.token, g.tokens[i]);
      EXPECT_NEAR(lp.logprob, want[lp.token], 1e-5) << "request " << id << " token " << i;
      std::vector<int32_t> order(want.size());
      for (size_t v = 0; v < order.size(); ++v) order[v] = static_cast<int32_t>(v);
      std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return want[a] > want[b]; });
      ASSERT_EQ(lp.top.size(), 5u);
      for (size_t k = 0; k < 5; ++k) {
        EXPECT_EQ(lp.top[k].token, order[k]) << "request " << id << " token " << i << " rank " << k;
        EXPECT_NEAR(lp.top[k].logprob, want[order[k]], 1e-5);
      }
      if (params[id].temperature == 0.0f) {
        EXPECT_EQ(lp.top[0].token, lp.token) << "greedy";
      }
    }
  }
}

// The prompt's logprobs are log_softmax of the model's logits at the position
// before each token (the first has none), computed here by running the
// prompt through the model directly.
TEST_F(LogprobsTest, PromptLogprobsAreTheLogSoftmaxAtEachPosition) {
  const std::vector<int32_t> prompt = Tokens(29, 5);
  SamplingParams p = Seeded(2, 3);  // the prompt's logprobs take no temperature
  p.prompt_logprobs = true;
  p.top_logprobs = 4;  // the prompt's entries carry alternatives too
  auto e = MakeEngine({.block_size = 4, .prompt_logprob_rows = 8});
  ASSERT_TRUE(e->Add({.id = 1, .prompt = prompt, .sampling = p}).ok());
  int prefill_steps = 0;
  std::map<uint64_t, Got> got;
  while (e->HasWork()) {
    auto r = e->Step();
    ASSERT_TRUE(r.ok()) << r.status();
    for (const auto& [id, chunk] : r->scheduled) {
      EXPECT_LE(chunk, 8) << "a prompt's logit rows per step are bounded";
      if (chunk > 1) ++prefill_steps;
    }
    Record(*r, &got);
  }
  EXPECT_EQ(prefill_steps, 4);  // 29 tokens, 8 rows a step
  const Got& g = got.at(1);
  EXPECT_EQ(g.prompt_reports, 1);
  EXPECT_TRUE(g.logprobs.empty()) << "logprobs were not asked for";
  ASSERT_EQ(g.prompt.size(), prompt.size());
  EXPECT_EQ(g.prompt[0].token, prompt[0]);
  EXPECT_TRUE(std::isnan(g.prompt[0].logprob));
  EXPECT_TRUE(g.prompt[0].top.empty());
  const auto logits = testing::RunPrompts(*model_, {testing::Prompt{.ids = prompt}}, 16, 1 << 20, 1);
  for (size_t i = 1; i < prompt.size(); ++i) {
    const std::vector<double> want =
        LogSoftmax(std::vector<double>(logits[0][i - 1].begin(), logits[0][i - 1].end()));
    EXPECT_EQ(g.prompt[i].token, prompt[i]);
    EXPECT_NEAR(g.prompt[i].logprob, want[prompt[i]], 1e-5) << "prompt token " << i;
    ASSERT_EQ(g.prompt[i].top.size(), 4u);
    const int32_t best = static_cast<int32_t>(std::max_element(want.begin(), want.end()) - want.begin());
    EXPECT_EQ(g.prompt[i].top[0].token, best) << "prompt token " << i;
  }
}

// A request with prompt logprobs, logprobs and penalties among others in a
// cache so small that sequences are preempted, once preempted on purpose in
// the middle of its prefill and once after its first token, and through
// failing steps: its tokens and every logprob are those of the run alone, and
// the prompt's entries come exactly once.
class FailingExperts : public ExpertExecutor {
 public:
  explicit FailingExperts(ExpertExecutor* real) : real_(real) {}
  int failures = 0;
  absl::Status Run(int layer, const float* x, int64_t tokens, const int32_t* ids,
                   const float* weights, float* out) override {
    if (failures > 0) {
      --failures;
      return absl::UnavailableError("peer lost");
    }
    return real_->Run(layer, x, tokens, ids, weights, out);
  }

 private:
  ExpertExecutor* real_;
};

TEST_F(LogprobsTest, PreemptionAndFailedStepsChangeNoLogprobAndThePromptsComeOnce) {
  SamplingParams p = Seeded(9, 12);
  p.logprobs = true;
  p.top_logprobs = 3;
  p.prompt_logprobs = true;
  p.frequency_penalty = 0.7f;
  p.repetition_penalty = 1.2f;
  const std::vector<int32_t> prompt = Tokens(37, 2);
  const EngineOptions roomy{.block_size = 4, .prompt_logprob_rows = 8};
  auto alone_engine = MakeEngine(roomy);
  ASSERT_TRUE(alone_engine->Add({.id = 1, .prompt = prompt, .sampling = p}).ok());
  const Got alone = Drain(*alone_engine).at(1);
  ASSERT_EQ(alone.tokens.size(), 12u);
  ASSERT_EQ(alone.prompt.size(), prompt.size());

  const ModelConfig& c = model_->config();
  EngineOptions tight = roomy;
  tight.kv_cache_bytes = int64_t{2} * c.num_layers * 4 * c.num_key_value_heads * c.head_dim * 4 * 20;
  tight.max_batch_tokens = 12;
  FailingExperts failing(&model_->local_experts());
  struct Case {
    std::string name;
    std::function<void(Engine&, int)> before_step;
  };
  const std::vector<Case> cases = {
      {"preempted mid-prefill", [](Engine& e, int step) {
         if (step == 2) e.SetStepDirectives({.preempt = {1}});
       }},
      {"preempted after its first token", [](Engine& e, int step) {
         if (step == 8) e.SetStepDirectives({.preempt = {1}});
       }},
      {"failing steps", [&](Engine&, int step) {
         if (step % 3 == 1) failing.failures = 1;
       }},
  };
  for (const Case& k : cases) {
    SCOPED_TRACE(k.name);
    model_->set_expert_executor(&failing);
    auto e = MakeEngine(tight);
    ASSERT_TRUE(e->Add({.id = 1, .prompt = prompt, .sampling = p}).ok());
    for (uint64_t id = 2; id <= 4; ++id) {
      ASSERT_TRUE(e->Add({.id = id, .prompt = Tokens(9 + id, id), .sampling = Seeded(id, 14)}).ok());
    }
    int failed = 0;
    const std::map<uint64_t, Got> got =
        Drain(*e, false, [&](int step) { k.before_step(*e, step); }, &failed);
    model_->set_expert_executor(nullptr);
    const Got& g = got.at(1);
    EXPECT_EQ(g.tokens, alone.tokens);
    EXPECT_EQ(g.prompt_reports, 1);
    int preemptions = 0;
    for (const auto& [id, other] : got) preemptions += other.preemptions;
    EXPECT_GT(preemptions, 0) << "the cache was meant to be too small";
    if (k.name != "failing steps") {
      EXPECT_GT(g.preemptions, 0);
    }
    ExpectSameLogprobs(g.prompt, alone.prompt, "prompt");
    ExpectSameLogprobs(g.logprobs, alone.logprobs, "tokens");
    if (k.name == "failing steps") {
      EXPECT_GT(failed, 2);
    }
  }
}

// Penalties and logit_bias through the engine: each greedy token is the
// argmax of the model's logits after the penalties as defined (here, in
// double precision, from the request's own prompt and output), and its
// logprob is the log-softmax of those.
TEST_F(LogprobsTest, PenaltiesAndBiasFollowTheirDefinitionThroughTheEngine) {
  SamplingParams p = Greedy(16);
  p.frequency_penalty = 0.9f;
  p.presence_penalty = 0.4f;
  p.repetition_penalty = 1.5f;
  p.logit_bias = {{7, 1.5f}, {100, -3.0f}};
  p.logprobs = true;
  const std::vector<int32_t> prompt = Tokens(11, 4);
  auto e = MakeEngine();
  ASSERT_TRUE(e->Add({.id = 1, .prompt = prompt, .sampling = p}).ok());
  const Got g = Drain(*e, /*observe=*/true).at(1);
  ASSERT_EQ(g.tokens.size(), 16u);
  std::map<int32_t, int> counts;
  for (size_t i = 0; i < g.tokens.size(); ++i) {
    std::vector<double> processed(g.raw[i].begin(), g.raw[i].end());
    for (const auto& [token, bias] : p.logit_bias) processed[token] += bias;
    for (size_t v = 0; v < processed.size(); ++v) {
      const int32_t token = static_cast<int32_t>(v);
      const int n = counts.count(token) ? counts[token] : 0;
      if (n > 0 || std::count(prompt.begin(), prompt.end(), token) > 0) {
        processed[v] = processed[v] > 0 ? processed[v] / p.repetition_penalty
                                        : processed[v] * p.repetition_penalty;
      }
      processed[v] -= n * p.frequency_penalty + (n > 0 ? p.presence_penalty : 0.0);
    }
    const double best = *std::max_element(processed.begin(), processed.end());
    EXPECT_GE(processed[g.tokens[i]], best - 1e-5) << "token " << i << " is not the penalized argmax";
    EXPECT_NEAR(g.logprobs[i].logprob, LogSoftmax(processed)[g.tokens[i]], 1e-5) << "token " << i;
    ++counts[g.tokens[i]];
  }
}

// What a user notices: plain greedy decoding of this prompt repeats tokens; a
// large frequency and presence penalty makes it choose another token each
// time; a bias of +100 makes one token all there is.
TEST_F(LogprobsTest, ALargeFrequencyPenaltyStopsGreedyRepeatsAndABiasForcesAToken) {
  const std::vector<int32_t> prompt = Tokens(6, 1);
  auto generate = [&](const SamplingParams& p) {
    auto e = MakeEngine();
    EXPECT_TRUE(e->Add({.id = 1, .prompt = prompt, .sampling = p}).ok());
    return Drain(*e).at(1).tokens;
  };
  auto distinct = [](const std::vector<int32_t>& t) { return std::set<int32_t>(t.begin(), t.end()).size(); };
  const std::vector<int32_t> plain = generate(Greedy(12));
  ASSERT_LT(distinct(plain), plain.size()) << "the test needs a prompt whose greedy output repeats";
  SamplingParams penalized = Greedy(12);
  penalized.frequency_penalty = 2.0f;
  penalized.presence_penalty = 2.0f;
  const std::vector<int32_t> varied = generate(penalized);
  EXPECT_EQ(distinct(varied), varied.size()) << "a token repeated despite the penalty";
  EXPECT_EQ(varied[0], plain[0]) << "nothing was generated before the first token";
  SamplingParams biased = Seeded(1, 6);
  biased.logit_bias = {{42, 100.0f}};
  EXPECT_EQ(generate(biased), std::vector<int32_t>(6, 42));
  biased.logit_bias = {{plain[0], -100.0f}};
  biased.temperature = 0.0f;
  EXPECT_NE(generate(biased)[0], plain[0]);
}

// A request resumed on another rank counts the tokens it generated there for
// its penalties, so it continues as the uninterrupted run would.
TEST_F(LogprobsTest, ResumedTokensCountAsGeneratedForThePenalties) {
  SamplingParams p = Greedy(12);
  p.frequency_penalty = 1.2f;
  p.presence_penalty = 0.5f;
  p.repetition_penalty = 1.3f;
  p.logprobs = true;
  p.prompt_logprobs = true;
  auto whole = MakeEngine();
  ASSERT_TRUE(whole->Add({.id = 1, .prompt = Tokens(8, 6), .sampling = p}).ok());
  const Got want = Drain(*whole).at(1);
  for (size_t cut : {size_t{1}, size_t{6}}) {
    auto e = MakeEngine();
    GenerationRequest r{.id = 2, .prompt = Tokens(8, 6), .sampling = p};
    r.resumed.assign(want.tokens.begin(), want.tokens.begin() + cut);
    ASSERT_TRUE(e->Add(std::move(r)).ok());
    const Got rest = Drain(*e).at(2);
    EXPECT_EQ(rest.tokens, std::vector<int32_t>(want.tokens.begin() + cut, want.tokens.end()));
    ExpectSameLogprobs(rest.logprobs, std::vector<TokenLogprob>(want.logprobs.begin() + cut, want.logprobs.end()),
                       "cut " + std::to_string(cut));
    EXPECT_EQ(rest.prompt_reports, 0) << "the prompt's logprobs went out with the first token";
  }
}

// Requests sharing a system prompt, with logprobs, and one with prompt
// logprobs whose prompt is cached (it computes it anyway, and still publishes
// it): every entry has the bits of a cache-off run (mixtral-tiny-f32, where
// the CPU's chunked prefill gives a position the bits of a whole prefill).
TEST_F(LogprobsTest, ThePrefixCacheChangesNoLogprob) {
  std::unique_ptr<Model> f32 = Load("mixtral-tiny-f32");
  ASSERT_NE(f32, nullptr);
  const std::vector<int32_t> system = Tokens(33, 8);
  std::vector<GenerationRequest> requests;
  for (uint64_t id = 1; id <= 4; ++id) {
    std::vector<int32_t> prompt = system;
    for (int32_t t : Tokens(2 + 3 * id, id)) prompt.push_back(t);
    SamplingParams sp = id % 2 ? Greedy(6) : Seeded(id, 6);
    sp.logprobs = true;
    sp.top_logprobs = 3;
    requests.push_back({.id = id, .prompt = prompt, .sampling = sp});
  }
  SamplingParams echo = Greedy(4);
  echo.prompt_logprobs = true;
  echo.logprobs = true;
  requests.push_back({.id = 5, .prompt = requests[0].prompt, .sampling = echo});
  requests.push_back({.id = 6, .prompt = requests[0].prompt, .sampling = Greedy(4)});
  std::map<bool, std::map<uint64_t, Got>> runs;
  for (bool on : {false, true}) {
    auto e = MakeEngine({.block_size = 8, .max_batch_tokens = 64, .prefix_caching = on}, f32.get());
    for (const GenerationRequest& r : requests) {  // one after another: the cache is warm
      ASSERT_TRUE(e->Add(r).ok());
      runs[on][r.id] = Drain(*e).at(r.id);
    }
  }
  for (const GenerationRequest& r : requests) {
    const std::string what = "request " + std::to_string(r.id);
    EXPECT_EQ(runs[true][r.id].tokens, runs[false][r.id].tokens) << what;
    ExpectSameLogprobs(runs[true][r.id].logprobs, runs[false][r.id].logprobs, what);
    ExpectSameLogprobs(runs[true][r.id].prompt, runs[false][r.id].prompt, what + " prompt");
  }
  EXPECT_EQ(runs[true][2].cached_tokens, 32);
  EXPECT_EQ(runs[true][5].cached_tokens, 0) << "prompt logprobs need every position computed";
  EXPECT_EQ(runs[true][5].prompt.size(), requests[0].prompt.size());
  EXPECT_EQ(runs[true][6].cached_tokens, 32);
}

TEST_F(LogprobsTest, AnOutOfVocabularyLogitBiasIsRefusedNamingTheField) {
  auto e = MakeEngine();
  SamplingParams p = Greedy(2);
  p.logit_bias = {{static_cast<int32_t>(Vocab()), 1.0f}};
  const absl::Status s = e->Add({.id = 1, .prompt = {1, 2}, .sampling = p});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(s.message(), "sampling.logit_bias: token id 272 is out of range [0, 272)");
  p.logit_bias = {{271, 1.0f}};
  EXPECT_TRUE(e->Add({.id = 1, .prompt = {1, 2}, .sampling = p}).ok());
}

}  // namespace
}  // namespace joule
