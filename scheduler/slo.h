// Per-tier SLO accounting: every finished request is checked against its
// tier's TTFT and TPOT targets (TPOT = mean time per output token after the
// first), counted as attained or missed, and kept in a short window too so a
// policy can react to recent misses. Cancelled and rejected requests are
// counted apart: they never finished, so they neither attain nor miss.
#pragma once

#include <array>
#include <cstdint>
#include <deque>
#include <optional>

#include "absl/time/time.h"
#include "scheduler/config.h"
#include "scheduler/tier.h"

namespace joule::scheduler {

struct TierStats {
  int64_t submitted = 0;
  int64_t rejected = 0;   // refused at the queue cap (429)
  int64_t cancelled = 0;  // client went away or the request failed
  int64_t finished = 0;
  int64_t attained = 0;   // finished and met both targets
  int64_t ttft_met = 0;
  int64_t tpot_met = 0;
  int64_t output_tokens = 0;  // of finished requests
  double energy_joules = 0;   // attributed by share of step tokens
  int64_t step_tokens = 0;    // tokens this tier had in measured steps

  // Attained / finished; 1 before anything finished (nothing was missed).
  double attainment() const {
    return finished == 0 ? 1.0 : static_cast<double>(attained) / static_cast<double>(finished);
  }
  // Step tokens per attributed joule; 0 before any energy was measured.
  double tokens_per_joule() const {
    return energy_joules > 0 ? static_cast<double>(step_tokens) / energy_joules : 0.0;
  }
};

struct RequestTiming {
  absl::Duration ttft;                 // submit -> first token
  std::optional<absl::Duration> tpot;  // absent with fewer than two tokens
  int64_t output_tokens = 0;
};

class SloTracker {
 public:
  explicit SloTracker(const std::array<TierSlo, 4>& slos, int window = 200);

  // True when the request met its tier's targets.
  static bool Meets(const TierSlo& slo, const RequestTiming& t, bool* ttft_ok, bool* tpot_ok);

  void RecordSubmitted(Tier tier) { at(tier).submitted++; }
  void RecordRejected(Tier tier) { at(tier).rejected++; }
  void RecordCancelled(Tier tier) { at(tier).cancelled++; }
  // Returns whether it attained the SLO.
  bool RecordFinished(Tier tier, const RequestTiming& timing);
  void RecordStepEnergy(Tier tier, int64_t tokens, double joules);

  const TierStats& stats(Tier tier) const { return stats_[static_cast<int>(tier)]; }
  // Attainment over the last `window` finished requests of the tier.
  double RecentAttainment(Tier tier) const;

 private:
  TierStats& at(Tier tier) { return stats_[static_cast<int>(tier)]; }

  std::array<TierSlo, 4> slos_;
  int window_;
  std::array<TierStats, 4> stats_;
  std::array<std::deque<bool>, 4> recent_;
};

}  // namespace joule::scheduler
