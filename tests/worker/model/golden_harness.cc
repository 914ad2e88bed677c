#include "tests/worker/model/golden_harness.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <functional>
#include <random>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/testing/paths.h"
#include "worker/engine/kv_cache.h"

namespace joule::testing {

std::vector<Prompt> LoadFixture(const std::string& file) {
  const std::string path = SourceDir() + "/tests/data/golden/" + file + ".json";
  std::ifstream in(path);
  EXPECT_TRUE(in.good()) << "missing fixture " << path;
  nlohmann::json j = nlohmann::json::parse(in, nullptr, false);
  EXPECT_FALSE(j.is_discarded()) << "bad JSON in " << path;
  std::vector<Prompt> prompts;
  if (j.is_discarded()) return prompts;
  for (const auto& p : j["prompts"]) {
    Prompt pr;
    pr.ids = p["ids"].get<std::vector<int32_t>>();
    pr.logits = p["logits"].get<std::vector<std::vector<float>>>();
    if (p.contains("logit_positions")) {
      pr.logit_positions = p["logit_positions"].get<std::vector<int>>();
    } else {
      // All positions, or the last ones when fewer are stored.
      const int n = static_cast<int>(pr.logits.size());
      for (int i = 0; i < n; ++i) pr.logit_positions.push_back(static_cast<int>(pr.ids.size()) - n + i);
    }
    pr.greedy = p["greedy"].get<std::vector<int32_t>>();
    pr.greedy_margins = p["greedy_margins"].get<std::vector<float>>();
    prompts.push_back(std::move(pr));
  }
  return prompts;
}

// Runs sequences through Model::Forward in chunks of `chunk` tokens per
// sequence per step (all sequences advance together), with KV blocks handed
// out in a scrambled order. Returns logits for every prompt position.
std::vector<std::vector<std::vector<float>>> RunPrompts(Model& model,
                                                         const std::vector<Prompt>& prompts,
                                                         int block_size, int chunk,
                                                         uint32_t block_shuffle_seed) {
  const ModelConfig& c = model.config();
  auto kv = PagedKvCache::Create(model.backend(), c, block_size, int64_t{64} << 20);
  EXPECT_TRUE(kv.ok()) << kv.status();
  // Scramble the free list so sequences get non-contiguous blocks.
  std::vector<int32_t> order;
  for (int32_t b = kv.value()->allocator().Allocate(); b >= 0; b = kv.value()->allocator().Allocate()) order.push_back(b);
  std::mt19937 rng(block_shuffle_seed);
  std::shuffle(order.begin(), order.end(), rng);
  for (int32_t b : order) kv.value()->allocator().Free(b);

  const size_t S = prompts.size();
  std::vector<std::vector<int32_t>> blocks(S);
  std::vector<int> done(S, 0);
  std::vector<std::vector<std::vector<float>>> out(S);
  for (size_t s = 0; s < S; ++s) out[s].resize(prompts[s].ids.size());
  while (true) {
    ForwardBatch b;
    b.query_start.push_back(0);
    std::vector<std::pair<size_t, int>> rows;  // (seq, position) per logit row
    std::vector<size_t> active;
    for (size_t s = 0; s < S; ++s) {
      const int len = static_cast<int>(prompts[s].ids.size());
      if (done[s] == len) continue;
      const int n = std::min(chunk, len - done[s]);
      while (static_cast<int>(blocks[s].size()) * block_size < done[s] + n) {
        blocks[s].push_back(kv.value()->allocator().Allocate());
      }
      for (int i = 0; i < n; ++i) {
        const int pos = done[s] + i;
        b.tokens.push_back(prompts[s].ids[pos]);
        b.positions.push_back(pos);
        b.slots.push_back(int64_t{blocks[s][pos / block_size]} * block_size + pos % block_size);
        b.logit_rows.push_back(static_cast<int32_t>(b.tokens.size()) - 1);
        rows.push_back({s, pos});
      }
      b.query_start.push_back(static_cast<int32_t>(b.tokens.size()));
      b.context_lens.push_back(done[s] + n);
      active.push_back(s);
      done[s] += n;
    }
    if (active.empty()) break;
    size_t max_blocks = 0;
    for (size_t s : active) max_blocks = std::max(max_blocks, blocks[s].size());
    b.max_blocks_per_seq = static_cast<int>(max_blocks);
    b.block_tables.assign(active.size() * max_blocks, 0);
    for (size_t i = 0; i < active.size(); ++i) {
      std::copy(blocks[active[i]].begin(), blocks[active[i]].end(), b.block_tables.begin() + i * max_blocks);
    }
    std::vector<float> logits(b.logit_rows.size() * c.vocab_size);
    absl::Status st = model.Forward(b, kv.value()->view(), logits.data());
    EXPECT_TRUE(st.ok()) << st;
    if (!st.ok()) break;
    for (size_t r = 0; r < rows.size(); ++r) {
      out[rows[r].first][rows[r].second].assign(logits.begin() + r * c.vocab_size,
                                                logits.begin() + (r + 1) * c.vocab_size);
    }
  }
  return out;
}

void ExpectLogitsNear(const std::vector<Prompt>& prompts,
                      const std::vector<std::vector<std::vector<float>>>& got,
                      const std::string& what, const LogitTolerance& tolerance) {
  float worst = 0.0f;
  for (size_t s = 0; s < prompts.size(); ++s) {
    for (size_t i = 0; i < prompts[s].logit_positions.size(); ++i) {
      const int pos = prompts[s].logit_positions[i];
      const auto& want = prompts[s].logits[i];
      const auto& have = got[s][pos];
      ASSERT_EQ(have.size(), want.size()) << what << ": vocab mismatch";
      float max_abs = 0.0f;
      for (float w : want) max_abs = std::max(max_abs, std::abs(w));
      for (size_t v = 0; v < want.size(); ++v) {
        const float err = std::abs(have[v] - want[v]);
        worst = std::max(worst, err);
        ASSERT_LE(err, tolerance(want[v], max_abs))
            << what << ": prompt " << s << " position " << pos << " token " << v << " engine "
            << have[v] << " reference " << want[v];
      }
    }
  }
  ::testing::Test::RecordProperty("max_abs_error_" + what, std::to_string(worst));
  std::printf("%s: max |engine - reference| = %.3g\n", what.c_str(), worst);
}

std::vector<std::vector<int32_t>> RunGreedy(Model& model, const std::vector<Prompt>& prompts,
                                            EngineOptions options) {
  std::vector<std::vector<int32_t>> got(prompts.size());
  auto engine = Engine::Create(&model, options);
  EXPECT_TRUE(engine.ok()) << engine.status();
  if (!engine.ok()) return got;
  for (size_t s = 0; s < prompts.size(); ++s) {
    SamplingParams sp;
    sp.temperature = 0.0f;
    sp.max_tokens = static_cast<int>(prompts[s].greedy.size());
    sp.ignore_eos = true;
    EXPECT_TRUE((*engine)->Add({.id = s, .prompt = prompts[s].ids, .sampling = sp}).ok());
  }
  int steps = 0;
  while ((*engine)->HasWork() && steps++ < 1000) {
    auto r = (*engine)->Step();
    EXPECT_TRUE(r.ok()) << r.status();
    if (!r.ok()) break;
    for (const TokenOutput& t : r->tokens) got[t.id].push_back(t.token);
  }
  return got;
}

void ExpectGreedyMatches(const std::vector<Prompt>& prompts,
                         const std::vector<std::vector<int32_t>>& got, float tie_margin) {
  for (size_t s = 0; s < prompts.size(); ++s) {
    const auto& want = prompts[s].greedy;
    ASSERT_EQ(got[s].size(), want.size()) << "prompt " << s;
    for (size_t i = 0; i < want.size(); ++i) {
      if (got[s][i] == want[i]) continue;
      EXPECT_LT(prompts[s].greedy_margins[i], tie_margin)
          << "prompt " << s << " step " << i << ": engine " << got[s][i] << " reference " << want[i];
      break;
    }
  }
}

std::vector<ReportedLogprobs> RunLogprobs(Model& model, const std::vector<Prompt>& prompts,
                                          EngineOptions options, int top) {
  std::vector<ReportedLogprobs> got(prompts.size());
  auto engine = Engine::Create(&model, options);
  EXPECT_TRUE(engine.ok()) << engine.status();
  if (!engine.ok()) return got;
  for (size_t s = 0; s < prompts.size(); ++s) {
    SamplingParams sp;
    sp.temperature = 0.0f;
    sp.max_tokens = 1;
    sp.ignore_eos = true;
    sp.logprobs = true;
    sp.prompt_logprobs = true;
    sp.top_logprobs = top;
    EXPECT_TRUE((*engine)->Add({.id = s, .prompt = prompts[s].ids, .sampling = sp}).ok());
  }
  int steps = 0;
  while ((*engine)->HasWork() && steps++ < 1000) {
    auto r = (*engine)->Step();
    EXPECT_TRUE(r.ok()) << r.status();
    if (!r.ok()) break;
    for (const TokenOutput& t : r->tokens) {
      EXPECT_TRUE(t.logprob.has_value());
      if (t.logprob.has_value()) got[t.id].first = *t.logprob;
      got[t.id].prompt = t.prompt_logprobs;
    }
  }
  return got;
}

namespace {

std::vector<double> LogSoftmax(const std::vector<float>& logits) {
  double max = -1e300, total = 0;
  for (float x : logits) max = std::max<double>(max, x);
  for (float x : logits) total += std::exp(x - max);
  std::vector<double> out;
  for (float x : logits) out.push_back(x - max - std::log(total));
  return out;
}

// One reported entry against the reference's log_softmax at the position before.
void ExpectEntryNear(const TokenLogprob& got, int32_t want_token, const std::vector<double>& want,
                     float tolerance, const std::string& where, float* worst) {
  ASSERT_EQ(got.token, want_token) << where;
  *worst = std::max(*worst, static_cast<float>(std::abs(got.logprob - want[want_token])));
  EXPECT_NEAR(got.logprob, want[want_token], tolerance) << where;
  std::vector<double> sorted = want;
  std::sort(sorted.begin(), sorted.end(), std::greater<>());
  for (size_t k = 0; k < got.top.size(); ++k) {
    const TopLogprob& alt = got.top[k];
    EXPECT_NEAR(alt.logprob, want[alt.token], tolerance) << where << " alternative " << k;
    // The k-th most likely token, unless another is within the tolerance of it.
    EXPECT_GE(want[alt.token], sorted[k] - 2 * tolerance) << where << " alternative " << k;
    if (k > 0) {
      EXPECT_GE(got.top[k - 1].logprob, alt.logprob) << where << " alternative " << k;
    }
  }
}

}  // namespace

void ExpectLogprobsNear(const std::vector<Prompt>& prompts, const std::vector<ReportedLogprobs>& got,
                        float tolerance) {
  float worst = 0.0f;
  for (size_t s = 0; s < prompts.size(); ++s) {
    const std::vector<int32_t>& ids = prompts[s].ids;
    ASSERT_EQ(got[s].prompt.size(), ids.size()) << "prompt " << s << ": one entry per prompt token";
    EXPECT_EQ(got[s].prompt[0].token, ids[0]);
    EXPECT_TRUE(std::isnan(got[s].prompt[0].logprob)) << "the first prompt token has no logprob";
    for (size_t i = 0; i < prompts[s].logit_positions.size(); ++i) {
      const int pos = prompts[s].logit_positions[i];
      const std::vector<double> want = LogSoftmax(prompts[s].logits[i]);
      const std::string where = "prompt " + std::to_string(s) + " position " + std::to_string(pos);
      if (pos + 1 < static_cast<int>(ids.size())) {
        ExpectEntryNear(got[s].prompt[pos + 1], ids[pos + 1], want, tolerance, where, &worst);
      } else {  // the last position: the first generated (greedy) token
        ExpectEntryNear(got[s].first, got[s].first.top.empty() ? got[s].first.token : got[s].first.top[0].token,
                        want, tolerance, where + " (first token)", &worst);
      }
    }
  }
  std::printf("logprobs: max |engine - reference| = %.3g\n", worst);
}

}  // namespace joule::testing
