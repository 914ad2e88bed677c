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

int LengthDistribution::Max() const {
  switch (kind_) {
    case Kind::kFixed: return static_cast<int>(a_);
    case Kind::kUniform: return static_cast<int>(b_);
    case Kind::kLognormal: return max_;
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

int LongestRequest(const WorkloadSpec& spec) {
  int longest = 0;
  for (Tier tier : kAllTiers) {
    if (spec.mix.fraction(tier) <= 0) continue;
    const int output = spec.output_len.Max(tier);
    const ConversationSpec& conv = spec.conversations;
    // A conversation's last turn carries every earlier turn and answer.
    const int request = conv.shared_prefixes > 0
                            ? conv.system_len.Max() + conv.turns * (conv.turn_len.Max() + output)
                            : spec.prompt_len.Max(tier) + output;
    longest = std::max(longest, request);
  }
  return longest;
}

absl::Status ValidateWorkload(const WorkloadSpec& spec) {
  const ConversationSpec& conv = spec.conversations;
  if (conv.shared_prefixes < 0) return absl::InvalidArgumentError("--shared-prefixes: must be >= 0 (0: independent prompts)");
  if (conv.turns < 1) return absl::InvalidArgumentError("--turns: must be >= 1");
  if (conv.shared_prefixes == 0 && conv.turns != 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("--turns: ", conv.turns, " turns need conversations (--shared-prefixes > 0)"));
  }
  if (!(conv.turn_gap_s >= 0) || !std::isfinite(conv.turn_gap_s)) {
    return absl::InvalidArgumentError("--turn-gap-s: must be a finite number >= 0");
  }
  if (conv.shared_prefixes > 0 && spec.text_prompts) {
    return absl::InvalidArgumentError(
        "--text-prompts: conversations (--shared-prefixes > 0) send token ids, so that a turn's prompt "
        "starts with exactly the previous turn's tokens (a tokenizer may split a text prefix differently)");
  }
  if (spec.max_model_len < 0) return absl::InvalidArgumentError("--max-model-len: must be >= 0 (0: no limit)");
  const int longest = LongestRequest(spec);
  if (spec.max_model_len > 0 && longest > spec.max_model_len) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--max-model-len: the longest request can have ", longest, " prompt + output tokens (",
        conv.shared_prefixes > 0 ? "--system-len max + --turns x (--turn-len max + --output-len max)"
                                 : "--prompt-len max + --output-len max",
        "), more than ", spec.max_model_len, "; shorten the lengths",
        conv.shared_prefixes > 0 ? " or the turns" : ""));
  }
  return absl::OkStatus();
}

namespace {

// A random stream per property of a conversation workload, apart from each
// other and from the independent-prompt streams (seed * 4 + k).
std::mt19937_64 ConversationStream(uint64_t seed, uint32_t property) {
  std::seed_seq seq{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32), 0x636f6e76u, property};
  return std::mt19937_64(seq);
}

std::vector<PlannedRequest> PlanConversations(const WorkloadSpec& spec) {
  const ConversationSpec& conv = spec.conversations;
  std::mt19937_64 starts = ConversationStream(spec.seed, 0), tiers = ConversationStream(spec.seed, 1),
                  picks = ConversationStream(spec.seed, 2), lengths = ConversationStream(spec.seed, 3),
                  content = ConversationStream(spec.seed, 4), system_content = ConversationStream(spec.seed, 5);
  std::uniform_int_distribution<int32_t> token(spec.token_min, spec.token_max);
  auto append_tokens = [&](std::mt19937_64& rng, int n, std::vector<int32_t>* out) {
    for (int i = 0; i < n; ++i) out->push_back(token(rng));
  };
  std::vector<std::vector<int32_t>> system_prompts(conv.shared_prefixes);
  for (std::vector<int32_t>& system : system_prompts) {
    append_tokens(system_content, conv.system_len.Sample(system_content), &system);
  }
  // Requests arrive at `rate` on average: conversations start at rate / turns.
  std::exponential_distribution<double> gap(spec.rate / conv.turns);
  std::uniform_int_distribution<int> pick(0, conv.shared_prefixes - 1);
  std::vector<PlannedRequest> out;
  int conversation = 0;
  for (double start = gap(starts); start < spec.duration_s; start += gap(starts), ++conversation) {
    const Tier tier = spec.mix.Sample(tiers);
    const int system = pick(picks);
    std::vector<int32_t> history = system_prompts[system];
    // Every turn is drawn, also those past the end, so the duration changes no
    // conversation's content.
    for (int k = 0; k < conv.turns; ++k) {
      const int user_tokens = conv.turn_len.Sample(lengths);
      const int max_tokens = spec.output_len.Sample(tier, lengths);
      append_tokens(content, user_tokens, &history);
      const double at = start + k * conv.turn_gap_s;
      if (at < spec.duration_s) {
        PlannedRequest r;
        r.at_s = at;
        r.tier = tier;
        r.prompt = history;
        r.prompt_tokens = static_cast<int>(history.size());
        r.max_tokens = max_tokens;
        r.conversation = conversation;
        r.turn = k;
        r.system_prompt = system;
        out.push_back(std::move(r));
      }
      append_tokens(content, max_tokens, &history);  // the synthetic answer the next turn carries
    }
  }
  std::stable_sort(out.begin(), out.end(),
                   [](const PlannedRequest& a, const PlannedRequest& b) { return a.at_s < b.at_s; });
  return out;
}

}  // namespace

std::vector<PlannedRequest> PlanWorkload(const WorkloadSpec& spec) {
  if (spec.conversations.shared_prefixes > 0) return PlanConversations(spec);
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
