// Interactivity per watt: the most tokens per joule such that every tier
// meets its SLO.
//
// One step's latency is shared by every sequence in it (and, in expert
// parallelism, by every rank), while its fixed cost (weights read once per
// step) is shared by its tokens: joules per token fall as steps grow, until
// the step time breaks the TPOT of the most demanding tier in it. So:
//  - Step budget: while a tier with a TPOT target is in flight, a rank's step
//    gets as many tokens as the cost model predicts fit in safety * TPOT
//    (minus the measured time between steps); otherwise the full cap.
//  - Composition: the budget goes to tiers in order; running batch sequences
//    that get none skip the step and keep their KV blocks.
//  - Filling: batch work is dispatched into steps that run anyway for
//    interactive tiers, up to the budget, while those tiers have SLO headroom.
//  - Valleys: batch work that would run alone waits until there is enough for
//    an efficient step (cost model), or until the oldest has waited
//    ipw.valley_hold; then all of it starts together.
//  - Preemption: when a rank's running slots are full and interactive work
//    waits there, the newest batch sequences yield.
//  - Pacing: a decoding request needs a token only every pace * its TPOT
//    target (batch: every ipw.batch_token_interval); workers skip steps while
//    every running request is paced and not due, so tokens gather into fewer,
//    fuller steps that pay the fixed step cost less often.
//  - The safety margin shrinks when a request misses its TPOT and recovers
//    slowly on hits, absorbing what the cost model gets wrong.
#include <algorithm>
#include <array>
#include <limits>

#include "scheduler/policy.h"

namespace joule::scheduler {
namespace {

using policy_internal::InFlight;
using policy_internal::CachedOn;
using policy_internal::LeastLoaded;
using policy_internal::MaxBatchTokens;
using policy_internal::MaxRunning;
using policy_internal::PreferCached;
using policy_internal::Starved;

bool HasTpotTarget(const PolicyState& s, const Request& r) {
  return s.config->slo(r.tier()).tpot > absl::ZeroDuration();
}

class IpwPolicy final : public Policy {
 public:
  explicit IpwPolicy(const SchedulerConfig& config)
      : safety_(config.ipw.safety), max_safety_(config.ipw.safety) {
    for (Tier t : kAllTiers) {
      const absl::Duration tpot = config.slo(t).tpot;
      intervals_[static_cast<int>(t)] =
          config.ipw.pace <= 0 ? absl::ZeroDuration()
          : tpot > absl::ZeroDuration() ? tpot * config.ipw.pace
                                        : config.ipw.batch_token_interval;
    }
  }

  PolicyKind kind() const override { return PolicyKind::kIpw; }
  double safety() const override { return safety_; }

  void OnFinished(Tier /*tier*/, bool /*attained*/, bool tpot_ok) override {
    // Called only for tiers with a TPOT target (see Scheduler::OnFinished).
    if (!tpot_ok) {
      safety_ = std::max(kMinSafety, safety_ * 0.95);
    } else {
      safety_ = std::min(max_safety_, safety_ + 0.002);
    }
  }

  std::vector<Assignment> Dispatch(const PolicyState& s, const std::vector<int>& ready) override {
    std::vector<Assignment> out;
    std::map<int, int64_t> added;
    auto send = [&](const Request* r, int rank) {
      added[rank]++;
      out.push_back({r->info.id, rank, r->tier()});
    };

    // 1. Batch work at its maximum wait goes first, whatever it costs.
    const auto& batch = (*s.queues)[static_cast<int>(Tier::kBatch)];
    std::vector<const Request*> held_batch;
    bool burst = false;  // steps for batch start now anyway
    for (const auto& [seq, r] : batch) {
      if (Starved(s, *r)) {
        std::optional<int> rank = PreferCached(s, *r, ready, added, LeastLoaded(s, ready, added));
        if (!rank) return out;
        send(r, *rank);
        burst = true;
      } else {
        held_batch.push_back(r);
      }
    }

    // 2. Interactive tiers at once, in tier order.
    std::map<int, int64_t> added_load;
    for (Tier t : {Tier::kFast, Tier::kPriority, Tier::kStandard}) {
      for (const auto& [seq, r] : (*s.queues)[static_cast<int>(t)]) {
        std::optional<int> rank =
            PreferCached(s, *r, ready, added, ChooseInteractiveRank(s, ready, added, added_load));
        if (!rank) return out;
        added_load[*rank] += 1 + r->info.prompt_tokens - CachedOn(s, *r, *rank);
        send(r, *rank);
      }
    }
    if (held_batch.empty()) return out;

    // 3. Batch: room per rank, in decode slots (one token per sequence per step).
    const bool headroom_ok = Headroom(s) >= s.config->ipw.min_headroom;
    std::map<int, int64_t> room;
    int64_t valley_target = 0;  // batch sequences that make unconstrained steps efficient
    int64_t valley_batch = 0;   // batch sequences already on those ranks
    int64_t burst_left = 0;     // steps the batch already there still needs
    for (int rank : ready) {
      const int64_t slots = InFlight(s, rank) + added[rank];
      const int64_t capacity = s.config->max_inflight_per_rank - slots;
      if (Constrained(s, rank)) {
        const int64_t fill = headroom_ok ? Budget(s, rank, Tightest(s, rank), nullptr) - slots : 0;
        room[rank] = std::min(fill, capacity);
        continue;
      }
      const int64_t slot_cap = std::min(MaxRunning(s, rank), MaxBatchTokens(s, rank));
      room[rank] = std::min(slot_cap - slots, capacity);
      valley_target += s.cost->EfficientBatch(rank, Context(s, rank), slot_cap,
                                              s.config->ipw.efficiency_slack);
      valley_batch += slots;
      if (auto it = s.ranks->find(rank); it != s.ranks->end()) {
        for (const auto& [seq, r] : it->second) {
          burst_left = std::max(burst_left, r->info.max_tokens - r->generated);
        }
      }
    }
    // Steps for batch alone pay off only with enough batch to fill them:
    // until then it waits (at most ipw.valley_hold), except work short enough
    // to finish within steps that run anyway for the batch already there.
    burst = burst || valley_batch + static_cast<int64_t>(held_batch.size()) >= valley_target ||
            s.now - held_batch.front()->submitted >= s.config->ipw.valley_hold;
    for (const Request* r : held_batch) {
      const bool joins = burst || r->info.max_tokens <= burst_left;
      std::optional<int> best;
      int64_t best_room = 0;
      for (int rank : ready) {
        if (!Constrained(s, rank) && !joins) continue;
        if (room[rank] > best_room) {
          best = rank;
          best_room = room[rank];
        }
      }
      if (!best) continue;
      room[*best]--;
      send(r, *best);
    }
    return out;
  }

