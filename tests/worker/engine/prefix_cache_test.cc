// Automatic prefix caching as a user sees it: the same tokens and logits
// with the cache on or off, a shared prompt computed once, eviction that
// only takes unheld blocks, and sequences that share blocks surviving
// preemption, cancellation and resumption of their sharers.
#include <functional>
#include <map>
#include <vector>

#include "gtest/gtest.h"
#include "tests/testing/paths.h"
#include "worker/engine/engine.h"

namespace joule {
namespace {

class PrefixCacheTest : public ::testing::Test {
 protected:
  void SetUp() override { model_ = Load("qwen3_moe-tiny"); }

  static std::unique_ptr<Model> Load(const std::string& name) {
    auto m = Model::Load(testing::TinyModelDir(name), {.num_threads = 2});
    EXPECT_TRUE(m.ok()) << m.status();
    return m.ok() ? std::move(*m) : nullptr;
  }

  static std::unique_ptr<Engine> MakeEngine(Model* model, EngineOptions opts) {
    auto e = Engine::Create(model, opts);
    EXPECT_TRUE(e.ok()) << e.status();
    return e.ok() ? std::move(*e) : nullptr;
  }
  std::unique_ptr<Engine> MakeEngine(EngineOptions opts = {}) { return MakeEngine(model_.get(), opts); }

  // Bytes of `blocks` KV blocks of `block_size` tokens (F32 on the CPU).
  int64_t CacheBytes(int blocks, int block_size) const {
    const ModelConfig& c = model_->config();
    return int64_t{2} * c.num_layers * block_size * c.num_key_value_heads * c.head_dim * 4 * blocks;
  }

  static std::vector<int32_t> Tokens(int len, int salt) {
    std::vector<int32_t> p;
    for (int i = 0; i < len; ++i) p.push_back((i * 37 + salt * 11 + 5) % 256);
    return p;
  }
  static std::vector<int32_t> Concat(std::vector<int32_t> a, const std::vector<int32_t>& b) {
    a.insert(a.end(), b.begin(), b.end());
    return a;
  }

  static SamplingParams Greedy(int max_tokens) {
    SamplingParams s;
    s.temperature = 0.0f;
    s.max_tokens = max_tokens;
    s.ignore_eos = true;
    return s;
  }
  static SamplingParams Seeded(uint64_t seed, int max_tokens) {
    SamplingParams s;
    s.temperature = 0.9f;
    s.top_p = 0.95f;
    s.seed = seed;
    s.max_tokens = max_tokens;
    s.ignore_eos = true;
    return s;
  }

  struct Run {
    std::map<uint64_t, std::vector<int32_t>> tokens;
    std::map<uint64_t, int> cached_tokens;  // as reported with the tokens
    int64_t prefill_tokens = 0;
    int64_t queries = 0;
    int64_t hits = 0;
    int preemptions = 0;
  };
  // Steps until nothing is left; `before_step(i)` runs before step i.
  static Run Drain(Engine& e, const std::function<void(int)>& before_step = nullptr) {
    Run run;
    for (int step = 0; step < 10000; ++step) {
      if (before_step) before_step(step);
      if (!e.HasWork()) break;
      auto r = e.Step();
      EXPECT_TRUE(r.ok()) << r.status();
      if (!r.ok()) break;
      run.prefill_tokens += r->prefill_tokens;
      run.queries += r->prefix_cache_queries;
      run.hits += r->prefix_cache_hits;
      run.preemptions += static_cast<int>(r->preempted.size());
      for (const TokenOutput& t : r->tokens) {
        run.tokens[t.id].push_back(t.token);
        run.cached_tokens[t.id] = t.cached_tokens;
      }
    }
    return run;
  }

