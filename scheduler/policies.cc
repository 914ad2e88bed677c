// fcfs and priority: the two baselines every benchmark compares against.
#include <algorithm>
#include <limits>

#include "scheduler/policy.h"

namespace joule::scheduler {
namespace policy_internal {

bool Starved(const PolicyState& s, const Request& r) {
  return r.tier() == Tier::kBatch && s.now - r.submitted >= s.config->batch_max_wait;
}

int64_t InFlight(const PolicyState& s, int rank) {
  auto it = s.ranks->find(rank);
  return it == s.ranks->end() ? 0 : static_cast<int64_t>(it->second.size());
}

namespace {

EngineLimits EngineOf(const PolicyState& s, int rank) {
  if (s.engine_limits == nullptr) return {};
  auto it = s.engine_limits->find(rank);
  return it == s.engine_limits->end() ? EngineLimits{} : it->second;
}

int Capped(int configured, int engine) {
  return engine > 0 ? std::min(configured, engine) : configured;
}

}  // namespace

int MaxRunning(const PolicyState& s, int rank) {
  return Capped(s.config->max_running, EngineOf(s, rank).max_running);
}

int MaxBatchTokens(const PolicyState& s, int rank) {
  return Capped(s.config->max_batch_tokens, EngineOf(s, rank).max_batch_tokens);
}

std::optional<int> LeastLoaded(const PolicyState& s, const std::vector<int>& ready,
                               const std::map<int, int64_t>& added) {
  std::optional<int> best;
  int64_t best_load = std::numeric_limits<int64_t>::max();
  for (int rank : ready) {
    auto a = added.find(rank);
    const int64_t load = InFlight(s, rank) + (a == added.end() ? 0 : a->second);
    if (load >= s.config->max_inflight_per_rank) continue;
    if (load < best_load) {  // `ready` is sorted: ties keep the lower rank
      best = rank;
      best_load = load;
    }
  }
  return best;
}

int64_t CachedOn(const PolicyState& s, const Request& r, int rank) {
  if (s.prefix == nullptr || r.info.prefix_blocks.empty()) return 0;
  const absl::flat_hash_map<int, int64_t> held = s.prefix->LeadingBlocks(r.info.prefix_blocks);
  auto it = held.find(rank);
  if (it == held.end()) return 0;
  // The last prompt token is always computed: its logits give the first token.
  return std::min(it->second * s.config->prefix_affinity.block_tokens, r.info.prompt_tokens - 1);
}

std::optional<int> PreferCached(const PolicyState& s, const Request& r,
                                const std::vector<int>& ready,
                                const std::map<int, int64_t>& added, std::optional<int> chosen) {
  const PrefixAffinityOptions& o = s.config->prefix_affinity;
  if (!o.enabled || !chosen || s.prefix == nullptr || r.info.prefix_blocks.empty()) return chosen;
  const absl::flat_hash_map<int, int64_t> held = s.prefix->LeadingBlocks(r.info.prefix_blocks);
  auto load = [&](int rank) {
    auto a = added.find(rank);
    return InFlight(s, rank) + (a == added.end() ? 0 : a->second);
  };
  auto blocks_on = [&](int rank) {
    auto it = held.find(rank);
    return it == held.end() ? int64_t{0} : it->second;
  };
  std::optional<int> best = chosen;
  for (int rank : ready) {
    const int64_t blocks = blocks_on(rank);
    if (blocks * o.block_tokens < o.min_match_tokens || blocks <= blocks_on(*best)) continue;
    if (load(rank) >= s.config->max_inflight_per_rank) continue;
    if (load(rank) > load(*chosen) + o.max_load_gap) continue;
    best = rank;
  }
  return best;
}

}  // namespace policy_internal

namespace {

using policy_internal::LeastLoaded;
using policy_internal::MaxBatchTokens;
using policy_internal::MaxRunning;
using policy_internal::PreferCached;
using policy_internal::Starved;

// Sends `candidates` in order to the least loaded ranks until all are full.
std::vector<Assignment> SpreadInOrder(const PolicyState& s, const std::vector<int>& ready,
                                      const std::vector<const Request*>& candidates) {
  std::vector<Assignment> out;
  std::map<int, int64_t> added;
  for (const Request* r : candidates) {
    std::optional<int> rank = PreferCached(s, *r, ready, added, LeastLoaded(s, ready, added));
    if (!rank) break;
    added[*rank]++;
    out.push_back({r->info.id, *rank, r->tier()});
  }
  return out;
}

// Continuous batching with no tiers: arrival order everywhere, one fixed cap.
class FcfsPolicy final : public Policy {
 public:
  PolicyKind kind() const override { return PolicyKind::kFcfs; }

