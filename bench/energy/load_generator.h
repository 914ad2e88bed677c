// The open-loop client of joule-bench: sends the planned requests at their
// arrival times whatever the server's state (no coordinated omission: latencies
// are measured from the planned arrival), reads each SSE stream, and reads the
// cluster's energy counter before the load (idle power) and at the edges of the
// steady-state window. One thread, one io_context, C++20 coroutines.
#pragma once

#include <cmath>
#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "bench/energy/protocol.h"
#include "bench/energy/workload.h"

namespace joule::bench {

// One request as the client saw it. Times are seconds since the load started.
struct RequestRecord {
  Tier tier = Tier::kStandard;
  double scheduled_s = 0;  // planned arrival; latencies start here
  double sent_s = -1;      // request written
  int prompt_tokens = 0;   // as planned
  int max_tokens = 0;
  int http_status = 0;     // 0: no response
  std::string error;       // empty: finished with [DONE]
  std::vector<double> chunk_s;  // arrival of every chunk that carried text
  double done_s = -1;           // [DONE] (or the end of the stream)
  int64_t usage_prompt_tokens = -1;
  int64_t usage_completion_tokens = -1;
  double energy_joules = NAN;  // usage.energy_joules, when the server reports it

  bool ok() const { return error.empty() && done_s >= 0; }
  // usage.completion_tokens if reported, else the number of text chunks.
  int64_t output_tokens() const {
    return usage_completion_tokens >= 0 ? usage_completion_tokens : static_cast<int64_t>(chunk_s.size());
  }
  double ttft_s() const { return chunk_s.empty() ? NAN : chunk_s.front() - scheduled_s; }
  // Time per output token after the first: (last - first) / (tokens - 1).
  double tpot_s() const {
    const int64_t n = output_tokens();
    return (chunk_s.size() < 2 || n < 2) ? NAN : (chunk_s.back() - chunk_s.front()) / static_cast<double>(n - 1);
  }
  double e2e_s() const { return done_s < 0 ? NAN : done_s - scheduled_s; }
};

// One read of the energy counter, summed over every metrics URL.
struct EnergySample {
  double t_s = 0;  // midpoint of the scrape, seconds since the load started (< 0: before)
  double joules = 0;
  std::set<std::string> sources;
  // LoadConfig::window_counters, summed over every URL (window scrapes only;
  // one that some URL lacks is left out).
  std::map<std::string, double> counters;
};

struct Progress {
  double t_s = 0;
  int64_t sent = 0, done = 0, errors = 0, inflight = 0;
  double rate = 0;           // requests sent per second over the last interval
  double tokens_per_s = 0;   // text chunks per second over the last interval
};

struct LoadConfig {
  Url target;                     // POST /v1/completions
  std::string model = "joule";
  bool ignore_eos = false;        // send "ignore_eos": true (a vLLM extension)
  std::vector<Url> metrics;       // empty: no energy
  std::string energy_metric = "joule_energy_joules_total";
  // More counters read from `metrics` at the window's edges, e.g.
  // joule_prefix_cache_hits_total (the report gives their increase).
  std::vector<std::string> window_counters;
  double idle_s = 5;              // idle-power measurement before the load; 0: skip
  double warmup_s = 5;            // the window starts here...
  double duration_s = 30;         // ...and ends here; no arrivals after it
  double drain_timeout_s = 30;    // after the window, wait this long for in-flight requests
  double request_timeout_s = 600;
  int max_inflight = 4096;        // beyond this an arrival is recorded as a client-side drop
  double progress_s = 1;          // 0: no progress callbacks
  std::function<void(const Progress&)> on_progress;
};

struct RunResult {
  std::vector<RequestRecord> requests;  // in arrival order
  double window_start_s = 0, window_end_s = 0;  // the steady-state window used for throughput
  std::optional<EnergySample> idle_start, idle_end, window_start, window_end;
  std::vector<std::string> warnings;  // scrape failures and the like
  double load_end_s = 0;              // when the last request ended or the drain gave up
};

// Runs the load. Errors only for setup (cannot resolve the target); request
// failures are recorded per request.
absl::StatusOr<RunResult> RunLoad(const LoadConfig& config, const std::vector<PlannedRequest>& plan);

}  // namespace joule::bench
