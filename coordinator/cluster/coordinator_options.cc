#include "coordinator/cluster/coordinator_options.h"

#include <cstdlib>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "scheduler/config.h"

namespace joule::cluster {

absl::Status CoordinatorOptions::Validate() const {
  if (model.empty()) return absl::InvalidArgumentError("--model: required (checkpoint directory)");
  if (workers < 1) {
    return absl::InvalidArgumentError(absl::StrCat("--workers: must be at least 1, got ", workers));
  }
  if (policy != "none") {
    if (auto kind = scheduler::ParsePolicyKind(policy, "--policy"); !kind.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat(kind.status().message(), ", or \"none\" (no scheduler)"));
    }
  }
  if (port < 0 || port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("--port: must be in [0, 65535], got ", port));
  }
  if (host.empty()) return absl::InvalidArgumentError("--host: must name an address (e.g. 127.0.0.1, 0.0.0.0)");
  if (grpc_host.empty()) {
    return absl::InvalidArgumentError("--grpc-host: must name an address (e.g. 127.0.0.1, 0.0.0.0)");
  }
  if (transport != "ucx" && transport != "nccl" && transport != "inproc") {
    return absl::InvalidArgumentError(
        absl::StrCat("--transport: must be ucx, nccl or inproc, got '", transport, "'"));
  }
  if (redundant_experts < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--redundant-experts: must not be negative, got ", redundant_experts));
  }
  if (heartbeat_ms < 1) {
    return absl::InvalidArgumentError(absl::StrCat("--heartbeat-ms: must be positive, got ", heartbeat_ms));
  }
  if (step_timeout_ms < 1) {
    return absl::InvalidArgumentError(absl::StrCat("--step-timeout-ms: must be positive, got ", step_timeout_ms));
  }
  if (startup_timeout_s < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("--startup-timeout-s: must be positive, got ", startup_timeout_s));
  }
  if (max_resumes < 0) {
    return absl::InvalidArgumentError(absl::StrCat("--max-resumes: must be >= 0, got ", max_resumes));
  }
  if (resume_wait_s < 1) {
    return absl::InvalidArgumentError(absl::StrCat("--resume-wait-s: must be positive, got ", resume_wait_s));
  }
  if (request_timeout_s < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("--request-timeout-s: must be positive, got ", request_timeout_s));
  }
  if (rebalance_interval_s < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--rebalance-interval-s: must not be negative, got ", rebalance_interval_s));
  }
  if (http_port < -1 || http_port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("--http-port: must be in [0, 65535], or -1 for no HTTP API, got ", http_port));
  }
  if (http_threads < 1) {
    return absl::InvalidArgumentError(absl::StrCat("--http-threads: must be at least 1, got ", http_threads));
  }
  if (max_body_bytes < 1024) {
    return absl::InvalidArgumentError(
        absl::StrCat("--max-body-bytes: must be at least 1024, got ", max_body_bytes));
  }
  const std::pair<const char*, int> request_limits[] = {
      {"--max-n", max_n},
      {"--max-best-of", max_best_of},
      {"--max-prompts-per-request", max_prompts_per_request},
      {"--max-generations-per-request", max_generations_per_request}};
  for (const auto& [flag, value] : request_limits) {
    if (value < 1) return absl::InvalidArgumentError(absl::StrCat(flag, ": must be at least 1, got ", value));
  }
  // Workers return at most 20 alternatives per token (worker/engine/sampler.h, as OpenAI).
  if (max_logprobs < 0 || max_logprobs > 20) {
    return absl::InvalidArgumentError(absl::StrCat("--max-logprobs: must be in [0, 20], got ", max_logprobs));
  }
  if (max_logit_bias_entries < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--max-logit-bias-entries: must not be negative, got ", max_logit_bias_entries));
  }
  auto caps = ParseTierQueueCaps(tier_queue_cap);
  if (!caps.ok()) return caps.status();
  return absl::OkStatus();
}

std::string CoordinatorOptions::ToString() const {
  CoordinatorOptions shown = *this;
  if (!shown.api_key.empty()) shown.api_key = "(set)";  // never log the secret
  return DescribeConfig(shown);
}

absl::StatusOr<TierCaps> ParseTierQueueCaps(const std::string& spec) {
  TierCaps caps = {64, 256, 1024, 4096};  // fast, priority, standard, batch
  for (absl::string_view item : absl::StrSplit(spec, ',', absl::SkipWhitespace())) {
    item = absl::StripAsciiWhitespace(item);
    std::vector<absl::string_view> kv = absl::StrSplit(item, absl::MaxSplits('=', 1));
    int n = 0;
    if (kv.size() != 2 || !absl::SimpleAtoi(kv[1], &n) || n < 1) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--tier-queue-cap: expected TIER=N with N >= 1 (e.g. fast=64,standard=1024), got '", item, "'"));
    }
    bool found = false;
    for (scheduler::Tier t : scheduler::kAllTiers) {
      const std::string_view name = scheduler::TierName(t);
      if (absl::StripAsciiWhitespace(kv[0]) == absl::string_view(name.data(), name.size())) {
        caps[static_cast<size_t>(t)] = n;
        found = true;
      }
    }
    if (!found) {
      return absl::InvalidArgumentError(absl::StrCat("--tier-queue-cap: unknown tier '", kv[0],
                                                     "'; tiers are fast, priority, standard, batch"));
    }
  }
  return caps;
}

absl::StatusOr<CoordinatorOptions> ParseCoordinatorOptions(int argc, const char* const* argv) {
  auto options = ParseConfig<CoordinatorOptions>("usage: joule-coordinator --model DIR --workers N [flags]",
                                                 "JOULE_COORDINATOR_", argc, argv);
  if (options.ok() && options->api_key.empty()) {
    if (const char* key = std::getenv("JOULE_API_KEY"); key != nullptr) options->api_key = key;
  }
  // After JOULE_API_KEY, which may be the only key.
  if (options.ok() && options->metrics_require_key && options->api_key.empty() && options->api_key_file.empty()) {
    return absl::InvalidArgumentError("--metrics-require-key: needs --api-key, JOULE_API_KEY or --api-key-file");
  }
  return options;
}

}  // namespace joule::cluster
