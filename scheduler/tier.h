// Service tiers: what a request paid for, and how the OpenAI API names it.
#pragma once

#include <string_view>

#include "absl/status/statusor.h"

namespace joule::scheduler {

// Ordered from most to least urgent.
enum class Tier {
  kFast,      // highest interactivity; caps its rank's batch
  kPriority,  // admitted ahead of standard
  kStandard,  // the default
  kBatch,     // best effort, preemptible, run at the best tokens per joule
};

inline constexpr Tier kAllTiers[] = {Tier::kFast, Tier::kPriority, Tier::kStandard, Tier::kBatch};

// Maps an OpenAI `service_tier` value: "fast" -> fast, "priority" -> priority,
// "default", "auto" or empty (absent) -> standard, "flex" -> batch. Anything
// else is InvalidArgument naming the field and the accepted values.
absl::StatusOr<Tier> ParseServiceTier(std::string_view openai_value);

// Our name for the tier ("fast", "priority", "standard", "batch"), as used in
// metrics labels, configuration and logs.
std::string_view TierName(Tier tier);

// The `service_tier` value reported back in OpenAI responses: "fast",
// "priority", "default", "flex".
std::string_view OpenAiServiceTier(Tier tier);

}  // namespace joule::scheduler
