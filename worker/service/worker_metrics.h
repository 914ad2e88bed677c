// The worker's Prometheus metrics, declared once in JOULE_WORKER_METRICS and
// read from WorkerHandler::Status() at scrape time (so there is no updater
// thread and a scrape always sees the step loop's latest published numbers).
// WorkerMetricsServer serves them in Prometheus' text format on
// http://HOST:PORT/metrics, labelled by rank: a minimal HTTP/1.0 responder on
// one owned Boost.Asio thread (prometheus-cpp's civetweb Exposer takes up to
// 2 s to stop, which every worker exit and test would pay).
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "prometheus/collectable.h"
#include "prometheus/metric_family.h"
#include "worker/service/worker_handler.h"

namespace joule::worker {

// X(name, type, help, value given `const WorkerStatus& s`). Counters are
// cumulative since the worker started.
#define JOULE_WORKER_METRICS(X)                                                                 \
  X(joule_kv_cache_usage_perc, Gauge, "Fraction of KV cache blocks in use (1 = full).",         \
    s.kv_usage)                                                                                 \
  X(joule_kv_cache_free_blocks, Gauge, "Free KV cache blocks.", s.kv_free_blocks)               \
  X(joule_kv_cache_total_blocks, Gauge, "KV cache blocks in all.", s.kv_total_blocks)           \
  X(joule_num_requests_running, Gauge, "Sequences in the running batch.", s.running)            \
  X(joule_num_requests_waiting, Gauge, "Sequences queued for admission.", s.waiting)            \
  X(joule_num_preemptions_total, Counter,                                                       \
    "Sequences preempted (KV blocks freed, recomputed later).", s.preemptions_total)            \
  X(joule_num_scheduler_preemptions_total, Counter,                                             \
    "Of those, preempted because the coordinator's scheduler asked (step plans).",              \
    s.scheduler_preemptions_total)                                                              \
  X(joule_prompt_tokens_total, Counter, "Prefill tokens computed (a recompute counts again).",  \
    s.prompt_tokens_total)                                                                      \
  X(joule_generation_tokens_total, Counter, "Tokens sampled.", s.generation_tokens_total)       \
  X(joule_prefix_cache_queries_total, Counter,                                                  \
    "Prompt tokens of newly scheduled requests looked up in the prefix cache.",                 \
    s.prefix_cache_queries_total)                                                               \
  X(joule_prefix_cache_hits_total, Counter,                                                     \
    "Of those, tokens whose KV blocks the prefix cache held (not computed).",                   \
    s.prefix_cache_hits_total)                                                                  \
  X(joule_prefix_cache_blocks, Gauge,                                                           \
    "KV blocks holding cached prefixes (held by sequences or evictable).",                      \
    s.prefix_cache_blocks)                                                                      \
  X(joule_worker_ready, Gauge, "1 while the rank serves requests.", s.ready ? 1 : 0)            \
  X(joule_lockstep_rounds_total, Counter, "Expert-parallel lockstep rounds run.", s.steps)      \
  X(joule_group_epoch, Gauge, "The expert-parallel group epoch this rank serves in.",           \
    s.group_epoch)                                                                              \
  X(joule_regroups_total, Counter, "Groups re-formed around this rank (a peer died or joined).", \
    s.regroups)                                                                                 \
  X(joule_resident_memory_bytes, Gauge, "Resident set size of the worker process.",             \
    s.resident_bytes)                                                                           \
  X(joule_step_token_cap, Gauge,                                                                \
    "Tokens per step the ranks agreed on for their fast requests (0: uncapped).",               \
    s.step_token_cap)                                                                           \
  X(joule_busy_steps_total, Counter, "Lockstep rounds in which some rank had tokens.",          \
    s.busy_steps)                                                                               \
  X(joule_dispatch_bytes_total, Counter,                                                        \
    "Expert-parallel dispatch payload bytes sent to other ranks.", s.dispatch_bytes_total)      \
  X(joule_combine_bytes_total, Counter,                                                         \
    "Expert-parallel combine payload bytes sent to other ranks.", s.combine_bytes_total)        \
  X(joule_dispatch_seconds_total, Counter,                                                      \
    "Seconds in dispatch (layout, counts, packing, all-to-all); / busy steps = per step.",      \
    s.dispatch_seconds_total)                                                                   \
  X(joule_combine_seconds_total, Counter,                                                       \
    "Seconds in combine (all-to-all or barrier, un-permute; F32 payloads also packing; BF16 "  \
    "rows are summed and rounded in the expert GEMMs); / busy steps = per step.",               \
    s.combine_seconds_total)                                                                    \
  X(joule_two_batch_layers_total, Counter,                                                      \
    "MoE layer calls run as two overlapped micro-batches (--two-batch-overlap).",               \
    s.two_batch_layers_total)

// Energy, labelled rank and source (nvml, rapl, or model = an estimate);
// only when the worker has a meter. total = attributed + idle + unattributed.
#define JOULE_WORKER_ENERGY_METRICS(X)                                                          \
  X(joule_energy_joules_total, Counter, "Energy metered by this rank since it started.",        \
    s.energy_joules)                                                                            \
  X(joule_energy_attributed_joules_total, Counter,                                              \
    "Energy of steps charged to this rank's requests by token share.",                          \
    s.energy_attributed_joules)                                                                 \
  X(joule_energy_idle_joules_total, Counter, "Energy metered between steps (idle).",            \
    s.energy_idle_joules)                                                                       \
  X(joule_energy_unattributed_joules_total, Counter,                                            \
    "Energy of steps in which this rank only served other ranks' tokens.",                      \
    s.energy_unattributed_joules)                                                               \
  X(joule_power_watts, Gauge, "Mean power over the last second of steps (energy delta / time).", \
    s.power_watts)

// The meter's own power reading (NVML's instant field), labelled rank and
// source; only when the meter has one (s.power_instant_watts >= 0).
#define JOULE_WORKER_METER_POWER_METRICS(X)                                                     \
  X(joule_power_instant_watts, Gauge,                                                           \
    "Power the meter reported when the last power window closed (NVML's instant field).",       \
    s.power_instant_watts)

// The meter read at the scrape, apart from the per-step accounting that sums to
// joule_energy_joules_total: a check on that accounting (only with a meter).
#define JOULE_WORKER_METER_READING_METRICS(X)                                                   \
  X(joule_energy_meter_joules_total, Counter,                                                   \
    "The energy meter's own reading since the worker started, read at this scrape.",            \
    s.energy_meter_joules)

// The metric families for one status snapshot, labelled rank="R" (-1 before
// the worker has a rank), plus joule_expert_tokens_total{rank,layer,expert}:
// tokens this rank routed to each expert (per-expert load; MoE layers only).
std::vector<prometheus::MetricFamily> WorkerMetricFamilies(const WorkerStatus& s);

// Collects from a status source on every scrape.
class WorkerMetrics final : public prometheus::Collectable {
 public:
  explicit WorkerMetrics(std::function<WorkerStatus()> status) : status_(std::move(status)) {}
  std::vector<prometheus::MetricFamily> Collect() const override {
    return WorkerMetricFamilies(status_());
  }

 private:
  const std::function<WorkerStatus()> status_;
};

class WorkerMetricsServer {
 public:
  // Listens on host:port (0: an ephemeral port, see port()). `handler` is not
  // owned and must outlive the server. Unavailable when it cannot listen.
  static absl::StatusOr<std::unique_ptr<WorkerMetricsServer>> Start(const std::string& host,
                                                                    int port,
                                                                    WorkerHandler* handler);
  // Stops serving and joins its thread.
  ~WorkerMetricsServer();
  int port() const { return port_; }

 private:
  struct Impl;
  explicit WorkerMetricsServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
  int port_ = 0;
};

}  // namespace joule::worker
