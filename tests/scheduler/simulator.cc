#include "tests/scheduler/simulator.h"

#include <algorithm>
#include <cmath>
#include <deque>
#include <map>
#include <memory>
#include <random>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "scheduler/fake_clock.h"
#include "scheduler/scheduler.h"

namespace joule::scheduler::sim {
namespace {

// Uniform [0, 1) from the generator's bits, the same on every platform
// (std:: distributions are implementation-defined).
double Uniform(std::mt19937_64& rng) { return static_cast<double>(rng() >> 11) * 0x1.0p-53; }
int UniformInt(std::mt19937_64& rng, int lo, int hi) {
  return lo + static_cast<int>(Uniform(rng) * (hi - lo + 1));
}

struct Seq {
  uint64_t id = 0;
  Tier tier = Tier::kStandard;
  int prompt = 0;
  int output = 0;
  int generated = 0;
  int computed = 0;  // tokens with K/V in the cache
  bool running = false;
  double submitted_s = 0;
  double first_token_s = -1;
  double last_token_s = 0;
  int64_t order = 0;  // admission order (running) or arrival order on the rank (waiting)
  int length() const { return prompt + generated; }
};

struct Rank {
  std::vector<Seq*> running;  // admission order
  std::deque<Seq*> waiting;   // FCFS
};

struct Planned {
  Seq* seq;
  int chunk;
};

}  // namespace

std::vector<SimRequest> MakeTrace(const std::vector<TierLoad>& loads, double duration_s,
                                  double period_s, uint64_t seed) {
  std::vector<SimRequest> out;
  std::mt19937_64 rng(seed);
  for (const TierLoad& l : loads) {
    const double max_rate = std::max(l.peak_rate, l.valley_rate);
    if (max_rate <= 0) continue;
    // Thinning: candidates at the peak rate, kept with probability rate/max.
    for (double t = 0;;) {
      t += -std::log(1.0 - Uniform(rng)) / max_rate;
      if (t >= duration_s) break;
      const bool peak = std::fmod(t, period_s) < period_s / 2;
      const double rate = peak ? l.peak_rate : l.valley_rate;
      const double keep = Uniform(rng);
      const int prompt = UniformInt(rng, l.prompt_min, l.prompt_max);
      const int output = UniformInt(rng, l.output_min, l.output_max);
      if (keep * max_rate >= rate) continue;
      out.push_back({0, l.tier, t, prompt, output});
    }
  }
  std::stable_sort(out.begin(), out.end(),
                   [](const SimRequest& a, const SimRequest& b) { return a.arrival_s < b.arrival_s; });
  for (size_t i = 0; i < out.size(); ++i) out[i].id = i + 1;
  return out;
}

SimResult Simulate(const SchedulerConfig& config, const std::vector<SimRequest>& trace,
                   const SimOptions& o) {
  const absl::Time t0 = absl::UnixEpoch() + absl::Hours(24);
  FakeClock clock(t0);
  auto sched_or = Scheduler::Create(config, &clock);
  SimResult res;
  if (!sched_or.ok()) return res;
  Scheduler& sched = **sched_or;
  const double poll = o.idle_poll_s;
  auto set_time = [&](double s) { clock.Set(t0 + absl::Seconds(s)); };

  absl::flat_hash_map<uint64_t, std::unique_ptr<Seq>> seqs;
  std::vector<Rank> ranks(o.ranks);
  ClusterView view;
  for (int r = 0; r < o.ranks; ++r) view.ranks.push_back({r, true});
  std::array<double, 4> tpot_sum{};
  int64_t order = 0;
  size_t next = 0;
  double now = 0;
  int64_t in_system = 0;

  auto dispatch = [&]() {
    for (const Assignment& a : sched.Dispatch(view)) {
      Seq* s = seqs.at(a.id).get();
      TierResult& tr = res.tiers[static_cast<int>(s->tier)];
      tr.max_queue_wait_s = std::max(tr.max_queue_wait_s, now - s->submitted_s);
      s->order = order++;
      ranks[a.rank].waiting.push_back(s);
    }
  };
  auto submit_until = [&](double t) {
    while (next < trace.size() && trace[next].arrival_s <= t) {
      const SimRequest& q = trace[next++];
      now = std::max(now, q.arrival_s);
      set_time(now);
      TierResult& tr = res.tiers[static_cast<int>(q.tier)];
      tr.submitted++;
      absl::Status st = sched.Submit({q.id, q.tier, q.prompt, q.output});
      if (!st.ok()) {
        tr.rejected++;
        continue;
      }
      auto s = std::make_unique<Seq>();
      s->id = q.id;
      s->tier = q.tier;
      s->prompt = q.prompt;
      s->output = q.output;
      s->submitted_s = now;
      seqs[q.id] = std::move(s);
      ++in_system;
      dispatch();
    }
  };

  while (next < trace.size() || in_system > 0) {
    submit_until(now);
    dispatch();

    // Plan every rank's step from its limits, as the engine will.
    std::vector<std::vector<Planned>> plans(o.ranks);
    double step_s = 0;
    std::vector<double> rank_s(o.ranks, 0);
    std::vector<int64_t> rank_tokens(o.ranks, 0), rank_ctx(o.ranks, 0);
    std::vector<TierTokens> tier_tokens(o.ranks, TierTokens{});
    for (int r = 0; r < o.ranks; ++r) {
      Rank& rk = ranks[r];
      StepLimits lim = sched.StepLimitsFor(r);
      for (uint64_t id : lim.preempt) {
        auto it = std::find_if(rk.running.begin(), rk.running.end(),
                               [&](Seq* s) { return s->id == id; });
        if (it == rk.running.end()) continue;
        Seq* s = *it;
        rk.running.erase(it);
        s->running = false;
        s->computed = 0;  // recompute prompt and generated tokens later
        rk.waiting.push_front(s);
        res.preemptions++;
        sched.OnPreempted(id);
      }
      std::vector<Seq*> ordered;
      absl::flat_hash_set<Seq*> listed;
      absl::flat_hash_map<uint64_t, Seq*> here;
      for (Seq* s : rk.running) here[s->id] = s;
      for (Seq* s : rk.waiting) here[s->id] = s;
      for (uint64_t id : lim.order) {
        auto it = here.find(id);
        if (it != here.end() && listed.insert(it->second).second) ordered.push_back(it->second);
      }
      for (Seq* s : rk.running) {
        if (listed.insert(s).second) ordered.push_back(s);
      }
      for (Seq* s : rk.waiting) {
        if (listed.insert(s).second) ordered.push_back(s);
      }
      int64_t budget = lim.max_batch_tokens;
      int64_t running = static_cast<int64_t>(rk.running.size());
      for (Seq* s : ordered) {
        if (budget <= 0) break;
        if (!s->running) {
          if (running >= lim.max_running) continue;
          s->running = true;
          s->order = order++;
          rk.waiting.erase(std::find(rk.waiting.begin(), rk.waiting.end(), s));
          rk.running.push_back(s);
          ++running;
        }
        const int chunk = static_cast<int>(
            std::min<int64_t>({s->length() - s->computed, budget, o.max_prefill_chunk}));
        plans[r].push_back({s, chunk});
        budget -= chunk;
        rank_tokens[r] += chunk;
        rank_ctx[r] += s->computed + chunk;
        tier_tokens[r][static_cast<int>(s->tier)] += chunk;
      }
      if (rank_tokens[r] > 0) {
        rank_s[r] = o.cost.a_s + o.cost.b_s * double(rank_tokens[r]) +
                    o.cost.c_s * double(rank_ctx[r]);
      }
      step_s = std::max(step_s, rank_s[r]);
    }

    if (step_s == 0) {
      // Idle: wait for the next arrival, deferred work's deadline, or a poll.
      double wake = next < trace.size() ? trace[next].arrival_s : now + poll;
      if (std::optional<absl::Time> w = sched.NextWakeup()) {
        wake = std::min(wake, std::max(now, absl::ToDoubleSeconds(*w - t0)));
      }
      if (in_system > 0) wake = std::min(wake, now + poll);
      wake = std::max(wake, now + 1e-6);
      res.energy_j += o.cost.p_idle_w * o.ranks * (wake - now);
      now = wake;
      set_time(now);
      continue;
    }

    // Requests arriving during the step are submitted at their arrival time.
    const double end = now + step_s;
    submit_until(end);
    now = end;
    set_time(now);
    res.steps++;
    res.busy_s += step_s;
    res.energy_j += o.cost.p_active_w * o.ranks * step_s;
    for (int r = 0; r < o.ranks; ++r) {
      for (const Planned& p : plans[r]) {
        Seq* s = p.seq;
        s->computed += p.chunk;
        if (s->computed < s->length()) continue;  // prefill continues next step
        s->generated++;
        res.output_tokens++;
        if (s->first_token_s < 0) s->first_token_s = now;
        s->last_token_s = now;
        sched.OnTokens(s->id, 1);
        if (s->generated < s->output) continue;
        TierResult& tr = res.tiers[static_cast<int>(s->tier)];
        tr.max_ttft_s = std::max(tr.max_ttft_s, s->first_token_s - s->submitted_s);
        if (s->generated > 1) {
          tpot_sum[static_cast<int>(s->tier)] +=
              (s->last_token_s - s->first_token_s) / (s->generated - 1);
        }
        sched.OnFinished(s->id);
        Rank& rk = ranks[r];
        rk.running.erase(std::find(rk.running.begin(), rk.running.end(), s));
        seqs.erase(s->id);
        --in_system;
      }
      res.step_tokens += rank_tokens[r];
      // The rank measured the shared step time and its own share of energy.
      sched.OnStep(r,
                   {rank_tokens[r], rank_ctx[r], absl::Seconds(step_s),
                    o.cost.p_active_w * step_s},
                   tier_tokens[r]);
    }
  }
  res.makespan_s = now;
  res.idle_w = o.cost.p_idle_w * o.ranks;
  const SchedulerSnapshot snap = sched.Snapshot();
  for (Tier t : kAllTiers) {
    TierResult& tr = res.tiers[static_cast<int>(t)];
    const TierStats& st = snap.tiers[static_cast<int>(t)].stats;
    tr.finished = st.finished;
    tr.attained = st.attained;
    tr.tpot_met = st.tpot_met;
    tr.ttft_met = st.ttft_met;
    tr.mean_tpot_s = st.finished ? tpot_sum[static_cast<int>(t)] / double(st.finished) : 0;
  }
  return res;
}

}  // namespace joule::scheduler::sim