  std::vector<Assignment> Dispatch(const PolicyState& s, const std::vector<int>& ready) override {
    std::vector<const Request*> all;
    for (const auto& queue : *s.queues) {
      for (const auto& [seq, r] : queue) all.push_back(r);
    }
    std::sort(all.begin(), all.end(),
              [](const Request* a, const Request* b) { return a->seq < b->seq; });
    return SpreadInOrder(s, ready, all);
  }

  StepLimits Limits(const PolicyState& s, int rank) override {
    StepLimits l;
    l.max_batch_tokens = MaxBatchTokens(s, rank);
    l.max_running = MaxRunning(s, rank);
    return l;  // empty order: the engine's own FCFS
  }
};

// Strict tier order (fast, priority, standard, batch; FCFS within a tier) for
// dispatch, step budget and running slots, with the same fixed cap as fcfs;
// energy plays no part. Batch that waited its maximum goes first.
class PriorityPolicy final : public Policy {
 public:
  PolicyKind kind() const override { return PolicyKind::kPriority; }

  std::vector<Assignment> Dispatch(const PolicyState& s, const std::vector<int>& ready) override {
    std::vector<const Request*> order;
    const auto& batch = (*s.queues)[static_cast<int>(Tier::kBatch)];
    for (const auto& [seq, r] : batch) {
      if (Starved(s, *r)) order.push_back(r);
    }
    for (Tier t : kAllTiers) {
      for (const auto& [seq, r] : (*s.queues)[static_cast<int>(t)]) {
        if (!(t == Tier::kBatch && Starved(s, *r))) order.push_back(r);
      }
    }
    return SpreadInOrder(s, ready, order);
  }

  StepLimits Limits(const PolicyState& s, int rank) override {
    StepLimits l;
    l.max_batch_tokens = MaxBatchTokens(s, rank);
    l.max_running = MaxRunning(s, rank);
    auto it = s.ranks->find(rank);
    if (it == s.ranks->end()) return l;
    std::vector<const Request*> seqs;
    for (const auto& [seq, r] : it->second) seqs.push_back(r);
    auto key = [](const Request* r) {
      return std::make_tuple(r->starved ? 0 : 1, static_cast<int>(r->tier()), r->seq);
    };
    std::sort(seqs.begin(), seqs.end(),
              [&](const Request* a, const Request* b) { return key(a) < key(b); });
    for (const Request* r : seqs) l.order.push_back(r->info.id);

    // Running slots are full: each waiting sequence takes the slot of the
    // newest running one of a lower tier.
    std::vector<const Request*> running;
    std::vector<const Request*> waiting;
    for (const Request* r : seqs) {
      (r->state == Request::State::kRunning ? running : waiting).push_back(r);
    }
    int64_t free_slots = l.max_running - static_cast<int64_t>(running.size());
    // Victims: lowest tier first, newest first within a tier.
    std::vector<const Request*> victims(running.rbegin(), running.rend());
    size_t v = 0;
    for (const Request* w : waiting) {
      if (free_slots > 0) {
        --free_slots;
        continue;
      }
      while (v < victims.size() && victims[v]->starved) ++v;
      if (v == victims.size() || victims[v]->tier() <= w->tier()) break;
      l.preempt.push_back(victims[v++]->info.id);
    }
    return l;
  }
};

}  // namespace

std::unique_ptr<Policy> MakeIpwPolicy(const SchedulerConfig& config);

std::unique_ptr<Policy> MakePolicy(const SchedulerConfig& config) {
  switch (config.policy) {
    case PolicyKind::kFcfs:
      return std::make_unique<FcfsPolicy>();
    case PolicyKind::kPriority:
      return std::make_unique<PriorityPolicy>();
    case PolicyKind::kIpw:
      return MakeIpwPolicy(config);
  }
  return std::make_unique<FcfsPolicy>();
}

}  // namespace joule::scheduler
