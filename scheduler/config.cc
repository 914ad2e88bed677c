#include "scheduler/config.h"

#include <cmath>
#include <limits>
#include <string>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "nlohmann/json.hpp"

namespace joule::scheduler {
namespace {

using json = nlohmann::json;

absl::string_view Sv(std::string_view s) { return absl::string_view(s.data(), s.size()); }

absl::Status FieldError(const std::string& field, absl::string_view msg) {
  return absl::InvalidArgumentError(absl::StrCat("scheduler config: field '", field, "' ", msg));
}

std::string Describe(const json& v) {
  if (v.is_number() || v.is_boolean()) return absl::StrCat(v.type_name(), " ", v.dump());
  return v.type_name();
}

// Fields of one JSON object, exception-free, with unknown names refused.
class Object {
 public:
  Object(const json& v, std::string path) : v_(v), path_(std::move(path)) {}

  absl::Status Check(std::initializer_list<const char*> known) const {
    if (!v_.is_object()) return FieldError(Root(), absl::StrCat("must be an object, got ", Describe(v_)));
    for (const auto& [name, value] : v_.items()) {
      bool ok = false;
      for (const char* k : known) ok = ok || name == k;
      if (!ok) return FieldError(Path(name), "is not a known setting");
    }
    return absl::OkStatus();
  }
  const json* Find(const std::string& name) const {
    auto it = v_.find(name);
    if (it == v_.end() || it->is_null()) return nullptr;
    return &*it;
  }
  std::string Path(const std::string& name) const {
    return path_.empty() ? name : absl::StrCat(path_, ".", name);
  }
  std::string Root() const { return path_.empty() ? std::string("(top level)") : path_; }

  absl::Status Number(const std::string& name, double lo, double hi, double* out) const {
    const json* v = Find(name);
    if (v == nullptr) return absl::OkStatus();
    if (!v->is_number()) return FieldError(Path(name), absl::StrCat("must be a number, got ", Describe(*v)));
    const double d = v->get<double>();
    if (!(d >= lo && d <= hi)) {
      return FieldError(Path(name), absl::StrCat("must be in [", lo, ", ", hi, "], got ", v->dump()));
    }
    *out = d;
    return absl::OkStatus();
  }
  absl::Status Int(const std::string& name, int64_t lo, int64_t hi, int* out) const {
    const json* v = Find(name);
    if (v == nullptr) return absl::OkStatus();
    if (!v->is_number_integer()) {
      return FieldError(Path(name), absl::StrCat("must be an integer, got ", Describe(*v)));
    }
    const int64_t i = v->is_number_unsigned() && v->get<uint64_t>() > static_cast<uint64_t>(hi)
                          ? hi + 1
                          : v->get<int64_t>();
    if (i < lo || i > hi) {
      return FieldError(Path(name), absl::StrCat("must be in [", lo, ", ", hi, "], got ", v->dump()));
    }
    *out = static_cast<int>(i);
    return absl::OkStatus();
  }
  absl::Status Millis(const std::string& name, absl::Duration* out) const {
    double ms = absl::ToDoubleMilliseconds(*out);
    RETURN_IF_ERROR(Number(name, 0, 1e9, &ms));
    *out = absl::Milliseconds(ms);
    return absl::OkStatus();
  }
  absl::Status Bool(const std::string& name, bool* out) const {
    const json* v = Find(name);
    if (v == nullptr) return absl::OkStatus();
    if (!v->is_boolean()) return FieldError(Path(name), absl::StrCat("must be a boolean, got ", Describe(*v)));
    *out = v->get<bool>();
    return absl::OkStatus();
  }