  std::unique_ptr<Model> model_;
};

// Requests that share a system prompt, one the same as an earlier one, one
// that is a prefix of another, greedy and seeded, each added when the one
// before finished (so the cache is warm) and then all at once: the tokens
// and every sampled row's logits are the bits of a cache-off run. The CPU's
// chunked prefill and decode give a position the same bits as a whole
// prefill, so reusing K/V computed in another step changes nothing.
TEST_F(PrefixCacheTest, SameTokensAndLogitsBitForBitWithTheCacheOnAndOff) {
  std::unique_ptr<Model> f32 = Load("mixtral-tiny-f32");
  ASSERT_NE(f32, nullptr);
  const std::vector<int32_t> system = Tokens(37, 1);
  std::vector<GenerationRequest> requests;
  for (uint64_t id = 1; id <= 6; ++id) {
    GenerationRequest r{.id = id, .prompt = Concat(system, Tokens(3 + 5 * id, id))};
    r.sampling = id % 2 ? Greedy(9) : Seeded(100 + id, 9);
    requests.push_back(r);
  }
  requests.push_back({.id = 7, .prompt = requests[0].prompt, .sampling = Greedy(9)});
  requests.push_back({.id = 8, .prompt = system, .sampling = Seeded(5, 9)});  // all cached but the last
  // Whole blocks, all cached: the last block is computed again, for the last token's logits.
  requests.push_back({.id = 9, .prompt = std::vector<int32_t>(system.begin(), system.begin() + 32),
                      .sampling = Greedy(9)});

  for (bool together : {false, true}) {
    std::map<bool, std::map<uint64_t, std::vector<std::vector<float>>>> logits;
    std::map<bool, Run> runs;
    for (bool on : {false, true}) {
      auto e = MakeEngine(f32.get(), {.block_size = 8, .max_batch_tokens = 64, .prefix_caching = on});
      e->set_logits_observer([&](uint64_t id, const float* row, int64_t vocab) {
        logits[on][id].emplace_back(row, row + vocab);
      });
      Run& run = runs[on];
      if (together) {
        for (const GenerationRequest& r : requests) ASSERT_TRUE(e->Add(r).ok());
        run = Drain(*e);
      } else {
        for (const GenerationRequest& r : requests) {
          ASSERT_TRUE(e->Add(r).ok());
          Run one = Drain(*e);
          run.tokens[r.id] = one.tokens[r.id];
          run.cached_tokens[r.id] = one.cached_tokens[r.id];
          run.hits += one.hits;
        }
      }
    }
    SCOPED_TRACE(together ? "added together" : "added one after another");
    EXPECT_EQ(runs[true].tokens, runs[false].tokens);
    for (const auto& [id, rows] : logits[false]) {
      ASSERT_EQ(logits[true][id].size(), rows.size()) << "request " << id;
      for (size_t i = 0; i < rows.size(); ++i) {
        EXPECT_EQ(logits[true][id][i], rows[i]) << "request " << id << " token " << i;  // bitwise
      }
    }
    EXPECT_EQ(runs[false].hits, 0);
    EXPECT_GT(runs[true].hits, 0);
    // The system prompt's 4 full blocks of 8; request 7 repeats request 1 and
    // request 8 is the system prompt, of which it must still compute the last token.
    EXPECT_EQ(runs[true].cached_tokens[2], 32);
    EXPECT_EQ(runs[true].cached_tokens[7], 40);
    EXPECT_EQ(runs[true].cached_tokens[8], 32);
    EXPECT_EQ(runs[true].cached_tokens[9], 24);
  }
}

// 64 requests with one 64-token system prompt arrive at once: the first
// computes its blocks, the others wait a step for them instead of computing
// them too, and every request still gives the tokens it gives alone.
TEST_F(PrefixCacheTest, ASharedSystemPromptOver64ConcurrentRequestsIsComputedOnce) {
  const std::vector<int32_t> system = Tokens(64, 7);
  constexpr int kRequests = 64;
  constexpr int kSuffix = 5;
  std::map<bool, Run> runs;
  for (bool on : {false, true}) {
    auto e = MakeEngine({.prefix_caching = on});
    for (uint64_t id = 0; id < kRequests; ++id) {
      ASSERT_TRUE(e->Add({.id = id, .prompt = Concat(system, Tokens(kSuffix, 100 + id)),
                          .sampling = Seeded(id, 2)})
                      .ok());
    }
    runs[on] = Drain(*e);
  }
  EXPECT_EQ(runs[true].tokens, runs[false].tokens);
  const int64_t prompt = 64 + kSuffix;
  EXPECT_EQ(runs[false].prefill_tokens, kRequests * prompt);
  EXPECT_EQ(runs[false].queries, 0);
  EXPECT_EQ(runs[true].queries, kRequests * prompt);
  EXPECT_EQ(runs[true].hits, (kRequests - 1) * 64);
  EXPECT_EQ(runs[true].prefill_tokens, prompt + (kRequests - 1) * kSuffix);
  EXPECT_EQ(runs[true].cached_tokens[0], 0);
  EXPECT_EQ(runs[true].cached_tokens[kRequests - 1], 64);
}

// A cached prefix costs no budget: a 100-token prompt whose first 96 tokens
// are cached runs in one step of a 16-token budget, next to another request.
TEST_F(PrefixCacheTest, TheStepBudgetCountsOnlyComputedTokens) {
  auto e = MakeEngine({.max_batch_tokens = 16});
  const std::vector<int32_t> prompt = Tokens(100, 3);
  ASSERT_TRUE(e->Add({.id = 1, .prompt = prompt, .sampling = Greedy(1)}).ok());
  const Run first = Drain(*e);
  ASSERT_TRUE(e->Add({.id = 2, .prompt = prompt, .sampling = Greedy(1)}).ok());
  ASSERT_TRUE(e->Add({.id = 3, .prompt = Tokens(9, 4), .sampling = Greedy(1)}).ok());
  auto step = e->Step();
  ASSERT_TRUE(step.ok()) << step.status();
  EXPECT_EQ(step->prefill_tokens, 4 + 9);
  EXPECT_EQ(step->prefix_cache_hits, 96);
  ASSERT_EQ(step->tokens.size(), 2u);
  EXPECT_EQ(step->tokens[0].id, 2u);
  EXPECT_EQ(step->tokens[0].token, first.tokens.at(1)[0]);
  EXPECT_EQ(step->tokens[0].cached_tokens, 96);
}

// The same block content after a different first block is not a hit.
TEST_F(PrefixCacheTest, BlocksAreNamedByTheirWholePrefix) {
  auto e = MakeEngine({.block_size = 4});
  const std::vector<int32_t> x = Tokens(4, 1), y = Tokens(4, 2), z = Tokens(4, 3), tail = {7};
  ASSERT_TRUE(e->Add({.id = 1, .prompt = Concat(Concat(x, y), tail), .sampling = Greedy(1)}).ok());
  Drain(*e);
  ASSERT_TRUE(e->Add({.id = 2, .prompt = Concat(Concat(z, y), tail), .sampling = Greedy(1)}).ok());
  EXPECT_EQ(Drain(*e).cached_tokens[2], 0);
  ASSERT_TRUE(e->Add({.id = 3, .prompt = Concat(Concat(x, z), tail), .sampling = Greedy(1)}).ok());
  EXPECT_EQ(Drain(*e).cached_tokens[3], 4);
  ASSERT_TRUE(e->Add({.id = 4, .prompt = Concat(Concat(x, y), tail), .sampling = Greedy(1)}).ok());
  EXPECT_EQ(Drain(*e).cached_tokens[4], 8);
}

// Under memory pressure the least recently released cached blocks go first,
// and never one a running sequence holds.
TEST_F(PrefixCacheTest, EvictionTakesTheLeastRecentlyReleasedUnheldBlocks) {
  // 12 blocks of 4 tokens.
  auto e = MakeEngine({.block_size = 4, .kv_cache_bytes = CacheBytes(12, 4), .max_batch_tokens = 64});
  const std::vector<int32_t> a = Tokens(9, 1), b = Tokens(9, 2), held = Tokens(9, 3);
  ASSERT_TRUE(e->Add({.id = 1, .prompt = a, .sampling = Greedy(1)}).ok());
  Drain(*e);  // a's two full blocks cached, released first
  ASSERT_TRUE(e->Add({.id = 2, .prompt = b, .sampling = Greedy(1)}).ok());
  Drain(*e);  // b's two full blocks cached
  // A running sequence holds its blocks (3 of them, enough for its 3 tokens)
  // while a newcomer needs 8 fresh ones: of the 9 left (5 free + 4 cached),
  // the 3 it takes from the cache are a's two and then b's tail block.
  ASSERT_TRUE(e->Add({.id = 3, .prompt = held, .sampling = Greedy(3)}).ok());
  ASSERT_TRUE(e->Step().ok());
  EXPECT_EQ(e->kv_cache().allocator().num_cached(), 6);
  ASSERT_TRUE(e->Add({.id = 4, .prompt = Tokens(31, 4), .sampling = Greedy(1)}).ok());
  ASSERT_TRUE(e->Step().ok());
  Run rest = Drain(*e);
  EXPECT_EQ(rest.preemptions, 0);
  ASSERT_TRUE(e->Add({.id = 5, .prompt = b, .sampling = Greedy(1)}).ok());
  EXPECT_EQ(Drain(*e).cached_tokens[5], 4);  // b's first block survived, its second did not
  ASSERT_TRUE(e->Add({.id = 6, .prompt = a, .sampling = Greedy(1)}).ok());
  EXPECT_EQ(Drain(*e).cached_tokens[6], 0);
  ASSERT_TRUE(e->Add({.id = 7, .prompt = held, .sampling = Greedy(1)}).ok());
  EXPECT_EQ(Drain(*e).cached_tokens[7], 8);  // held throughout, then cached
}

// A waiting request that does not fit the free and evictable blocks waits
// without evicting anything: the cache is intact when it is admitted later.
TEST_F(PrefixCacheTest, ARequestThatDoesNotFitEvictsNothing) {
  auto e = MakeEngine({.block_size = 4, .kv_cache_bytes = CacheBytes(10, 4), .max_batch_tokens = 64});
  ASSERT_TRUE(e->Add({.id = 1, .prompt = Tokens(9, 1), .sampling = Greedy(1)}).ok());
  Drain(*e);  // 2 cached blocks
  ASSERT_TRUE(e->Add({.id = 2, .prompt = Tokens(25, 2), .sampling = Greedy(3)}).ok());
  ASSERT_TRUE(e->Step().ok());  // holds 7 blocks, 6 of them published
  ASSERT_EQ(e->kv_cache().allocator().num_cached(), 8);
  ASSERT_TRUE(e->Add({.id = 3, .prompt = Tokens(17, 3), .sampling = Greedy(1)}).ok());  // needs 5 of 3
  ASSERT_TRUE(e->Step().ok());
  EXPECT_EQ(e->num_waiting(), 1);
  EXPECT_EQ(e->kv_cache().allocator().num_cached(), 8);
  EXPECT_EQ(Drain(*e).tokens[3].size(), 1u);
}

// A request whose cached prefix is evicted while it waits computes it again
// and gives the tokens it gives with the cache warm.
TEST_F(PrefixCacheTest, ARequestWhosePrefixWasEvictedBeforeItRanRecomputesIt) {
  // 10 blocks of 4 tokens; the blocker needs all of them in its first step.
  auto e = MakeEngine({.block_size = 4, .kv_cache_bytes = CacheBytes(10, 4), .max_batch_tokens = 39});
  const std::vector<int32_t> prompt = Tokens(13, 5);
  ASSERT_TRUE(e->Add({.id = 1, .prompt = prompt, .sampling = Seeded(3, 6)}).ok());
  const std::vector<int32_t> want = Drain(*e).tokens[1];
  ASSERT_EQ(e->kv_cache().allocator().num_cached(), 4);
  ASSERT_TRUE(e->Add({.id = 2, .prompt = Tokens(39, 6), .sampling = Greedy(1)}).ok());
  ASSERT_TRUE(e->Add({.id = 3, .prompt = prompt, .sampling = Seeded(3, 6)}).ok());
  Run run = Drain(*e);
  EXPECT_EQ(run.tokens[3], want);
  EXPECT_EQ(run.cached_tokens[3], 0);
  EXPECT_EQ(run.prefill_tokens, 39 + 13);
}

// Preempting sequences that share prefix blocks frees only their holds: the
// sharers keep the blocks, and everyone's output is what it is alone.
TEST_F(PrefixCacheTest, PreemptingSequencesThatShareBlocksKeepsEveryOutput) {
  const std::vector<int32_t> system = Tokens(16, 9);
  std::map<uint64_t, std::vector<int32_t>> alone;
  for (uint64_t id = 0; id < 6; ++id) {
    auto e = MakeEngine({.prefix_caching = false});
    ASSERT_TRUE(e->Add({.id = id, .prompt = Concat(system, Tokens(2 + id, id)), .sampling = Seeded(id, 16)}).ok());
    alone[id] = Drain(*e).tokens[id];
  }
  // 24 blocks of 4 for 6 sequences of up to 39 tokens: they must take turns.
  auto e = MakeEngine({.block_size = 4, .kv_cache_bytes = CacheBytes(24, 4), .max_batch_tokens = 16});
  for (uint64_t id = 0; id < 6; ++id) {
    ASSERT_TRUE(e->Add({.id = id, .prompt = Concat(system, Tokens(2 + id, id)), .sampling = Seeded(id, 16)}).ok());
  }
  Run run = Drain(*e);
  EXPECT_GT(run.preemptions, 0);
  EXPECT_GT(run.hits, 0);
  EXPECT_EQ(run.tokens, alone);
  EXPECT_EQ(e->kv_cache().allocator().num_free(), e->kv_cache().allocator().num_blocks());
}

// Two requests share a prompt's blocks; cancelling one mid-decode leaves the
// other's blocks and tokens as they were.
TEST_F(PrefixCacheTest, CancellingOneOfTwoSharersLeavesTheOtherCorrect) {
  const std::vector<int32_t> prompt = Tokens(40, 2);
  auto solo = MakeEngine({.prefix_caching = false});
  ASSERT_TRUE(solo->Add({.id = 2, .prompt = prompt, .sampling = Seeded(8, 12)}).ok());
  const std::vector<int32_t> want = Drain(*solo).tokens[2];

  auto e = MakeEngine();
  ASSERT_TRUE(e->Add({.id = 1, .prompt = prompt, .sampling = Seeded(4, 12)}).ok());
  ASSERT_TRUE(e->Add({.id = 2, .prompt = prompt, .sampling = Seeded(8, 12)}).ok());
  Run run = Drain(*e, [&](int step) {
    if (step == 4) {
      EXPECT_TRUE(e->Cancel(1));
    }
  });
  EXPECT_EQ(run.tokens[2], want);
  EXPECT_EQ(run.cached_tokens[2], 32);
  EXPECT_LT(run.tokens[1].size(), 12u);
}

// A request resumed after its rank died re-prefills prompt + streamed tokens:
// where this rank served the same prompt the cache holds them, and the rest
// of the output is the uninterrupted run's.
TEST_F(PrefixCacheTest, AResumedRequestReusesCachedBlocksAndContinuesTheSame) {
  const std::vector<int32_t> prompt = Tokens(20, 6);
  auto e = MakeEngine({.block_size = 4});
  ASSERT_TRUE(e->Add({.id = 1, .prompt = prompt, .sampling = Seeded(21, 12)}).ok());
  const std::vector<int32_t> want = Drain(*e).tokens[1];
  ASSERT_EQ(want.size(), 12u);
  GenerationRequest resumed{.id = 2, .prompt = prompt, .sampling = Seeded(21, 12)};
  resumed.resumed.assign(want.begin(), want.begin() + 7);
  ASSERT_TRUE(e->Add(std::move(resumed)).ok());
  Run run = Drain(*e);
  EXPECT_EQ(run.tokens[2], std::vector<int32_t>(want.begin() + 7, want.end()));
  EXPECT_EQ(run.hits, 24);                 // 27 tokens: 6 full blocks, the last token computed
  EXPECT_EQ(run.cached_tokens[2], 20);     // of the prompt
}

TEST_F(PrefixCacheTest, WithTheFlagOffNothingIsCachedOrCounted) {
  auto e = MakeEngine({.prefix_caching = false});
  const std::vector<int32_t> prompt = Tokens(50, 1);
  ASSERT_TRUE(e->Add({.id = 1, .prompt = prompt, .sampling = Greedy(3)}).ok());
  Run first = Drain(*e);
  ASSERT_TRUE(e->Add({.id = 2, .prompt = prompt, .sampling = Greedy(3)}).ok());
  Run second = Drain(*e);
  EXPECT_EQ(second.tokens[2], first.tokens[1]);
  EXPECT_EQ(second.hits, 0);
  EXPECT_EQ(second.queries, 0);
  EXPECT_EQ(second.cached_tokens[2], 0);
  EXPECT_EQ(second.prefill_tokens, 50);
  EXPECT_EQ(e->kv_cache().allocator().num_cached(), 0);
}

}  // namespace
}  // namespace joule