  absl::Duration TokenInterval(Tier tier) const override {
    return intervals_[static_cast<int>(tier)];
  }

  int64_t StepTokenCap(const PolicyState& s, int rank, Tier tier) override {
    const absl::Duration tpot = s.config->slo(tier).tpot;
    if (tpot <= absl::ZeroDuration()) return 0;
    return Budget(s, rank, tpot, nullptr);
  }

  StepLimits Limits(const PolicyState& s, int rank) override {
    StepLimits l;
    l.max_running = MaxRunning(s, rank);
    l.max_batch_tokens = Budget(s, rank, Tightest(s, rank), &l.step_time_budget);
    auto it = s.ranks->find(rank);
    if (it == s.ranks->end()) return l;

    // Order: starved batch not started yet, interactive tiers in tier order,
    // started starved batch, running batch (oldest first, so the newest pause
    // first), then waiting batch.
    std::vector<const Request*> seqs;
    for (const auto& [seq, r] : it->second) seqs.push_back(r);
    auto key = [](const Request* r) {
      int cls;
      if (r->starved && !r->first_token) {
        cls = 0;  // the starvation bound is on starting
      } else if (r->starved) {
        cls = 9;  // started: ahead of other batch, behind interactive tiers
      } else if (r->tier() != Tier::kBatch) {
        cls = 1 + static_cast<int>(r->tier());
      } else {
        cls = r->state == Request::State::kRunning ? 10 : 11;
      }
      return std::make_pair(cls, r->seq);
    };
    std::sort(seqs.begin(), seqs.end(),
              [&](const Request* a, const Request* b) { return key(a) < key(b); });
    int64_t running = 0;
    int64_t interactive_waiting = 0;
    std::vector<const Request*> batch_running;
    for (const Request* r : seqs) {
      l.order.push_back(r->info.id);
      if (r->state == Request::State::kRunning) {
        ++running;
        if (r->tier() == Tier::kBatch && !r->starved) batch_running.push_back(r);
      } else if (r->tier() != Tier::kBatch || r->starved) {
        ++interactive_waiting;
      }
    }
    // Slots for waiting interactive work come from the newest batch sequences.
    int64_t excess = running + interactive_waiting - l.max_running;
    for (auto b = batch_running.rbegin(); excess > 0 && b != batch_running.rend(); ++b, --excess) {
      l.preempt.push_back((*b)->info.id);
    }
    return l;
  }

 private:
  std::array<absl::Duration, 4> intervals_;  // pacing per tier
  static constexpr double kMinSafety = 0.5;

  // Is `rank`'s step time bounded by a TPOT target? In lockstep every rank's
  // step is, as soon as any rank has such a request.
  bool Constrained(const PolicyState& s, int rank) const {
    return Tightest(s, rank).has_value();
  }

  std::optional<absl::Duration> Tightest(const PolicyState& s, int rank) const {
    std::optional<absl::Duration> tightest;
    auto scan = [&](const std::map<uint64_t, Request*>& reqs) {
      for (const auto& [seq, r] : reqs) {
        if (!HasTpotTarget(s, *r)) continue;
        const absl::Duration t = s.config->slo(r->tier()).tpot;
        if (!tightest || t < *tightest) tightest = t;
      }
    };
    if (s.config->lockstep) {
      for (const auto& [r, reqs] : *s.ranks) scan(reqs);
    } else if (auto it = s.ranks->find(rank); it != s.ranks->end()) {
      scan(it->second);
    }
    return tightest;
  }