 private:
  const json& v_;
  std::string path_;
};

constexpr int kIntMax = std::numeric_limits<int>::max();

}  // namespace

absl::StatusOr<PolicyKind> ParsePolicyKind(std::string_view value, std::string_view field) {
  if (value == "fcfs") return PolicyKind::kFcfs;
  if (value == "priority") return PolicyKind::kPriority;
  if (value == "ipw") return PolicyKind::kIpw;
  constexpr size_t kMaxEcho = 64;
  std::string shown(value.substr(0, kMaxEcho));
  return absl::InvalidArgumentError(absl::StrCat(Sv(field), ": unknown policy \"", shown,
                                                 "\"; accepted values are \"fcfs\", "
                                                 "\"priority\" and \"ipw\""));
}

std::string_view PolicyName(PolicyKind kind) {
  switch (kind) {
    case PolicyKind::kFcfs:
      return "fcfs";
    case PolicyKind::kPriority:
      return "priority";
    case PolicyKind::kIpw:
      return "ipw";
  }
  return "unknown";
}

std::array<TierSlo, 4> SchedulerConfig::DefaultTierSlos() {
  std::array<TierSlo, 4> t;
  t[static_cast<int>(Tier::kFast)] = {absl::Milliseconds(500), absl::Milliseconds(25), 0.99, 64};
  t[static_cast<int>(Tier::kPriority)] = {absl::Seconds(1), absl::Milliseconds(50), 0.99, 256};
  t[static_cast<int>(Tier::kStandard)] = {absl::Seconds(2), absl::Milliseconds(100), 0.95, 1024};
  // Batch: started within a minute, no per-token target.
  t[static_cast<int>(Tier::kBatch)] = {absl::Seconds(60), absl::ZeroDuration(), 0.90, 4096};
  return t;
}

absl::Status SchedulerConfig::Validate() const {
  auto positive = [](const char* name, int64_t v) -> absl::Status {
    if (v < 1) return FieldError(name, absl::StrCat("must be at least 1, got ", v));
    return absl::OkStatus();
  };
  RETURN_IF_ERROR(positive("max_batch_tokens", max_batch_tokens));
  RETURN_IF_ERROR(positive("max_running", max_running));
  RETURN_IF_ERROR(positive("max_inflight_per_rank", max_inflight_per_rank));
  if (batch_max_wait <= absl::ZeroDuration()) {
    return FieldError("batch_max_wait_ms", "must be positive");
  }
  for (Tier t : kAllTiers) {
    const TierSlo& s = slo(t);
    const std::string p = absl::StrCat("tiers.", Sv(TierName(t)), ".");
    if (s.ttft < absl::ZeroDuration()) return FieldError(p + "ttft_ms", "must not be negative");
    if (s.tpot < absl::ZeroDuration()) return FieldError(p + "tpot_ms", "must not be negative");
    if (!(s.attainment >= 0 && s.attainment <= 1)) {
      return FieldError(p + "attainment", absl::StrCat("must be in [0, 1], got ", s.attainment));
    }
    if (s.queue_cap < 1) return FieldError(p + "queue_cap", "must be at least 1");
  }
  if (!(ipw.safety > 0 && ipw.safety <= 1)) {
    return FieldError("ipw.safety", absl::StrCat("must be in (0, 1], got ", ipw.safety));
  }
  if (!(ipw.min_headroom >= 0 && ipw.min_headroom < 1)) {
    return FieldError("ipw.min_headroom", absl::StrCat("must be in [0, 1), got ", ipw.min_headroom));
  }
  if (!(ipw.efficiency_slack >= 0)) {
    return FieldError("ipw.efficiency_slack", "must not be negative");
  }
  if (ipw.min_step_tokens < 1) return FieldError("ipw.min_step_tokens", "must be at least 1");
  if (!(ipw.pace >= 0 && ipw.pace <= 1)) {
    return FieldError("ipw.pace", absl::StrCat("must be in [0, 1], got ", ipw.pace));
  }
  if (ipw.batch_token_interval < absl::ZeroDuration()) {
    return FieldError("ipw.batch_token_interval_ms", "must not be negative");
  }
  return absl::OkStatus();
}

absl::StatusOr<SchedulerConfig> ParseSchedulerConfig(std::string_view json_text) {
  SchedulerConfig c;
  json root = json::parse(json_text.begin(), json_text.end(), nullptr, /*allow_exceptions=*/false);
  if (root.is_discarded()) return absl::InvalidArgumentError("scheduler config: not valid JSON");
  Object top(root, "");
  RETURN_IF_ERROR(top.Check({"policy", "lockstep", "max_batch_tokens", "max_running",
                             "max_inflight_per_rank", "batch_max_wait_ms", "retry_after_ms",
                             "tiers", "ipw", "prefix_affinity", "calibration"}));
  if (const json* p = top.Find("policy")) {
    if (!p->is_string()) return FieldError("policy", absl::StrCat("must be a string, got ", Describe(*p)));
    ASSIGN_OR_RETURN(c.policy, ParsePolicyKind(p->get<std::string>(), "policy"));
  }
  RETURN_IF_ERROR(top.Bool("lockstep", &c.lockstep));
  RETURN_IF_ERROR(top.Int("max_batch_tokens", 1, kIntMax, &c.max_batch_tokens));
  RETURN_IF_ERROR(top.Int("max_running", 1, kIntMax, &c.max_running));
  RETURN_IF_ERROR(top.Int("max_inflight_per_rank", 1, kIntMax, &c.max_inflight_per_rank));
  RETURN_IF_ERROR(top.Millis("batch_max_wait_ms", &c.batch_max_wait));
  RETURN_IF_ERROR(top.Millis("retry_after_ms", &c.retry_after));
  if (const json* tiers = top.Find("tiers")) {
    Object t(*tiers, "tiers");
    RETURN_IF_ERROR(t.Check({"fast", "priority", "standard", "batch"}));
    for (Tier tier : kAllTiers) {
      const std::string name(TierName(tier));
      const json* v = t.Find(name);
      if (v == nullptr) continue;
      Object o(*v, t.Path(name));
      RETURN_IF_ERROR(o.Check({"ttft_ms", "tpot_ms", "attainment", "queue_cap"}));
      TierSlo& slo = c.slo(tier);
      RETURN_IF_ERROR(o.Millis("ttft_ms", &slo.ttft));
      RETURN_IF_ERROR(o.Millis("tpot_ms", &slo.tpot));
      RETURN_IF_ERROR(o.Number("attainment", 0, 1, &slo.attainment));
      RETURN_IF_ERROR(o.Int("queue_cap", 1, kIntMax, &slo.queue_cap));
    }
  }
  if (const json* ipw = top.Find("ipw")) {
    Object o(*ipw, "ipw");
    RETURN_IF_ERROR(o.Check({"safety", "min_headroom", "efficiency_slack", "valley_hold_ms", "pace",
                             "batch_token_interval_ms", "min_step_tokens"}));
    RETURN_IF_ERROR(o.Number("safety", 1e-3, 1, &c.ipw.safety));
    RETURN_IF_ERROR(o.Number("min_headroom", 0, 0.999, &c.ipw.min_headroom));
    RETURN_IF_ERROR(o.Number("efficiency_slack", 0, 1e3, &c.ipw.efficiency_slack));
    RETURN_IF_ERROR(o.Millis("valley_hold_ms", &c.ipw.valley_hold));
    RETURN_IF_ERROR(o.Number("pace", 0, 1, &c.ipw.pace));
    RETURN_IF_ERROR(o.Millis("batch_token_interval_ms", &c.ipw.batch_token_interval));
    RETURN_IF_ERROR(o.Int("min_step_tokens", 1, kIntMax, &c.ipw.min_step_tokens));
  }
  if (const json* pa = top.Find("prefix_affinity")) {
    Object o(*pa, "prefix_affinity");
    RETURN_IF_ERROR(o.Check({"enabled", "block_tokens", "min_match_tokens", "max_load_gap",
                             "index_blocks"}));
    PrefixAffinityOptions& p = c.prefix_affinity;
    RETURN_IF_ERROR(o.Bool("enabled", &p.enabled));
    RETURN_IF_ERROR(o.Int("block_tokens", 1, 1 << 16, &p.block_tokens));
    RETURN_IF_ERROR(o.Int("min_match_tokens", 1, kIntMax, &p.min_match_tokens));
    RETURN_IF_ERROR(o.Int("max_load_gap", 0, kIntMax, &p.max_load_gap));
    RETURN_IF_ERROR(o.Int("index_blocks", 1, 1 << 26, &p.index_blocks));
  }
  if (const json* cal = top.Find("calibration")) {
    if (!cal->is_array()) {
      return FieldError("calibration", absl::StrCat("must be a list, got ", Describe(*cal)));
    }
    for (size_t i = 0; i < cal->size(); ++i) {
      Object o((*cal)[i], absl::StrCat("calibration[", i, "]"));
      RETURN_IF_ERROR(o.Check({"rank", "batch_tokens", "context_tokens", "duration_ms",
                               "energy_joules"}));
      for (const char* required : {"batch_tokens", "duration_ms", "energy_joules"}) {
        if (o.Find(required) == nullptr) return FieldError(o.Path(required), "is required");
      }
      CalibrationSample s;
      int tokens = 0;
      int context = 0;
      double joules = 0;
      s.sample.duration = absl::ZeroDuration();
      RETURN_IF_ERROR(o.Int("rank", 0, kIntMax, &s.rank));
      RETURN_IF_ERROR(o.Int("batch_tokens", 1, kIntMax, &tokens));
      RETURN_IF_ERROR(o.Int("context_tokens", 0, kIntMax, &context));
      RETURN_IF_ERROR(o.Millis("duration_ms", &s.sample.duration));
      RETURN_IF_ERROR(o.Number("energy_joules", 0, 1e12, &joules));
      s.sample.batch_tokens = tokens;
      s.sample.context_tokens = context;
      s.sample.energy_joules = joules;
      c.calibration.push_back(s);
    }
  }
  RETURN_IF_ERROR(c.Validate());
  return c;
}

std::string DescribeSchedulerConfig(const SchedulerConfig& c) {
  std::string out = absl::StrCat(
      "policy=", Sv(PolicyName(c.policy)), "\nlockstep=", c.lockstep ? "true" : "false",
      "\nmax_batch_tokens=", c.max_batch_tokens, "\nmax_running=", c.max_running,
      "\nmax_inflight_per_rank=", c.max_inflight_per_rank,
      "\nbatch_max_wait_ms=", absl::ToDoubleMilliseconds(c.batch_max_wait),
      "\nretry_after_ms=", absl::ToDoubleMilliseconds(c.retry_after), "\n");
  for (Tier t : kAllTiers) {
    const TierSlo& s = c.slo(t);
    absl::StrAppend(&out, "tiers.", Sv(TierName(t)), ": ttft_ms=", absl::ToDoubleMilliseconds(s.ttft),
                    " tpot_ms=", absl::ToDoubleMilliseconds(s.tpot), " attainment=", s.attainment,
                    " queue_cap=", s.queue_cap, "\n");
  }
  absl::StrAppend(&out, "ipw: safety=", c.ipw.safety, " min_headroom=", c.ipw.min_headroom,
                  " efficiency_slack=", c.ipw.efficiency_slack,
                  " valley_hold_ms=", absl::ToDoubleMilliseconds(c.ipw.valley_hold),
                  " pace=", c.ipw.pace, " min_step_tokens=", c.ipw.min_step_tokens,
                  " batch_token_interval_ms=", absl::ToDoubleMilliseconds(c.ipw.batch_token_interval),
                  "\nprefix_affinity: enabled=", c.prefix_affinity.enabled ? "true" : "false",
                  " block_tokens=", c.prefix_affinity.block_tokens,
                  " min_match_tokens=", c.prefix_affinity.min_match_tokens,
                  " max_load_gap=", c.prefix_affinity.max_load_gap,
                  " index_blocks=", c.prefix_affinity.index_blocks,
                  "\ncalibration_samples=", c.calibration.size(), "\n");
  return out;
}

}  // namespace joule::scheduler
