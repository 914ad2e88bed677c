#include "bench/energy/workload.h"

#include <algorithm>
#include <cmath>
#include <optional>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"

namespace joule::bench {
namespace {

absl::Status Bad(std::string_view field, std::string_view spec, std::string_view why) {
  return absl::InvalidArgumentError(absl::StrCat(std::string(field), ": '", std::string(spec), "': ",
                                                 std::string(why)));
}

}  // namespace

std::string_view TierName(Tier t) {
  switch (t) {
    case Tier::kFast: return "fast";
    case Tier::kPriority: return "priority";
    case Tier::kStandard: return "standard";
    case Tier::kBatch: return "batch";
  }
  return "?";
}

std::string_view TierApiValue(Tier t) {
  switch (t) {
    case Tier::kFast: return "fast";
    case Tier::kPriority: return "priority";
    case Tier::kStandard: return "default";
    case Tier::kBatch: return "flex";
  }
  return "default";
}

absl::StatusOr<Tier> ParseTier(std::string_view name) {
  if (name == "fast") return Tier::kFast;
  if (name == "priority") return Tier::kPriority;
  if (name == "standard" || name == "default" || name == "auto") return Tier::kStandard;
  if (name == "batch" || name == "flex") return Tier::kBatch;
  return absl::InvalidArgumentError(absl::StrCat("unknown tier '", std::string(name),
                                                 "' (fast, priority, standard|default, batch|flex)"));
}

absl::StatusOr<LengthDistribution> LengthDistribution::Parse(std::string_view spec,
                                                             std::string_view field) {
  std::vector<std::string> parts = absl::StrSplit(absl::string_view(spec.data(), spec.size()), ':');
  std::vector<double> v;
  for (size_t i = 1; i < parts.size(); ++i) {
    double x = 0;
    if (!absl::SimpleAtod(parts[i], &x) || !std::isfinite(x)) return Bad(field, spec, "not a number: " + parts[i]);
    v.push_back(x);
  }
  LengthDistribution d;
  d.spec_ = std::string(spec);
  if (parts[0] == "fixed" && v.size() == 1) {
    if (v[0] < 1) return Bad(field, spec, "length must be >= 1");
    d.kind_ = Kind::kFixed;
    d.a_ = std::round(v[0]);
  } else if (parts[0] == "uniform" && v.size() == 2) {
    if (v[0] < 1 || v[1] < v[0]) return Bad(field, spec, "need 1 <= MIN <= MAX");
    d.kind_ = Kind::kUniform;
    d.a_ = std::round(v[0]);
    d.b_ = std::round(v[1]);
  } else if (parts[0] == "lognormal" && (v.size() == 2 || v.size() == 3)) {
    if (v[0] < 1 || v[1] < 0) return Bad(field, spec, "need MEDIAN >= 1 and SIGMA >= 0");
    d.kind_ = Kind::kLognormal;
    d.a_ = std::log(v[0]);
    d.b_ = v[1];
    d.max_ = v.size() == 3 ? static_cast<int>(v[2]) : static_cast<int>(16 * v[0]);
    if (d.max_ < 1) return Bad(field, spec, "MAX must be >= 1");
  } else {
    return Bad(field, spec, "expected fixed:N, uniform:MIN:MAX or lognormal:MEDIAN:SIGMA[:MAX]");
  }
  return d;
}

int LengthDistribution::Sample(std::mt19937_64& rng) const {
  switch (kind_) {
    case Kind::kFixed: return static_cast<int>(a_);
    case Kind::kUniform:
      return static_cast<int>(std::uniform_int_distribution<int64_t>(static_cast<int64_t>(a_),
                                                                     static_cast<int64_t>(b_))(rng));
    case Kind::kLognormal: {
      const double x = std::lognormal_distribution<double>(a_, b_)(rng);
      return static_cast<int>(std::clamp(std::round(x), 1.0, static_cast<double>(max_)));
    }
  }
  return 1;
}

absl::StatusOr<TieredLength> TieredLength::Parse(std::string_view spec, std::string_view field) {
  std::optional<LengthDistribution> fallback;
  std::array<std::optional<LengthDistribution>, kNumTiers> named;
  for (absl::string_view item : absl::StrSplit(absl::string_view(spec.data(), spec.size()), ',',
                                               absl::SkipWhitespace())) {
    item = absl::StripAsciiWhitespace(item);
    const size_t eq = item.find('=');
    std::string_view dist(item.data(), item.size());
    std::optional<LengthDistribution>* slot = &fallback;
    if (eq != absl::string_view::npos) {
      absl::StatusOr<Tier> t = ParseTier(std::string(absl::StripAsciiWhitespace(item.substr(0, eq))));
      if (!t.ok()) return Bad(field, spec, std::string(t.status().message()));
      slot = &named[static_cast<int>(*t)];
      dist = dist.substr(eq + 1);
    }
    if (slot->has_value()) {
      return Bad(field, spec, eq == absl::string_view::npos
                                  ? "more than one distribution without a tier"
                                  : absl::StrCat("tier '", std::string(item.substr(0, eq)),
                                                 "' named twice"));
    }
    absl::StatusOr<LengthDistribution> d = LengthDistribution::Parse(dist, field);
    if (!d.ok()) return d.status();
    *slot = *std::move(d);
  }
  if (!fallback.has_value()) {
    return Bad(field, spec, "needs one distribution without a tier (the default for the others)");
  }
  TieredLength out;
  out.spec_ = std::string(spec);
  for (int i = 0; i < kNumTiers; ++i) out.by_tier_[i] = named[i].value_or(*fallback);
  return out;
}

absl::StatusOr<TierMix> TierMix::Parse(std::string_view spec) {
  TierMix mix;
  double sum = 0;
  for (absl::string_view item : absl::StrSplit(absl::string_view(spec.data(), spec.size()), ',',
                                               absl::SkipWhitespace())) {
    std::vector<std::string> kv = absl::StrSplit(item, '=');
    double w = 0;
    if (kv.size() != 2 || !absl::SimpleAtod(kv[1], &w) || !std::isfinite(w) || w < 0) {
      return Bad("tier_mix", spec, absl::StrCat("expected TIER=WEIGHT with WEIGHT >= 0, got '",
                                                std::string(item), "'"));
    }
    absl::StatusOr<Tier> t = ParseTier(std::string(absl::StripAsciiWhitespace(kv[0])));
    if (!t.ok()) return Bad("tier_mix", spec, std::string(t.status().message()));
    mix.fractions_[static_cast<int>(*t)] += w;
    sum += w;
  }
  if (sum <= 0) return Bad("tier_mix", spec, "weights must sum to more than 0");
  for (double& f : mix.fractions_) f /= sum;
  return mix;
}

Tier TierMix::Sample(std::mt19937_64& rng) const {
  double u = std::uniform_real_distribution<double>(0, 1)(rng);
  for (Tier t : kAllTiers) {
    u -= fractions_[static_cast<int>(t)];
    if (u < 0) return t;
  }
  for (int i = kNumTiers - 1; i >= 0; --i) {  // rounding: the last tier with weight
    if (fractions_[i] > 0) return static_cast<Tier>(i);
  }
  return Tier::kStandard;
}

std::string TierMix::spec() const {
  std::vector<std::string> parts;
  for (Tier t : kAllTiers) {
    if (fraction(t) > 0) parts.push_back(absl::StrCat(std::string(TierName(t)), "=", fraction(t)));
  }
  return absl::StrJoin(parts, ",");
}

absl::StatusOr<std::array<double, kNumTiers>> ParseTierValues(std::string_view spec, std::string_view field) {
  std::array<double, kNumTiers> out;
  out.fill(INFINITY);
  for (absl::string_view item : absl::StrSplit(absl::string_view(spec.data(), spec.size()), ',',
                                               absl::SkipWhitespace())) {
    std::vector<std::string> kv = absl::StrSplit(item, '=');
    double v = 0;
    if (kv.size() != 2 || !absl::SimpleAtod(kv[1], &v) || v < 0) {
      return Bad(field, spec, absl::StrCat("expected TIER=VALUE with VALUE >= 0, got '", std::string(item), "'"));
    }
    absl::StatusOr<Tier> t = ParseTier(std::string(absl::StripAsciiWhitespace(kv[0])));
    if (!t.ok()) return Bad(field, spec, std::string(t.status().message()));
    out[static_cast<int>(*t)] = v;
  }
  return out;
}

std::vector<PlannedRequest> PlanWorkload(const WorkloadSpec& spec) {
  // One stream per property (seeded apart) keeps them independent.
  std::mt19937_64 arrivals(spec.seed * 4 + 0), tiers(spec.seed * 4 + 1), lengths(spec.seed * 4 + 2),
      content(spec.seed * 4 + 3);
  std::exponential_distribution<double> gap(spec.rate);
  std::uniform_int_distribution<int32_t> token(spec.token_min, spec.token_max);
  std::vector<PlannedRequest> out;
  for (double t = gap(arrivals); t < spec.duration_s; t += gap(arrivals)) {
    PlannedRequest r;
    r.at_s = t;
    r.tier = spec.mix.Sample(tiers);
    r.prompt_tokens = spec.prompt_len.Sample(r.tier, lengths);
    r.max_tokens = spec.output_len.Sample(r.tier, lengths);
    if (spec.text_prompts) {
      // About one token per byte for a byte-level vocabulary; fewer for BPE.
      static constexpr char kLetters[] = "abcdefghijklmnopqrstuvwxyz    ";
      r.prompt_text.resize(r.prompt_tokens);
      for (char& c : r.prompt_text) c = kLetters[content() % (sizeof(kLetters) - 1)];
    } else {
      r.prompt.resize(r.prompt_tokens);
      for (int32_t& id : r.prompt) id = token(content);
    }
    out.push_back(std::move(r));
  }
  return out;
}

}  // namespace joule::bench
