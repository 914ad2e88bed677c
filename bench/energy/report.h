// Turns a joule-bench run into the numbers of a benchmark row, per tier and for
// all tiers: throughput, interactivity (tokens/s/user = 1 / mean TPOT), latency
// percentiles, SLO attainment and energy per output token, with and without the
// idle power measured before the load.
#pragma once

#include <array>
#include <map>
#include <optional>
#include <string>

#include "bench/energy/load_generator.h"
#include "bench/energy/workload.h"
#include "nlohmann/json.hpp"

namespace joule::bench {

struct SloTargets {
  std::array<double, kNumTiers> ttft_ms;  // INFINITY: none
  std::array<double, kNumTiers> tpot_ms;
};

struct TierSummary {
  std::string tier;  // "fast" ... or "all"
  int64_t requests = 0;   // planned arrivals inside the window
  int64_t completed = 0;
  int64_t errors = 0;
  std::map<std::string, int64_t> errors_by_status;  // "429", "503", "client"
  double output_tokens = 0;  // generated inside the window (all requests)
  double throughput_tok_s = 0;
  double mean_tpot_ms = NAN;
  double interactivity_tok_s_user = NAN;
  double ttft_p50_ms = NAN, ttft_p99_ms = NAN;
  double tpot_p50_ms = NAN, tpot_p99_ms = NAN;
  double itl_p50_ms = NAN, itl_p99_ms = NAN;
  double e2e_p50_ms = NAN, e2e_p99_ms = NAN;
  double slo_attainment = NAN;  // met / requests
  // The two halves of it: requests within the TTFT target / requests, and
  // within the TPOT target / requests (errors miss both).
  double ttft_attainment = NAN, tpot_attainment = NAN;
  int64_t slo_met = 0, ttft_met = 0, tpot_met = 0;
  // Energy of this tier's tokens in the window (see docs/benchmarks.md).
  double joules = NAN, joules_excl_idle = NAN;
  double j_per_token = NAN, j_per_token_excl_idle = NAN;
  double tokens_per_joule = NAN, tokens_per_joule_excl_idle = NAN;
  double reported_energy_joules = NAN;  // sum of usage.energy_joules of requests completed in the window
};

struct RunSummary {
  double window_s = 0;
  std::optional<double> idle_watts;
  std::optional<double> window_joules;  // counter delta over the window
  std::string energy_source;            // "nvml", "rapl", "model (estimate)", "nvml+model (...)", ""
  std::string energy_split;             // "reported" (usage.energy_joules) or "tokens"
  // Increase over the window of each LoadConfig::window_counters counter that
  // both window scrapes found.
  std::map<std::string, double> window_counters;
  std::array<TierSummary, kNumTiers> tiers;
  TierSummary all;
  std::vector<std::string> warnings;
};

double Percentile(std::vector<double> values, double p);  // NAN if empty; linear interpolation

RunSummary Summarize(const RunResult& run, const SloTargets& slo, double min_energy_window_s = 5);

// The JSON document of a run (`meta` is copied in: command, label, workload).
nlohmann::json SummaryJson(const RunSummary& s, const nlohmann::json& meta);
// CSV: a header, then one row per tier with requests and one "all" row.
std::string SummaryCsv(const RunSummary& s, const std::string& label, double rate);

}  // namespace joule::bench