  static int64_t Context(const PolicyState& s, int rank) {
    auto it = s.ranks->find(rank);
    if (it == s.ranks->end()) return 0;
    int64_t ctx = 0;
    for (const auto& [seq, r] : it->second) {
      if (r->state == Request::State::kRunning) ctx += r->context();
    }
    return ctx;
  }

  // Tokens `rank` may put into its next step for steps to stay within
  // `tightest` (a TPOT target; none: the full cap).
  int64_t Budget(const PolicyState& s, int rank, std::optional<absl::Duration> tightest,
                 absl::Duration* time_budget) const {
    const int64_t cap = MaxBatchTokens(s, rank);
    if (!tightest) {
      if (time_budget) *time_budget = absl::InfiniteDuration();
      return cap;
    }
    double gap = 0;
    if (auto g = s.step_gap_s->find(rank); g != s.step_gap_s->end()) gap = g->second;
    const absl::Duration budget = *tightest * safety_ - absl::Seconds(gap);
    if (time_budget) *time_budget = budget;
    int64_t tokens = s.cost->MaxTokensWithin(rank, budget, Context(s, rank), cap);
    // Never below one token per sequence that has a TPOT target: pausing it
    // would only make its TPOT worse.
    int64_t constrained = 0;
    if (auto it = s.ranks->find(rank); it != s.ranks->end()) {
      for (const auto& [seq, r] : it->second) {
        if (HasTpotTarget(s, *r)) ++constrained;
      }
    }
    // The floor stays within the cap: a worker may allow fewer tokens than
    // min_step_tokens (and std::clamp needs floor <= cap).
    const int64_t floor =
        std::min(cap, std::max<int64_t>({constrained, 1, s.config->ipw.min_step_tokens}));
    return std::clamp<int64_t>(tokens, floor, cap);
  }

  // 1 - observed TPOT / target of the worst running request with a TPOT
  // target; 1 when there is none.
  double Headroom(const PolicyState& s) const {
    double headroom = 1.0;
    for (const auto& [rank, reqs] : *s.ranks) {
      for (const auto& [seq, r] : reqs) {
        if (!HasTpotTarget(s, *r) || !r->first_token || r->generated < 2) continue;
        const double target = absl::ToDoubleSeconds(s.config->slo(r->tier()).tpot);
        const double tpot = absl::ToDoubleSeconds(r->last_token - *r->first_token) /
                            static_cast<double>(r->generated - 1);
        headroom = std::min(headroom, 1.0 - tpot / target);
      }
    }
    return headroom;
  }

  // Interactive work already on `rank`, in tokens its next steps must carry
  // ahead of batch: one per sequence plus the prompts still to prefill.
  static int64_t InteractiveLoad(const PolicyState& s, int rank) {
    auto it = s.ranks->find(rank);
    if (it == s.ranks->end()) return 0;
    int64_t load = 0;
    for (const auto& [seq, r] : it->second) {
      if (r->tier() == Tier::kBatch && !r->starved) continue;
      load += 1 + (r->first_token ? 0 : r->info.prompt_tokens - r->cached_tokens);
    }
    return load;
  }

  // Lockstep: the rank with the least interactive work (paused batch
  // sequences do not slow a step, interactive ones share its budget).
  // Independent ranks: pack interactive work onto ranks already capped by a
  // TPOT target while their budget has room, so the others keep running
  // large, efficient batches.
  std::optional<int> ChooseInteractiveRank(const PolicyState& s, const std::vector<int>& ready,
                                           const std::map<int, int64_t>& added,
                                           const std::map<int, int64_t>& added_load) const {
    auto added_at = [](const std::map<int, int64_t>& m, int rank) {
      auto a = m.find(rank);
      return a == m.end() ? int64_t{0} : a->second;
    };
    if (!s.config->lockstep) {
      std::optional<int> best;
      int64_t best_room = 0;
      for (int rank : ready) {
        if (!Constrained(s, rank)) continue;
        const int64_t slots = InFlight(s, rank) + added_at(added, rank);
        if (slots >= s.config->max_inflight_per_rank) continue;
        const int64_t room = Budget(s, rank, Tightest(s, rank), nullptr) - slots;
        if (room > best_room) {
          best = rank;
          best_room = room;
        }
      }
      if (best) return best;
      return LeastLoaded(s, ready, added);
    }
    std::optional<int> best;
    int64_t best_load = std::numeric_limits<int64_t>::max();
    for (int rank : ready) {
      if (InFlight(s, rank) + added_at(added, rank) >= s.config->max_inflight_per_rank) continue;
      const int64_t load = InteractiveLoad(s, rank) + added_at(added_load, rank);
      if (load < best_load) {
        best = rank;
        best_load = load;
      }
    }
    return best;
  }

  double safety_;
  double max_safety_;
};

}  // namespace

std::unique_ptr<Policy> MakeIpwPolicy(const SchedulerConfig& config) {
  return std::make_unique<IpwPolicy>(config);
}

}  // namespace joule::scheduler
