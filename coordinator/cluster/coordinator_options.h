// joule-coordinator's configuration, declared once: each option's name, type,
// default and help live in the table below. Values come from the command line
// (--name VALUE or --name=VALUE), else from the environment
// (JOULE_COORDINATOR_NAME, dashes as underscores), else the default; the
// result is printed at start-up. common/options.h does the reading.
#pragma once

#include <array>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/grpc_security.h"
#include "common/options.h"
#include "scheduler/tier.h"

namespace joule::cluster {

// X(type, field, default, help); the flag is --field with '_' written '-'.
#define JOULE_COORDINATOR_OPTIONS(X)                                                              \
  X(std::string, model, "", "checkpoint directory (config.json + *.safetensors)")                \
  X(int, workers, 1, "expert-parallel world size: the number of worker ranks")                    \
  X(std::string, host, "127.0.0.1",                                                               \
    "address the HTTP API listens on; 0.0.0.0: every interface (clients on other hosts)")       \
  X(std::string, grpc_host, "127.0.0.1",                                                          \
    "address the gRPC port (workers, joule-cli) listens on; multi-host clusters: 0.0.0.0 or an " \
    "interface address the workers reach")                                                        \
  X(int, port, 0, "gRPC port to listen on; 0 picks a free one (see --port-file)")                \
  X(std::string, port_file, "", "write the bound port to this file once serving")                \
  X(std::string, transport, "ucx", "worker transport: ucx | nccl | inproc")                      \
  X(int, redundant_experts, 0, "extra expert replicas per MoE layer that Rebalance adds (EPLB)")  \
  X(int, rebalance_interval_s, 0, "rebalance from observed expert load this often; 0: only on request") \
  X(int, step_timeout_ms, 10000,                                                                  \
    "how long workers wait for their peers in one step (sent to workers at registration); "     \
    "bounds how long a dead peer stalls the others")                                              \
  X(int, heartbeat_ms, 500, "worker heartbeat interval; a rank silent for 3 intervals is dead")   \
  X(bool, elastic, true,                                                                          \
    "a dead worker leaves the expert-parallel group and the others regroup and serve on; false: " \
    "the cluster stops serving until it is restarted")                                            \
  X(int, startup_timeout_s, 600,                                                                  \
    "a registered worker that has not heartbeated (still loading) for this long is dead")       \
  X(int, request_timeout_s, 600, "longest one request may run on a worker")                        \
  X(int, max_resumes, 3,                                                                          \
    "times a request resumes on another rank after its rank died (its tokens so far are "       \
    "recomputed there, the stream goes on); 0: it fails with the reason")                        \
  X(int, resume_wait_s, 60,                                                                       \
    "how long a request waits for the group to serve again (to resume, or to start while the "  \
    "group re-forms) before it fails with 503")                                                   \
  X(int, http_port, -1,                                                                           \
    "port of the OpenAI-compatible HTTP API; 0 picks a free one (see --http-port-file); "        \
    "-1 serves no HTTP (needs MODEL/tokenizer.json when on)")                                     \
  X(std::string, http_port_file, "", "write the bound HTTP port to this file once serving")       \
  X(int, http_threads, 2, "I/O threads of the HTTP server (connections share them)")             \
  X(std::string, served_model_name, "", "model id of the HTTP API; default: the --model directory's base name") \
  X(std::string, api_key, "",                                                                     \
    "when set, /v1 routes require 'Authorization: Bearer KEY' (also from env JOULE_API_KEY)")    \
  X(std::string, api_key_file, "",                                                                \
    "file of accepted API keys, one per line (blank lines and # comments skipped); with --api-key " \
    "both are accepted")                                                                          \
  X(bool, metrics_require_key, false,                                                             \
    "the HTTP /metrics route requires an API key too (Prometheus: authorization credentials)")  \
  X(int64_t, max_body_bytes, 1 << 20, "largest HTTP request body accepted (larger: 413)")        \
  X(int, max_n, 16, "HTTP API: most choices (n) one request may ask for (more: 400)")             \
  X(int, max_best_of, 16, "HTTP API: largest best_of of a completions request (more: 400)")       \
  X(int, max_logprobs, 20,                                                                        \
    "HTTP API: most top_logprobs (chat) or logprobs (completions) alternatives per token")       \
  X(int, max_prompts_per_request, 16, "HTTP API: most prompts in one completions request")        \
  X(int, max_logit_bias_entries, 300, "HTTP API: most logit_bias entries in one request")         \
  X(int, max_generations_per_request, 64,                                                         \
    "HTTP API: most generations one request fans out to (prompts x best_of, or x n)")           \
  X(std::string, tier_queue_cap, "fast=64,priority=256,standard=1024,batch=4096",                 \
    "per-tier cap on HTTP requests in flight at the coordinator, and on those waiting in the "   \
    "scheduler's queue (beyond it: 429); TIER=N pairs, tiers fast|priority|standard|batch, "     \
    "omitted tiers keep their default")                                                           \
  X(std::string, policy, "priority",                                                              \
    "scheduling policy of HTTP requests: fcfs (tiers ignored), priority (strict tier order), "   \
    "ipw (interactivity per watt), or none (no scheduler: least loaded rank at once)")          \
  X(std::string, scheduler_config, "",                                                            \
    "JSON file of SLOs, caps and ipw knobs (scheduler/config.h); --policy overrides its policy") \
  JOULE_GRPC_SECURITY_FLAGS(X)

struct CoordinatorOptions {
  JOULE_COORDINATOR_OPTIONS(JOULE_OPTION_FIELD)

  std::vector<Option> Options() { return {JOULE_COORDINATOR_OPTIONS(JOULE_OPTION_BIND)}; }
  // InvalidArgument naming the flag when a value is out of range.
  absl::Status Validate() const;
  // One line per option, "--name=value", for the start-up log.
  std::string ToString() const;
};

// Requests in flight allowed per tier, indexed by scheduler::Tier.
using TierCaps = std::array<int, std::size(scheduler::kAllTiers)>;

// "fast=64,priority=256,..." on top of the defaults of --tier-queue-cap;
// InvalidArgument naming the flag for unknown tiers or non-positive caps.
absl::StatusOr<TierCaps> ParseTierQueueCaps(const std::string& spec);

// Environment, then argv, then Validate. The API key may also come from
// JOULE_API_KEY (the name OpenAI-style tools expect). InvalidArgument naming the flag on
// unknown flags or bad values; "--help" gives Cancelled whose message is the
// usage text (IsHelpRequest).
absl::StatusOr<CoordinatorOptions> ParseCoordinatorOptions(int argc, const char* const* argv);

}  // namespace joule::cluster
