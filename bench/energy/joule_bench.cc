// joule-bench: an open-loop load generator for Joule's OpenAI API that reports
// throughput, interactivity, latency percentiles, SLO attainment and energy per
// output token per service tier (docs/benchmarks.md, "Energy per token").
//
//   joule-bench --url http://127.0.0.1:8000 --rate 8 --duration-s 60 --warmup-s 10
//     --tier-mix fast=0.1,priority=0.2,standard=0.4,batch=0.3
//     --prompt-len lognormal:256:0.6 --output-len uniform:32:256
//     --metrics-urls http://127.0.0.1:9400/metrics,http://127.0.0.1:9401/metrics
//     --out results/fcfs-rate8 --label fcfs
// Conversations over shared system prompts (what a prefix cache is for;
// bench/energy/prefix_sweep.sh runs them with the cache on and off):
//   joule-bench ... --shared-prefixes 4 --system-len uniform:1024:2048 --turns 3
//     --turn-len uniform:32:128 --turn-gap-s 8 --max-model-len 4096
//     --window-counters joule_prefix_cache_hits_total,joule_prefix_cache_queries_total
// Writes OUT.json and OUT.csv, prints a progress line every second on stderr.
#include <algorithm>
#include <cstdio>
#include <fstream>

#include "absl/strings/str_split.h"
#include "absl/strings/str_format.h"
#include "bench/energy/load_generator.h"
#include "bench/energy/report.h"
#include "bench/energy/workload.h"
#include "common/options.h"
#include "common/status.h"

