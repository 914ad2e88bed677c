#include "scheduler/tier.h"

#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace joule::scheduler {

absl::StatusOr<Tier> ParseServiceTier(std::string_view openai_value) {
  if (openai_value == "fast") return Tier::kFast;
  if (openai_value == "priority") return Tier::kPriority;
  if (openai_value.empty() || openai_value == "default" || openai_value == "auto") {
    return Tier::kStandard;
  }
  if (openai_value == "flex") return Tier::kBatch;
  // Echo a bounded prefix: the value comes straight from a client.
  constexpr size_t kMaxEcho = 64;
  std::string shown(openai_value.substr(0, kMaxEcho));
  if (openai_value.size() > kMaxEcho) shown += "...";
  return absl::InvalidArgumentError(absl::StrCat(
      "service_tier: unknown value \"", shown,
      "\"; accepted values are \"fast\", \"priority\", \"default\", \"auto\" and \"flex\""));
}

std::string_view TierName(Tier tier) {
  switch (tier) {
    case Tier::kFast:
      return "fast";
    case Tier::kPriority:
      return "priority";
    case Tier::kStandard:
      return "standard";
    case Tier::kBatch:
      return "batch";
  }
  return "unknown";
}

std::string_view OpenAiServiceTier(Tier tier) {
  switch (tier) {
    case Tier::kFast:
      return "fast";
    case Tier::kPriority:
      return "priority";
    case Tier::kStandard:
      return "default";
    case Tier::kBatch:
      return "flex";
  }
  return "default";
}

}  // namespace joule::scheduler
