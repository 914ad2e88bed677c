// What joule-bench sends and when: Poisson arrivals, a service-tier mix and
// prompt/output length distributions, all drawn from a seed so two runs (or two
// policies) see the same workload.
#pragma once

#include <array>
#include <cstdint>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace joule::bench {

// The four Joule tiers, in the order reports list them.
enum class Tier { kFast = 0, kPriority = 1, kStandard = 2, kBatch = 3 };
inline constexpr int kNumTiers = 4;
inline constexpr std::array<Tier, kNumTiers> kAllTiers = {Tier::kFast, Tier::kPriority, Tier::kStandard,
                                                          Tier::kBatch};
std::string_view TierName(Tier t);        // "fast", "priority", "standard", "batch"
std::string_view TierApiValue(Tier t);    // service_tier: "fast", "priority", "default", "flex"
// Accepts both names: standard/default/auto -> standard, batch/flex -> batch.
absl::StatusOr<Tier> ParseTier(std::string_view name);

// A length distribution: "fixed:N", "uniform:MIN:MAX" (inclusive) or
// "lognormal:MEDIAN:SIGMA[:MAX]" (sigma of the log; clipped to [1, MAX], MAX
// defaults to 16 * MEDIAN).
class LengthDistribution {
 public:
  // InvalidArgument naming `field` for a malformed spec.
  static absl::StatusOr<LengthDistribution> Parse(std::string_view spec, std::string_view field);
  int Sample(std::mt19937_64& rng) const;
  int Max() const;  // the longest length Sample can return
  std::string spec() const { return spec_; }

 private:
  enum class Kind { kFixed, kUniform, kLognormal };
  Kind kind_ = Kind::kFixed;
  double a_ = 0, b_ = 0;
  int max_ = 0;
  std::string spec_;
};

// A length distribution per tier: "DIST[,TIER=DIST...]", e.g.
// "lognormal:64:0.5:512,batch=uniform:768:1024" (batch prompts are long
// documents, the other tiers chat turns). DIST alone applies to every tier.
class TieredLength {
 public:
  // InvalidArgument naming `field`: a malformed DIST, an unknown tier, a tier
  // named twice, or not exactly one DIST without a tier.
  static absl::StatusOr<TieredLength> Parse(std::string_view spec, std::string_view field);
  int Sample(Tier tier, std::mt19937_64& rng) const {
    return by_tier_[static_cast<int>(tier)].Sample(rng);
  }
  int Max(Tier tier) const { return by_tier_[static_cast<int>(tier)].Max(); }
  std::string spec() const { return spec_; }

 private:
  std::array<LengthDistribution, kNumTiers> by_tier_;
  std::string spec_;
};

// "fast=0.1,priority=0.2,standard=0.4,batch=0.3": weights, normalized.
class TierMix {
 public:
  static absl::StatusOr<TierMix> Parse(std::string_view spec);
  Tier Sample(std::mt19937_64& rng) const;
  double fraction(Tier t) const { return fractions_[static_cast<int>(t)]; }
  std::string spec() const;

 private:
  std::array<double, kNumTiers> fractions_{};
};

// Per-tier targets "fast=200,priority=500,standard=2000,batch=30000" (ms);
// tiers not named have no target (infinite).
absl::StatusOr<std::array<double, kNumTiers>> ParseTierValues(std::string_view spec, std::string_view field);

struct PlannedRequest {
  double at_s = 0;  // since the start of the load
  Tier tier = Tier::kStandard;
  int prompt_tokens = 0;
  int max_tokens = 0;
  std::vector<int32_t> prompt;  // token ids, or empty with prompt_text set
  std::string prompt_text;
  // Conversations only (ConversationSpec::shared_prefixes > 0), else -1.
  int conversation = -1;   // index in order of the conversations' starts
  int turn = -1;           // 0 for the first
  int system_prompt = -1;  // which of the shared system prompts it starts with
};

// Multi-turn conversations over a few shared system prompts, the workload a
// prefix cache is for. Conversations start Poisson at rate / turns (so requests
// still arrive at `rate`), each picks one of `shared_prefixes` system prompts
// and one tier, and sends `turns` requests `turn_gap_s` apart (open loop: a
// turn does not wait for the previous answer). Turn k's prompt is the system
// prompt, then for every earlier turn its user tokens and `max_tokens`
// synthetic assistant tokens, then turn k's user tokens; so turn k's prompt
// starts with turn k-1's. The assistant tokens stand in for the answer a chat
// client would send back: they are drawn from the seed, not taken from the
// server's output, so two runs (cache on and off) send the same requests.
struct ConversationSpec {
  int shared_prefixes = 0;  // system prompts; 0: independent prompts (WorkloadSpec::prompt_len)
  LengthDistribution system_len;  // tokens of each system prompt
  int turns = 1;
  LengthDistribution turn_len;  // user tokens per turn
  double turn_gap_s = 0;
};

struct WorkloadSpec {
  double rate = 1;  // requests/s, Poisson
  double duration_s = 10;
  uint64_t seed = 1;
  TierMix mix;
  TieredLength prompt_len;
  TieredLength output_len;
  bool text_prompts = false;          // else token ids
  int32_t token_min = 32, token_max = 126;  // prompt token ids are drawn from [min, max]
  ConversationSpec conversations;     // shared_prefixes > 0: prompt_len is not used
  int max_model_len = 0;  // > 0: every request's longest prompt + max_tokens must fit
};

// InvalidArgument naming the flag (shared_prefixes, turns, turn_gap_s,
// text_prompts, max_model_len) for a workload that cannot be planned or whose
// longest request would not fit max_model_len.
absl::Status ValidateWorkload(const WorkloadSpec& spec);

// The longest prompt + max_tokens the workload can draw (over every tier).
int LongestRequest(const WorkloadSpec& spec);

// Every request of a run, in arrival order. Each property has its own random
// stream, so changing the mix does not move arrival times and vice versa.
// Call ValidateWorkload first.
std::vector<PlannedRequest> PlanWorkload(const WorkloadSpec& spec);

}  // namespace joule::bench
