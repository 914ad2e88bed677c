#include "scheduler/slo.h"

namespace joule::scheduler {

SloTracker::SloTracker(const std::array<TierSlo, 4>& slos, int window)
    : slos_(slos), window_(window > 0 ? window : 1) {}

bool SloTracker::Meets(const TierSlo& slo, const RequestTiming& t, bool* ttft_ok, bool* tpot_ok) {
  *ttft_ok = slo.ttft <= absl::ZeroDuration() || t.ttft <= slo.ttft;
  // One token has no time per output token: nothing to miss.
  *tpot_ok = slo.tpot <= absl::ZeroDuration() || !t.tpot.has_value() || *t.tpot <= slo.tpot;
  return *ttft_ok && *tpot_ok;
}

bool SloTracker::RecordFinished(Tier tier, const RequestTiming& timing) {
  bool ttft_ok = false;
  bool tpot_ok = false;
  const bool ok = Meets(slos_[static_cast<int>(tier)], timing, &ttft_ok, &tpot_ok);
  TierStats& s = at(tier);
  s.finished++;
  s.attained += ok ? 1 : 0;
  s.ttft_met += ttft_ok ? 1 : 0;
  s.tpot_met += tpot_ok ? 1 : 0;
  s.output_tokens += timing.output_tokens;
  std::deque<bool>& recent = recent_[static_cast<int>(tier)];
  recent.push_back(ok);
  if (static_cast<int>(recent.size()) > window_) recent.pop_front();
  return ok;
}

void SloTracker::RecordStepEnergy(Tier tier, int64_t tokens, double joules) {
  TierStats& s = at(tier);
  s.step_tokens += tokens;
  s.energy_joules += joules;
}

double SloTracker::RecentAttainment(Tier tier) const {
  const std::deque<bool>& recent = recent_[static_cast<int>(tier)];
  if (recent.empty()) return 1.0;
  int64_t ok = 0;
  for (bool b : recent) ok += b ? 1 : 0;
  return static_cast<double>(ok) / static_cast<double>(recent.size());
}

}  // namespace joule::scheduler
