#include "worker/telemetry/energy_attributor.h"

#include "absl/strings/str_cat.h"

namespace joule::telemetry {

double SplitByTokens(double joules, absl::Span<const StepTokens> tokens,
                     absl::flat_hash_map<uint64_t, double>* out) {
  int64_t total = 0;
  for (const StepTokens& t : tokens) total += t.tokens > 0 ? t.tokens : 0;
  if (total == 0) return 0;
  for (const StepTokens& t : tokens) {
    if (t.tokens <= 0) continue;
    (*out)[t.request_id] += joules * (static_cast<double>(t.tokens) / static_cast<double>(total));
  }
  return joules;
}

absl::Status EnergyAttributor::Read(double* joules) {
  absl::StatusOr<double> r = meter_->ReadJoules();
  if (!r.ok()) {
    ++totals_.failed_reads;
    have_last_ = false;
    return r.status();
  }
  *joules = *r;
  return absl::OkStatus();
}

absl::Status EnergyAttributor::BeginStep() {
  absl::MutexLock lock(&mu_);
  in_step_ = false;
  double now = 0;
  if (absl::Status s = Read(&now); !s.ok()) return s;
  if (have_last_) totals_.idle_joules += now - last_;
  if (!first_.has_value()) first_ = now;
  last_ = now;
  have_last_ = true;
  in_step_ = true;
  return absl::OkStatus();
}

absl::Status EnergyAttributor::CloseStep(const char* caller, double* joules) {
  if (!in_step_ || !have_last_) {
    return absl::FailedPreconditionError(absl::StrCat(caller, " without a successful BeginStep"));
  }
  in_step_ = false;
  double now = 0;
  if (absl::Status s = Read(&now); !s.ok()) return s;
  *joules = now - last_;
  last_ = now;
  return absl::OkStatus();
}

absl::Status EnergyAttributor::EndStep(absl::Span<const StepTokens> tokens, double* step_joules) {
  absl::MutexLock lock(&mu_);
  double step = 0;
  if (absl::Status s = CloseStep("EndStep", &step); !s.ok()) return s;
  if (step_joules != nullptr) *step_joules = step;
  ++totals_.steps;
  const double handed = SplitByTokens(step, tokens, &per_request_);
  totals_.attributed_joules += handed;
  totals_.unattributed_joules += step - handed;
  if (handed > 0) {
    for (const StepTokens& t : tokens) totals_.tokens += t.tokens > 0 ? t.tokens : 0;
  }
  return absl::OkStatus();
}

absl::Status EnergyAttributor::EndIdleStep() {
  absl::MutexLock lock(&mu_);
  double round = 0;
  if (absl::Status s = CloseStep("EndIdleStep", &round); !s.ok()) return s;
  totals_.idle_joules += round;
  return absl::OkStatus();
}

double EnergyAttributor::TakeRequestJoules(uint64_t request_id) {
  absl::MutexLock lock(&mu_);
  auto it = per_request_.find(request_id);
  if (it == per_request_.end()) return 0;
  const double j = it->second;
  per_request_.erase(it);
  return j;
}

double EnergyAttributor::PeekRequestJoules(uint64_t request_id) const {
  absl::MutexLock lock(&mu_);
  auto it = per_request_.find(request_id);
  return it == per_request_.end() ? 0 : it->second;
}

EnergyAttributor::Totals EnergyAttributor::totals() const {
  absl::MutexLock lock(&mu_);
  return totals_;
}

std::optional<double> EnergyAttributor::first_reading() const {
  absl::MutexLock lock(&mu_);
  return first_;
}

}  // namespace joule::telemetry