namespace joule::bench {
namespace {

#define JOULE_BENCH_FLAGS(X)                                                                            \
  X(std::string, url, "http://127.0.0.1:8000", "coordinator base URL")                                \
  X(std::string, path, "/v1/completions", "completions endpoint path")                                \
  X(std::string, model, "joule", "the request's model field")                                          \
  X(double, rate, 4.0, "mean arrival rate, requests/s (Poisson)")                                      \
  X(double, duration_s, 30.0, "seconds of arrivals; the window ends here")                             \
  X(double, warmup_s, 5.0, "seconds excluded at the start (window start)")                             \
  X(double, drain_timeout_s, 60.0, "after the window, seconds to wait for in-flight requests")        \
  X(double, request_timeout_s, 600.0, "deadline of one request")                                       \
  X(int, max_inflight, 4096, "arrivals beyond this many open requests are dropped (and counted)")     \
  X(uint64_t, seed, 1, "workload seed (arrivals, tiers, lengths, prompts)")                            \
  X(std::string, tier_mix, "standard=1", "tier weights, e.g. fast=0.1,priority=0.2,standard=0.4,batch=0.3") \
  X(std::string, prompt_len, "fixed:128", "prompt tokens: fixed:N | uniform:MIN:MAX | lognormal:MEDIAN:SIGMA[:MAX], then optional per-tier overrides ,TIER=DIST") \
  X(std::string, output_len, "fixed:64", "max_tokens: same forms as --prompt-len")                     \
  X(int, shared_prefixes, 0, "conversations over this many shared system prompts (0: independent prompts of --prompt-len)") \
  X(std::string, system_len, "uniform:1024:2048", "tokens of each system prompt (with --shared-prefixes), same forms as --prompt-len without tiers") \
  X(int, turns, 1, "requests per conversation; turn k's prompt carries the earlier turns and synthetic answers") \
  X(std::string, turn_len, "uniform:32:128", "user tokens per turn (with --shared-prefixes)")           \
  X(double, turn_gap_s, 5.0, "seconds between a conversation's turns (open loop: no wait for the answer)") \
  X(int, max_model_len, 0, "refuse a workload whose longest prompt + max_tokens exceeds this (0: no check)") \
  X(bool, text_prompts, false, "send text prompts (~1 token per byte) instead of token ids")          \
  X(int, token_min, 32, "smallest prompt token id")                                                    \
  X(int, token_max, 126, "largest prompt token id")                                                    \
  X(bool, ignore_eos, false, "add \"ignore_eos\": true (a vLLM extension) so outputs run to max_tokens") \
  X(std::string, metrics_urls, "", "comma-separated Prometheus /metrics URLs whose energy counters are summed") \
  X(std::string, energy_metric, "joule_energy_joules_total", "the energy counter's name")             \
  X(std::string, window_counters, "", "more counters from --metrics-urls whose increase over the window is reported") \
  X(double, idle_s, 5.0, "seconds of idle-power measurement before the load (0: skip)")               \
  X(double, min_energy_window_s, 5.0, "warn when the energy window is shorter")                        \
  X(std::string, slo_ttft_ms, "fast=200,priority=500,standard=2000,batch=30000", "TTFT targets per tier") \
  X(std::string, slo_tpot_ms, "fast=20,priority=50,standard=100,batch=1000", "TPOT targets per tier")   \
  X(std::string, out, "", "write OUT.json and OUT.csv")                                                \
  X(std::string, label, "", "run label (e.g. the policy), copied into the outputs")                   \
  X(double, progress_s, 1.0, "seconds between progress lines (0: quiet)")                             \
  X(bool, dry_run, false, "print what the workload plans (requests, in the window, prompt tokens) and send nothing")

struct BenchConfig {
  JOULE_BENCH_FLAGS(JOULE_OPTION_FIELD)
  std::vector<Option> Options() { return {JOULE_BENCH_FLAGS(JOULE_OPTION_BIND)}; }
  absl::Status Validate() const {
    if (!(rate > 0)) return absl::InvalidArgumentError("rate must be > 0");
    if (!(duration_s > 0)) return absl::InvalidArgumentError("duration_s must be > 0");
    if (warmup_s < 0 || warmup_s >= duration_s) {
      return absl::InvalidArgumentError("warmup_s must be >= 0 and < duration_s");
    }
    if (drain_timeout_s < 0 || idle_s < 0 || progress_s < 0) {
      return absl::InvalidArgumentError("drain_timeout_s, idle_s and progress_s must be >= 0");
    }
    if (max_inflight < 1) return absl::InvalidArgumentError("max_inflight must be >= 1");
    if (token_min < 0 || token_max < token_min) {
      return absl::InvalidArgumentError("need 0 <= token_min <= token_max");
    }
    return absl::OkStatus();
  }
};

absl::Status Main(const BenchConfig& c, const std::string& command) {
  ASSIGN_OR_RETURN(Url target, ParseUrl(c.url + c.path, "url"));
  WorkloadSpec w;
  w.rate = c.rate;
  w.duration_s = c.duration_s;
  w.seed = c.seed;
  ASSIGN_OR_RETURN(w.mix, TierMix::Parse(c.tier_mix));
  ASSIGN_OR_RETURN(w.prompt_len, TieredLength::Parse(c.prompt_len, "prompt_len"));
  ASSIGN_OR_RETURN(w.output_len, TieredLength::Parse(c.output_len, "output_len"));
  w.text_prompts = c.text_prompts;
  w.token_min = c.token_min;
  w.token_max = c.token_max;
  w.conversations.shared_prefixes = c.shared_prefixes;
  ASSIGN_OR_RETURN(w.conversations.system_len, LengthDistribution::Parse(c.system_len, "--system-len"));
  w.conversations.turns = c.turns;
  ASSIGN_OR_RETURN(w.conversations.turn_len, LengthDistribution::Parse(c.turn_len, "--turn-len"));
  w.conversations.turn_gap_s = c.turn_gap_s;
  w.max_model_len = c.max_model_len;
  RETURN_IF_ERROR(ValidateWorkload(w));
  SloTargets slo;
  ASSIGN_OR_RETURN(slo.ttft_ms, ParseTierValues(c.slo_ttft_ms, "slo_ttft_ms"));
  ASSIGN_OR_RETURN(slo.tpot_ms, ParseTierValues(c.slo_tpot_ms, "slo_tpot_ms"));

  LoadConfig load;
  load.target = target;
  load.model = c.model;
  load.ignore_eos = c.ignore_eos;
  for (absl::string_view u : absl::StrSplit(c.metrics_urls, ',', absl::SkipWhitespace())) {
    ASSIGN_OR_RETURN(Url m, ParseUrl(std::string(u), "metrics_urls"));
    load.metrics.push_back(m);
  }
  load.energy_metric = c.energy_metric;
  for (absl::string_view name : absl::StrSplit(c.window_counters, ',', absl::SkipWhitespace())) {
    load.window_counters.emplace_back(name);
  }
  load.idle_s = c.idle_s;
  load.warmup_s = c.warmup_s;
  load.duration_s = c.duration_s;
  load.drain_timeout_s = c.drain_timeout_s;
  load.request_timeout_s = c.request_timeout_s;
  load.max_inflight = c.max_inflight;
  load.progress_s = c.progress_s;
  load.on_progress = [](const Progress& p) {
    std::fprintf(stderr,
                 "[joule-bench] %7.1fs  sent %6lld  done %6lld  errors %5lld  in flight %5lld  %6.2f req/s  %8.1f tok/s\n",
                 p.t_s, static_cast<long long>(p.sent), static_cast<long long>(p.done),
                 static_cast<long long>(p.errors), static_cast<long long>(p.inflight), p.rate, p.tokens_per_s);
  };

  const std::vector<PlannedRequest> plan = PlanWorkload(w);
  std::fprintf(stderr, "[joule-bench] %zu requests planned over %.1f s (%.2f req/s, mix %s)%s\n", plan.size(),
               c.duration_s, c.rate, w.mix.spec().c_str(),
               load.metrics.empty() ? ", no energy (--metrics-urls unset)" : "");
  if (c.shared_prefixes > 0) {
    const int conversations = plan.empty() ? 0
        : 1 + std::max_element(plan.begin(), plan.end(), [](const PlannedRequest& a, const PlannedRequest& b) {
                return a.conversation < b.conversation;
              })->conversation;
    std::fprintf(stderr, "[joule-bench] %d conversations of %d turns %.1f s apart over %d system prompts; "
                 "longest request %d tokens\n", conversations, c.turns, c.turn_gap_s, c.shared_prefixes,
                 LongestRequest(w));
    if (c.warmup_s < (c.turns - 1) * c.turn_gap_s) {
      std::fprintf(stderr, "[joule-bench] warning: --warmup-s %.1f < (turns - 1) x --turn-gap-s: the window starts "
                   "before conversations reach their later turns\n", c.warmup_s);
    }
  }
  if (c.dry_run) {
    int64_t in_window = 0, prompt_tokens = 0, output_tokens = 0;
    for (const PlannedRequest& r : plan) {
      in_window += (r.at_s >= c.warmup_s && r.at_s < c.duration_s) ? 1 : 0;
      prompt_tokens += r.prompt_tokens;
      output_tokens += r.max_tokens;
    }
    std::printf("requests %zu, in the window %lld, prompt tokens %lld, max_tokens %lld, longest request %d\n",
                plan.size(), static_cast<long long>(in_window), static_cast<long long>(prompt_tokens),
                static_cast<long long>(output_tokens), LongestRequest(w));
    return absl::OkStatus();
  }
  if (!load.metrics.empty() && c.idle_s > 0) {
    std::fprintf(stderr, "[joule-bench] measuring idle power for %.1f s\n", c.idle_s);
  }
  ASSIGN_OR_RETURN(RunResult run, RunLoad(load, plan));
  RunSummary s = Summarize(run, slo, c.min_energy_window_s);

  nlohmann::json meta = {{"label", c.label}, {"command", command}, {"url", c.url + c.path},
                         {"rate", c.rate}, {"duration_s", c.duration_s}, {"warmup_s", c.warmup_s},
                         {"seed", c.seed}, {"tier_mix", w.mix.spec()}, {"prompt_len", c.prompt_len},
                         {"output_len", c.output_len}, {"slo_ttft_ms", c.slo_ttft_ms},
                         {"slo_tpot_ms", c.slo_tpot_ms}, {"energy_metric", c.energy_metric},
                         {"metrics_urls", c.metrics_urls}, {"requests_planned", plan.size()}};
  if (c.shared_prefixes > 0) {
    meta["conversations"] = {{"shared_prefixes", c.shared_prefixes}, {"system_len", c.system_len},
                             {"turns", c.turns}, {"turn_len", c.turn_len}, {"turn_gap_s", c.turn_gap_s}};
  }
  const nlohmann::json doc = SummaryJson(s, meta);
  const std::string csv = SummaryCsv(s, c.label, c.rate);
  std::printf("%s", csv.c_str());
  for (const std::string& warning : s.warnings) std::fprintf(stderr, "[joule-bench] warning: %s\n", warning.c_str());
  if (s.window_joules) {
    std::fprintf(stderr, "[joule-bench] energy (%s): %.1f J over %.1f s, idle %.1f W, %.4g J/token (%.4g without idle)\n",
                 s.energy_source.c_str(), *s.window_joules, s.window_s, s.idle_watts.value_or(0),
                 s.all.j_per_token, s.all.j_per_token_excl_idle);
  }
  if (!c.out.empty()) {
    for (const auto& [suffix, text] : {std::pair<std::string, std::string>{".json", doc.dump(2) + "\n"},
                                       std::pair<std::string, std::string>{".csv", csv}}) {
      std::ofstream f(c.out + suffix);
      f << text;
      if (!f) return absl::UnavailableError(absl::StrCat("cannot write ", c.out, suffix));
    }
    std::fprintf(stderr, "[joule-bench] wrote %s.json and %s.csv\n", c.out.c_str(), c.out.c_str());
  }
  return absl::OkStatus();
}

}  // namespace
}  // namespace joule::bench

int main(int argc, char** argv) {
  absl::StatusOr<joule::bench::BenchConfig> config = joule::ParseConfig<joule::bench::BenchConfig>(
      "usage: joule-bench --url http://HOST:PORT --rate R --duration-s S [flags]", "JOULE_BENCH_", argc, argv);
  if (!config.ok()) return joule::ReportOptionsError("joule-bench", config.status());
  std::string command;
  for (int i = 0; i < argc; ++i) absl::StrAppend(&command, i ? " " : "", argv[i]);
  absl::Status s = joule::bench::Main(*config, command);
  if (!s.ok()) {
    std::fprintf(stderr, "joule-bench: %s\n", std::string(s.message()).c_str());
    return 1;
  }
  return 0;
}
