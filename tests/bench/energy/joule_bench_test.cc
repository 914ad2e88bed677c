#include <algorithm>
#include <cmath>
#include <functional>
#include <map>
#include <numeric>
#include <set>

#include "bench/energy/load_generator.h"
#include "bench/energy/protocol.h"
#include "bench/energy/report.h"
#include "bench/energy/workload.h"
#include "absl/strings/str_join.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/bench/energy/fake_openai_server.h"

namespace joule::bench {
namespace {

using ::testing::DoubleNear;
using ::testing::HasSubstr;

WorkloadSpec Spec(double rate, double duration, const std::string& mix = "standard=1",
                  const std::string& out = "fixed:4", uint64_t seed = 7) {
  WorkloadSpec w;
  w.rate = rate;
  w.duration_s = duration;
  w.seed = seed;
  w.mix = *TierMix::Parse(mix);
  w.prompt_len = *TieredLength::Parse("fixed:8", "prompt_len");
  w.output_len = *TieredLength::Parse(out, "output_len");
  return w;
}

TEST(WorkloadTest, ArrivalsArePoissonAtTheRequestedRate) {
  const std::vector<PlannedRequest> plan = PlanWorkload(Spec(50, 200));  // ~10000 arrivals
  const double n = static_cast<double>(plan.size());
  EXPECT_NEAR(n, 10000, 4 * std::sqrt(10000.0));
  std::vector<double> gaps;
  for (size_t i = 1; i < plan.size(); ++i) {
    ASSERT_GE(plan[i].at_s, plan[i - 1].at_s);
    gaps.push_back(plan[i].at_s - plan[i - 1].at_s);
  }
  const double mean = std::accumulate(gaps.begin(), gaps.end(), 0.0) / gaps.size();
  double var = 0;
  for (double g : gaps) var += (g - mean) * (g - mean);
  var /= gaps.size();
  EXPECT_NEAR(mean, 0.02, 0.02 * 0.04);
  EXPECT_NEAR(std::sqrt(var) / mean, 1.0, 0.05);  // exponential gaps: CV 1
  // Counts per second: Poisson, variance == mean (a fixed-interval sender has ~0).
  std::vector<double> per_s(200, 0);
  for (const PlannedRequest& r : plan) per_s[static_cast<int>(r.at_s)] += 1;
  double m = n / 200, v = 0;
  for (double c : per_s) v += (c - m) * (c - m);
  v /= 200;
  EXPECT_NEAR(v / m, 1.0, 0.35);
}

TEST(WorkloadTest, SameSeedSameWorkloadAndTheMixDoesNotMoveArrivals) {
  const auto a = PlanWorkload(Spec(20, 5, "standard=1", "fixed:4", 3));
  const auto b = PlanWorkload(Spec(20, 5, "fast=0.5,batch=0.5", "uniform:1:9", 3));
  const auto c = PlanWorkload(Spec(20, 5, "standard=1", "fixed:4", 4));
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) EXPECT_EQ(a[i].at_s, b[i].at_s);
  EXPECT_NE(a.front().at_s, c.front().at_s);
  EXPECT_EQ(a.front().prompt, PlanWorkload(Spec(20, 5, "standard=1", "fixed:4", 3)).front().prompt);
}

TEST(WorkloadTest, TierMixProportions) {
  const auto plan = PlanWorkload(Spec(100, 200, "fast=0.1,priority=0.2,standard=0.4,batch=0.3"));
  std::array<double, kNumTiers> count{};
  for (const PlannedRequest& r : plan) count[static_cast<int>(r.tier)] += 1;
  const double n = static_cast<double>(plan.size());
  EXPECT_NEAR(count[0] / n, 0.1, 0.01);
  EXPECT_NEAR(count[1] / n, 0.2, 0.01);
  EXPECT_NEAR(count[2] / n, 0.4, 0.015);
  EXPECT_NEAR(count[3] / n, 0.3, 0.015);
  // API names are accepted and mean the same tiers; weights need not sum to 1.
  TierMix mix = *TierMix::Parse("default=2, flex=2");
  EXPECT_DOUBLE_EQ(mix.fraction(Tier::kStandard), 0.5);
  EXPECT_DOUBLE_EQ(mix.fraction(Tier::kBatch), 0.5);
  EXPECT_EQ(TierApiValue(Tier::kBatch), "flex");
  EXPECT_EQ(TierApiValue(Tier::kStandard), "default");
  absl::StatusOr<TierMix> bad = TierMix::Parse("fast=0.5,gold=0.5");
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(bad.status().message(), HasSubstr("tier_mix"));
  EXPECT_THAT(bad.status().message(), HasSubstr("gold"));
  EXPECT_FALSE(TierMix::Parse("fast=0").ok());
}

TEST(WorkloadTest, LengthDistributions) {
  std::mt19937_64 rng(1);
  auto fixed = *LengthDistribution::Parse("fixed:7", "output_len");
  EXPECT_EQ(fixed.Sample(rng), 7);
  auto uni = *LengthDistribution::Parse("uniform:10:20", "output_len");
  double sum = 0;
  for (int i = 0; i < 10000; ++i) {
    const int x = uni.Sample(rng);
    ASSERT_GE(x, 10);
    ASSERT_LE(x, 20);
    sum += x;
  }
  EXPECT_NEAR(sum / 10000, 15, 0.2);
  auto logn = *LengthDistribution::Parse("lognormal:100:0.5:400", "prompt_len");
  std::vector<double> xs;
  for (int i = 0; i < 10000; ++i) xs.push_back(logn.Sample(rng));
  EXPECT_NEAR(Percentile(xs, 50), 100, 5);
  EXPECT_LE(*std::max_element(xs.begin(), xs.end()), 400);
  for (const char* bad : {"fixed:0", "uniform:5:2", "gauss:1:2", "lognormal:x:1", "fixed"}) {
    absl::StatusOr<LengthDistribution> d = LengthDistribution::Parse(bad, "prompt_len");
    ASSERT_FALSE(d.ok()) << bad;
    EXPECT_THAT(d.status().message(), HasSubstr("prompt_len")) << bad;
  }
}

TEST(WorkloadTest, PerTierLengthsOverrideOnlyTheirTier) {
  WorkloadSpec w = Spec(100, 20, "fast=0.5,batch=0.5", "fixed:4");
  WorkloadSpec tiered = w;
  tiered.prompt_len = *TieredLength::Parse("fixed:8, batch=uniform:700:900", "prompt_len");
  tiered.output_len = *TieredLength::Parse("fixed:4,fast=fixed:16", "output_len");
  const auto plain = PlanWorkload(w);
  const auto plan = PlanWorkload(tiered);
  ASSERT_EQ(plan.size(), plain.size());
  int batch = 0, fast = 0;
  for (size_t i = 0; i < plan.size(); ++i) {
    // Lengths have their own random stream: arrivals and tiers do not move.
    ASSERT_EQ(plan[i].at_s, plain[i].at_s);
    ASSERT_EQ(plan[i].tier, plain[i].tier);
    if (plan[i].tier == Tier::kBatch) {
      ++batch;
      ASSERT_GE(plan[i].prompt_tokens, 700);
      ASSERT_LE(plan[i].prompt_tokens, 900);
      ASSERT_EQ(plan[i].prompt.size(), static_cast<size_t>(plan[i].prompt_tokens));
      ASSERT_EQ(plan[i].max_tokens, 4);
    } else {
      ++fast;
      ASSERT_EQ(plan[i].prompt_tokens, 8);
      ASSERT_EQ(plan[i].max_tokens, 16);
    }
  }
  EXPECT_GT(batch, 500);
  EXPECT_GT(fast, 500);
  EXPECT_EQ(tiered.prompt_len.spec(), "fixed:8, batch=uniform:700:900");

  struct Bad {
    const char* spec;
    const char* why;
  };
  for (const Bad& bad : {Bad{"batch=fixed:9", "one distribution without a tier"},
                         Bad{"fixed:1,fixed:2", "more than one distribution without a tier"},
                         Bad{"fixed:1,batch=fixed:2,flex=fixed:3", "named twice"},
                         Bad{"fixed:1,urgent=fixed:2", "unknown tier 'urgent'"},
                         Bad{"fixed:1,batch=uniform:9:2", "MIN <= MAX"}}) {
    absl::StatusOr<TieredLength> d = TieredLength::Parse(bad.spec, "prompt_len");
    ASSERT_FALSE(d.ok()) << bad.spec;
    EXPECT_THAT(d.status().message(), HasSubstr("prompt_len")) << bad.spec;
    EXPECT_THAT(d.status().message(), HasSubstr(bad.why)) << bad.spec;
  }
}

// Conversations over `prefixes` system prompts: 100-200 token system prompts,
// 5-20 user tokens a turn, 3-9 answer tokens, turns 1 s apart.
WorkloadSpec ConversationSpecFor(double rate, double duration, int prefixes, int turns, uint64_t seed = 7) {
  WorkloadSpec w = Spec(rate, duration, "fast=0.5,batch=0.5", "uniform:3:9", seed);
  w.conversations.shared_prefixes = prefixes;
  w.conversations.system_len = *LengthDistribution::Parse("uniform:100:200", "--system-len");
  w.conversations.turns = turns;
  w.conversations.turn_len = *LengthDistribution::Parse("uniform:5:20", "--turn-len");
  w.conversations.turn_gap_s = 1.0;
  return w;
}

size_t CommonPrefix(const std::vector<int32_t>& a, const std::vector<int32_t>& b) {
  return std::mismatch(a.begin(), a.begin() + std::min(a.size(), b.size()), b.begin()).first - a.begin();
}

bool StartsWith(const std::vector<int32_t>& whole, const std::vector<int32_t>& prefix) {
  return whole.size() >= prefix.size() && std::equal(prefix.begin(), prefix.end(), whole.begin());
}

TEST(ConversationWorkloadTest, EachTurnExtendsThePreviousTurnsPrompt) {
  const WorkloadSpec w = ConversationSpecFor(20, 200, 3, 4);
  ASSERT_TRUE(ValidateWorkload(w).ok());
  const std::vector<PlannedRequest> plan = PlanWorkload(w);
  // Requests still arrive at `rate`: conversations start at rate / turns (about
  // 1000 of them, +-32), less the turns that fall past the end (~30).
  EXPECT_NEAR(static_cast<double>(plan.size()), 20 * 200 - 30, 400);
  std::map<int, std::vector<const PlannedRequest*>> by_conversation;
  for (size_t i = 0; i < plan.size(); ++i) {
    if (i > 0) {
      ASSERT_GE(plan[i].at_s, plan[i - 1].at_s);  // arrival order
    }
    ASSERT_GE(plan[i].conversation, 0);
    by_conversation[plan[i].conversation].push_back(&plan[i]);
  }
  int full = 0;
  for (const auto& [id, turns] : by_conversation) {
    ASSERT_EQ(turns.front()->turn, 0) << id;
    full += turns.size() == 4 ? 1 : 0;
    for (size_t k = 1; k < turns.size(); ++k) {
      const PlannedRequest& prev = *turns[k - 1];
      const PlannedRequest& cur = *turns[k];
      ASSERT_EQ(cur.turn, static_cast<int>(k));
      ASSERT_NEAR(cur.at_s - prev.at_s, 1.0, 1e-9);
      ASSERT_EQ(cur.tier, prev.tier);
      ASSERT_EQ(cur.system_prompt, prev.system_prompt);
      // The previous prompt, its (synthetic) answer of max_tokens, then 5-20 user tokens.
      ASSERT_TRUE(StartsWith(cur.prompt, prev.prompt)) << id << " turn " << k;
      const int added = cur.prompt_tokens - prev.prompt_tokens - prev.max_tokens;
      ASSERT_GE(added, 5);
      ASSERT_LE(added, 20);
    }
    for (const PlannedRequest* r : turns) {
      ASSERT_EQ(r->prompt.size(), static_cast<size_t>(r->prompt_tokens));
      ASSERT_GE(r->max_tokens, 3);
      ASSERT_LE(r->max_tokens, 9);
      ASSERT_TRUE(std::all_of(r->prompt.begin(), r->prompt.end(), [](int32_t id) { return id >= 32 && id <= 126; }));
    }
  }
  EXPECT_GT(full, 900);
  // The longest request the flags allow bounds every planned one.
  for (const PlannedRequest& r : plan) ASSERT_LE(r.prompt_tokens + r.max_tokens, LongestRequest(w));
  EXPECT_EQ(LongestRequest(w), 200 + 4 * (20 + 9));
}

TEST(ConversationWorkloadTest, ConversationsShareTheirSystemPromptAndOnlyThat) {
  const std::vector<PlannedRequest> plan = PlanWorkload(ConversationSpecFor(10, 60, 3, 2));
  std::map<int, std::vector<const PlannedRequest*>> first_turns;  // by system prompt
  for (const PlannedRequest& r : plan) {
    if (r.turn == 0) first_turns[r.system_prompt].push_back(&r);
  }
  ASSERT_EQ(first_turns.size(), 3u);  // every system prompt is picked
  std::vector<size_t> system_len;
  for (const auto& [system, turns] : first_turns) {
    ASSERT_GE(turns.size(), 10u) << system;
    // Two conversations on one system prompt share exactly it (their user
    // tokens are independent), so the shortest common prefix is its length.
    size_t shortest = SIZE_MAX;
    for (size_t i = 1; i < turns.size(); ++i) {
      shortest = std::min(shortest, CommonPrefix(turns[0]->prompt, turns[i]->prompt));
    }
    EXPECT_GE(shortest, 100u) << system;
    EXPECT_LE(shortest, 200u) << system;
    system_len.push_back(shortest);
  }
  EXPECT_FALSE(system_len[0] == system_len[1] && system_len[1] == system_len[2]);  // drawn, not fixed
  // Distinct system prompts differ from their first tokens: not one KV block in common.
  for (const auto& [a, turns_a] : first_turns) {
    for (const auto& [b, turns_b] : first_turns) {
      if (a != b) {
        EXPECT_LT(CommonPrefix(turns_a[0]->prompt, turns_b[0]->prompt), 4u) << a << " " << b;
      }
    }
  }
  // Without --shared-prefixes, no two prompts share a first block.
  const std::vector<PlannedRequest> independent = PlanWorkload(Spec(50, 20));
  ASSERT_GT(independent.size(), 500u);
  std::set<std::vector<int32_t>> first_blocks;
  for (const PlannedRequest& r : independent) {
    ASSERT_EQ(r.conversation, -1);
    first_blocks.insert(std::vector<int32_t>(r.prompt.begin(), r.prompt.begin() + 8));
  }
  EXPECT_EQ(first_blocks.size(), independent.size());
}

TEST(ConversationWorkloadTest, SameSeedSamePlan) {
  auto same = [](const std::vector<PlannedRequest>& a, const std::vector<PlannedRequest>& b) {
    if (a.size() != b.size()) return false;
    for (size_t i = 0; i < a.size(); ++i) {
      if (a[i].at_s != b[i].at_s || a[i].prompt != b[i].prompt || a[i].max_tokens != b[i].max_tokens ||
          a[i].tier != b[i].tier || a[i].conversation != b[i].conversation || a[i].turn != b[i].turn) {
        return false;
      }
    }
    return true;
  };
  const auto a = PlanWorkload(ConversationSpecFor(10, 30, 4, 3, 5));
  ASSERT_GT(a.size(), 100u);
  EXPECT_TRUE(same(a, PlanWorkload(ConversationSpecFor(10, 30, 4, 3, 5))));
  EXPECT_FALSE(same(a, PlanWorkload(ConversationSpecFor(10, 30, 4, 3, 6))));
  // A longer run sends the same conversations first: the duration moves nothing.
  const auto longer = PlanWorkload(ConversationSpecFor(10, 40, 4, 3, 5));
  std::vector<PlannedRequest> head;
  for (const PlannedRequest& r : longer) {
    if (r.at_s < 30) head.push_back(r);
  }
  EXPECT_TRUE(same(a, head));
}

TEST(ConversationWorkloadTest, BadFlagsAreRefusedByName) {
  struct Case {
    std::function<void(WorkloadSpec*)> change;
    const char* flag;
    const char* why;
  };
  const std::vector<Case> cases = {
      {[](WorkloadSpec* w) { w->conversations.shared_prefixes = -1; }, "--shared-prefixes", ">= 0"},
      {[](WorkloadSpec* w) { w->conversations.turns = 0; }, "--turns", ">= 1"},
      {[](WorkloadSpec* w) { w->conversations.shared_prefixes = 0; }, "--turns", "--shared-prefixes > 0"},
      {[](WorkloadSpec* w) { w->conversations.turn_gap_s = -1; }, "--turn-gap-s", ">= 0"},
      {[](WorkloadSpec* w) { w->conversations.turn_gap_s = NAN; }, "--turn-gap-s", ">= 0"},
      {[](WorkloadSpec* w) { w->text_prompts = true; }, "--text-prompts", "token ids"},
      {[](WorkloadSpec* w) { w->max_model_len = -5; }, "--max-model-len", ">= 0"},
      // 200 + 4 x (20 + 9) = 316 tokens at most.
      {[](WorkloadSpec* w) { w->max_model_len = 315; }, "--max-model-len", "316"},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    WorkloadSpec w = ConversationSpecFor(10, 30, 4, 4);
    cases[i].change(&w);
    const absl::Status s = ValidateWorkload(w);
    ASSERT_FALSE(s.ok()) << i;
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << i;
    EXPECT_THAT(s.message(), HasSubstr(cases[i].flag)) << i;
    EXPECT_THAT(s.message(), HasSubstr(cases[i].why)) << i;
  }
  WorkloadSpec fits = ConversationSpecFor(10, 30, 4, 4);
  fits.max_model_len = 316;
  EXPECT_TRUE(ValidateWorkload(fits).ok());
  // Independent prompts: --prompt-len max + --output-len max.
  WorkloadSpec plain = Spec(10, 30, "standard=1", "uniform:1:50");
  plain.max_model_len = 58;  // fixed:8 + uniform:1:50
  EXPECT_TRUE(ValidateWorkload(plain).ok());
  plain.max_model_len = 58 - 1;
  EXPECT_THAT(ValidateWorkload(plain).message(), HasSubstr("--prompt-len max + --output-len max"));
  EXPECT_THAT(LengthDistribution::Parse("uniform:2048:1024", "--system-len").status().message(),
              HasSubstr("--system-len"));
}

TEST(SseParserTest, EventsSurviveAnySplitOfTheBytes) {
  const std::string stream =
      ": keep-alive\r\n\r\ndata: {\"a\":1}\r\n\r\ndata: line1\ndata: line2\n\nevent: x\ndata: [DONE]\n\n";
  for (size_t split = 1; split < stream.size(); ++split) {
    std::vector<std::string> events;
    SseParser p([&](std::string_view d) { events.emplace_back(d); });
    p.Feed(std::string_view(stream).substr(0, split));
    p.Feed(std::string_view(stream).substr(split));
    ASSERT_EQ(events, (std::vector<std::string>{"{\"a\":1}", "line1\nline2", "[DONE]"})) << split;
  }
}

TEST(ProtocolTest, SumsACounterOverSeriesAndReadsSources) {
  const std::string text =
      "# HELP joule_energy_joules_total Energy\n# TYPE joule_energy_joules_total counter\n"
      "joule_energy_joules_total{rank=\"0\",source=\"nvml\"} 100.5\n"
      "joule_energy_joules_total{source=\"nvml\",rank=\"1\"} 1e3 1700000000000\n"
      "joule_energy_joules_total_created{source=\"nvml\"} 5\n"
      "other_metric 9\n";
  absl::StatusOr<CounterSum> s = SumCounter(text, "joule_energy_joules_total");
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_DOUBLE_EQ(s->value, 1100.5);
  EXPECT_EQ(s->series, 2);
  EXPECT_EQ(s->sources, (std::set<std::string>{"nvml"}));
  EXPECT_EQ(SumCounter(text, "joule_power_watts").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(SumCounter("plain 3\n", "plain")->value, 3);
  auto url = ParseUrl("http://host:9400/metrics", "metrics_urls");
  ASSERT_TRUE(url.ok());
  EXPECT_EQ(url->host, "host");
  EXPECT_EQ(url->port, "9400");
  EXPECT_EQ(url->target, "/metrics");
  EXPECT_THAT(ParseUrl("https://x", "url").status().message(), HasSubstr("url"));
}

TEST(ReportTest, LatenciesFromKnownChunkTimes) {
  RunResult run;
  run.window_start_s = 1;
  run.window_end_s = 11;
  auto req = [](Tier tier, double at, double ttft, double itl, int n) {
    RequestRecord r;
    r.tier = tier;
    r.scheduled_s = at;
    r.http_status = 200;
    for (int i = 0; i < n; ++i) r.chunk_s.push_back(at + ttft + i * itl);
    r.done_s = r.chunk_s.back() + 0.001;
    r.usage_completion_tokens = n;
    return r;
  };
  run.requests.push_back(req(Tier::kFast, 0.5, 0.1, 0.01, 10));  // warm-up: no latency stats
  run.requests.push_back(req(Tier::kFast, 2, 0.1, 0.01, 11));
  run.requests.push_back(req(Tier::kFast, 3, 0.3, 0.03, 11));
  run.requests.push_back(req(Tier::kStandard, 4, 0.5, 0.05, 21));
  RequestRecord err;
  err.tier = Tier::kStandard;
  err.scheduled_s = 5;
  err.http_status = 429;
  err.error = "HTTP 429";
  run.requests.push_back(err);
  SloTargets slo;
  slo.ttft_ms.fill(INFINITY);
  slo.tpot_ms.fill(INFINITY);
  slo.ttft_ms[0] = 200;  // the first fast request meets it, the second does not
  slo.tpot_ms[0] = 50;
  RunSummary s = Summarize(run, slo);
  const TierSummary& fast = s.tiers[0];
  EXPECT_EQ(fast.requests, 2);
  EXPECT_EQ(fast.completed, 2);
  EXPECT_NEAR(fast.ttft_p50_ms, 200, 1e-6);  // median of 100 and 300
  EXPECT_NEAR(fast.mean_tpot_ms, 20, 1e-6);
  EXPECT_NEAR(fast.interactivity_tok_s_user, 50, 1e-6);
  EXPECT_DOUBLE_EQ(fast.slo_attainment, 0.5);
  EXPECT_DOUBLE_EQ(fast.ttft_attainment, 0.5);  // the second missed TTFT only
  EXPECT_DOUBLE_EQ(fast.tpot_attainment, 1.0);
  // Tokens in the window [1, 11]: all of the last three, none of the warm-up one.
  EXPECT_NEAR(fast.output_tokens, 22, 1e-9);
  EXPECT_NEAR(fast.throughput_tok_s, 2.2, 1e-9);
  const TierSummary& standard = s.tiers[2];
  EXPECT_EQ(standard.requests, 2);
  EXPECT_EQ(standard.errors, 1);
  EXPECT_EQ(standard.errors_by_status.at("429"), 1);
  EXPECT_DOUBLE_EQ(standard.slo_attainment, 0.5);  // no target, but the error misses it
  EXPECT_NEAR(standard.tpot_p50_ms, 50, 1e-6);
  EXPECT_EQ(s.all.requests, 4);
  EXPECT_DOUBLE_EQ(s.all.slo_attainment, 0.5);  // 1 of 2 fast + 1 of 2 standard
  EXPECT_DOUBLE_EQ(s.all.ttft_attainment, 0.5);
  EXPECT_DOUBLE_EQ(s.all.tpot_attainment, 0.75);  // only the error misses TPOT
  EXPECT_FALSE(s.window_joules.has_value());

  // Energy: 100 W idle measured before; 1500 J in the 10 s window -> 500 J active.
  run.idle_start = EnergySample{-5, 0, {"rapl"}};
  run.idle_end = EnergySample{-1, 400, {"rapl"}};
  run.window_start = EnergySample{1, 1000, {"rapl"}};
  run.window_end = EnergySample{11, 2500, {"rapl"}};
  s = Summarize(run, slo);
  EXPECT_DOUBLE_EQ(*s.idle_watts, 100);
  EXPECT_DOUBLE_EQ(*s.window_joules, 1500);
  EXPECT_EQ(s.energy_source, "rapl");
  EXPECT_NEAR(s.all.j_per_token, 1500.0 / 43, 1e-9);
  EXPECT_NEAR(s.all.j_per_token_excl_idle, 500.0 / 43, 1e-9);
  EXPECT_NEAR(s.all.tokens_per_joule, 43 / 1500.0, 1e-12);
  EXPECT_EQ(s.energy_split, "tokens");
  EXPECT_NEAR(s.tiers[0].joules, 1500.0 * 22 / 43, 1e-9);

  // Window counters: the increase of those both window scrapes found.
  run.window_start->counters = {{"hits_total", 10}, {"queries_total", 100}};
  run.window_end->counters = {{"hits_total", 70}, {"queries_total", 180}, {"late_total", 3}};
  s = Summarize(run, slo);
  EXPECT_EQ(s.window_counters, (std::map<std::string, double>{{"hits_total", 60}, {"queries_total", 80}}));
  EXPECT_EQ(SummaryJson(s, {})["window_counters"]["hits_total"], 60);
}

double Median(std::vector<double> v) {
  if (v.empty()) return NAN;
  std::sort(v.begin(), v.end());
  return v.size() % 2 ? v[v.size() / 2] : (v[v.size() / 2 - 1] + v[v.size() / 2]) / 2;
}

TEST(LoadGeneratorTest, AgainstAFakeServer) {
  testing::FakeServerOptions options;
  options.ttft = std::chrono::milliseconds(60);
  options.itl = std::chrono::milliseconds(15);
  options.reject = {{"flex", 429}};
  options.idle_watts = 100;
  options.joules_per_token = 0.5;
  testing::FakeOpenAiServer server(options);

  const std::vector<PlannedRequest> plan = PlanWorkload(Spec(30, 2.5, "standard=0.5,batch=0.5", "fixed:6"));
  LoadConfig c;
  c.target = *ParseUrl(server.url() + "/v1/completions", "url");
  c.metrics = {*ParseUrl(server.url() + "/metrics", "metrics_urls")};
  c.idle_s = 1.2;  // long enough that a late scrape moves the idle power by < 2%
  c.warmup_s = 0.5;
  c.duration_s = 2.5;
  c.drain_timeout_s = 10;
  c.progress_s = 0.5;
  int progress_lines = 0;
  c.on_progress = [&](const Progress& p) { ++progress_lines; };
  absl::StatusOr<RunResult> run = RunLoad(c, plan);
  ASSERT_TRUE(run.ok()) << run.status();
  EXPECT_THAT(run->warnings, ::testing::IsEmpty());
  EXPECT_GE(progress_lines, 3);

  // Every planned request reached the server with its tier's API name.
  ASSERT_EQ(run->requests.size(), plan.size());
  std::vector<std::string> tiers = server.tiers_seen();
  EXPECT_EQ(tiers.size(), plan.size());
  EXPECT_EQ(std::count(tiers.begin(), tiers.end(), "flex") + std::count(tiers.begin(), tiers.end(), "default"),
            static_cast<long>(plan.size()));

  SloTargets slo;
  slo.ttft_ms.fill(INFINITY);
  slo.tpot_ms.fill(INFINITY);
  slo.ttft_ms[2] = 1000;
  RunSummary s = Summarize(*run, slo, /*min_energy_window_s=*/1);
  const TierSummary& standard = s.tiers[static_cast<int>(Tier::kStandard)];
  const TierSummary& batch = s.tiers[static_cast<int>(Tier::kBatch)];
  ASSERT_GT(standard.requests, 5);
  ASSERT_GT(batch.requests, 5);
  EXPECT_EQ(standard.errors, 0);
  EXPECT_EQ(batch.completed, 0);
  EXPECT_EQ(batch.errors, batch.requests);
  EXPECT_EQ(batch.errors_by_status.at("429"), batch.requests);
  for (const RequestRecord& r : run->requests) {
    if (r.tier == Tier::kBatch) {
      EXPECT_THAT(r.error, HasSubstr("tier queue full"));
    } else {
      EXPECT_EQ(r.output_tokens(), 6);
    }
  }
  // Latencies: at least the server's configured delays, and what the server actually served
  // (its timers run late on a busy machine; the client sees its chunks a little after they
  // were written, never before). Only standard requests streamed: batch was refused.
  EXPECT_GE(standard.ttft_p50_ms, 59);
  EXPECT_GE(standard.tpot_p50_ms, 14);
  const double served_ttft = Median(server.served_ttft_ms());
  const double served_tpot = Median(server.served_tpot_ms());
  std::printf("TTFT p50 %.1f ms (served %.1f), TPOT p50 %.2f ms (served %.2f)\n", standard.ttft_p50_ms,
              served_ttft, standard.tpot_p50_ms, served_tpot);
  EXPECT_GE(standard.ttft_p50_ms, served_ttft - 1);
  EXPECT_LT(standard.ttft_p50_ms, served_ttft + 20);
  EXPECT_NEAR(standard.tpot_p50_ms, served_tpot, 3);
  EXPECT_NEAR(standard.interactivity_tok_s_user, 1000.0 / standard.mean_tpot_ms, 1e-9);
  EXPECT_DOUBLE_EQ(standard.slo_attainment, 1.0);

  // Energy: idle power from the pre-load measurement, and 0.5 J per token above it.
  ASSERT_TRUE(s.idle_watts.has_value());
  EXPECT_NEAR(*s.idle_watts, 100, 5);
  ASSERT_TRUE(s.window_joules.has_value());
  EXPECT_EQ(s.energy_source, "model (estimate)");
  EXPECT_NEAR(s.all.j_per_token_excl_idle, 0.5, 0.1);
  EXPECT_GT(s.all.j_per_token, s.all.j_per_token_excl_idle);
  EXPECT_EQ(s.energy_split, "reported");  // every finished request carried usage.energy_joules
  EXPECT_NEAR(standard.j_per_token_excl_idle, 0.5, 0.1);  // batch produced no tokens

  // The outputs: CSV rows for the tiers that had requests plus "all"; JSON with
  // nulls (not NaN) where a number does not exist (batch has no latencies).
  const std::string csv = SummaryCsv(s, "fake", 30);
  std::printf("%s", csv.c_str());  // the measured numbers, for the log
  EXPECT_EQ(std::count(csv.begin(), csv.end(), '\n'), 4);
  EXPECT_THAT(csv, HasSubstr("\nfake,30,standard,"));
  const nlohmann::json doc = SummaryJson(s, {{"label", "fake"}});
  ASSERT_EQ(doc["tiers"].size(), 2u);
  EXPECT_EQ(doc["tiers"][1]["tier"], "batch");
  EXPECT_TRUE(doc["tiers"][1]["ttft_ms"]["p50"].is_null());
  EXPECT_EQ(doc["energy"]["source"], "model (estimate)");
  EXPECT_EQ(nlohmann::json::parse(doc.dump())["all"]["requests"], s.all.requests);
}

TEST(LoadGeneratorTest, SendsConversationsAndReadsWindowCounters) {
  testing::FakeOpenAiServer server({.ttft = std::chrono::milliseconds(5), .itl = std::chrono::milliseconds(2)});
  const std::vector<PlannedRequest> plan = PlanWorkload(ConversationSpecFor(40, 2.5, 2, 3));
  ASSERT_GT(plan.size(), 30u);
  LoadConfig c;
  c.target = *ParseUrl(server.url() + "/v1/completions", "url");
  c.metrics = {*ParseUrl(server.url() + "/metrics", "metrics_urls")};
  c.window_counters = {"fake_prompt_tokens_total", "absent_total"};
  c.idle_s = 0;
  c.warmup_s = 0.5;
  c.duration_s = 2.5;
  c.drain_timeout_s = 10;
  absl::StatusOr<RunResult> run = RunLoad(c, plan);
  ASSERT_TRUE(run.ok()) << run.status();
  // Every turn went out as token ids, exactly as planned.
  std::multiset<std::vector<int32_t>> planned, seen;
  for (const PlannedRequest& r : plan) planned.insert(r.prompt);
  for (const std::vector<int32_t>& p : server.prompts_seen()) seen.insert(p);
  EXPECT_TRUE(planned == seen);
  // A counter the server serves is read at both window edges; one it lacks is
  // left out, with a warning naming it.
  SloTargets slo;
  slo.ttft_ms.fill(INFINITY);
  slo.tpot_ms.fill(INFINITY);
  const RunSummary s = Summarize(*run, slo, /*min_energy_window_s=*/1);
  ASSERT_EQ(s.window_counters.count("fake_prompt_tokens_total"), 1u);
  EXPECT_EQ(s.window_counters.count("absent_total"), 0u);
  const double increase = s.window_counters.at("fake_prompt_tokens_total");
  double total = 0;
  for (const PlannedRequest& r : plan) total += r.prompt_tokens;
  EXPECT_GT(increase, 0);
  EXPECT_LE(increase, total);
  EXPECT_LE(run->window_end->counters.at("fake_prompt_tokens_total"), total);
  EXPECT_THAT(absl::StrJoin(run->warnings, "\n"), HasSubstr("absent_total"));
}

TEST(LoadGeneratorTest, ConnectionRefusedIsCountedNotFatal) {
  // A port that was just free: nothing listens there.
  int port = 0;
  {
    testing::FakeOpenAiServer probe({});
    port = probe.port();
  }
  LoadConfig c;
  c.target = *ParseUrl(absl::StrCat("http://127.0.0.1:", port, "/v1/completions"), "url");
  c.warmup_s = 0;
  c.duration_s = 0.3;
  c.drain_timeout_s = 2;
  const auto plan = PlanWorkload(Spec(50, 0.3));
  absl::StatusOr<RunResult> run = RunLoad(c, plan);
  ASSERT_TRUE(run.ok()) << run.status();
  SloTargets slo;
  slo.ttft_ms.fill(INFINITY);
  slo.tpot_ms.fill(INFINITY);
  RunSummary s = Summarize(*run, slo);
  EXPECT_EQ(s.all.errors, static_cast<int64_t>(plan.size()));
  EXPECT_EQ(s.all.errors_by_status.at("connection"), static_cast<int64_t>(plan.size()));
  EXPECT_THAT(run->requests.front().error, HasSubstr("connect"));
}

}  // namespace
}  // namespace joule::bench
