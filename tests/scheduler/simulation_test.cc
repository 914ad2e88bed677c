// The same seeded trace through fcfs, priority and ipw on a simulated 2-rank
// expert-parallel cluster with a known step cost (simulator.h): at a load
// where fcfs misses the fast tier's TPOT target, ipw must hold the fast tier
// at its attainment target and deliver more output tokens per joule than
// priority, without starving batch work.
#include <algorithm>
#include <cstdio>
#include <random>

#include "gtest/gtest.h"
#include "scheduler/config.h"
#include "tests/scheduler/simulator.h"

namespace joule::scheduler::sim {
namespace {

// A calibration sweep as a worker would run it at start-up: the synthetic
// cost with 3% multiplicative noise.
std::vector<CalibrationSample> Sweep(const SimCost& cost, int ranks, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<CalibrationSample> out;
  for (int r = 0; r < ranks; ++r) {
    for (int tokens : {1, 16, 64, 128, 256, 512}) {
      for (int context : {0, 20000, 80000}) {
        const double noise = 1.0 + 0.03 * (static_cast<double>(rng() >> 11) * 0x1.0p-53 * 2 - 1);
        const double t = (cost.a_s + cost.b_s * tokens + cost.c_s * context) * noise;
        out.push_back({r, {tokens, context, absl::Seconds(t), cost.p_active_w * t}});
      }
    }
  }
  return out;
}

SchedulerConfig Config(PolicyKind policy, const SimOptions& o) {
  SchedulerConfig c;
  c.policy = policy;
  c.lockstep = true;
  c.max_batch_tokens = 512;
  c.max_running = 128;
  c.calibration = Sweep(o.cost, o.ranks, 7);
  return c;
}

// Interactive traffic in peaks (20 s on, 20 s off), batch at a steady rate.
// In the peaks, 512-token steps mixing batch prefill with fast decodes break
// the fast tier's 25 ms TPOT; in the valleys only batch work is left.
std::vector<TierLoad> Load() {
  return {
      {Tier::kFast, 12.0, 0.0, 64, 256, 64, 192},
      {Tier::kStandard, 18.0, 0.0, 128, 512, 64, 256},
      {Tier::kBatch, 8.0, 8.0, 256, 1024, 128, 512},
  };
}

void Print(const char* name, const SimResult& r, double horizon) {
  std::printf("%-9s tok/J %.3f  energy %.0f J (until %.1f s)  out %lld  steps %lld  busy %.1f s  span %.1f s  "
              "preempt %lld\n",
              name, r.tokens_per_joule(horizon), r.energy_until(horizon), horizon, static_cast<long long>(r.output_tokens),
              static_cast<long long>(r.steps), r.busy_s, r.makespan_s,
              static_cast<long long>(r.preemptions));
  for (Tier t : kAllTiers) {
    const TierResult& tr = r.tier(t);
    if (tr.submitted == 0) continue;
    std::printf("   %-8s n=%lld rej=%lld attain %.3f (ttft %.3f tpot %.3f) mean tpot %.1f ms "
                "max ttft %.2f s max queue %.2f s\n",
                std::string(TierName(t)).c_str(), static_cast<long long>(tr.finished),
                static_cast<long long>(tr.rejected), tr.attainment(),
                tr.finished ? double(tr.ttft_met) / double(tr.finished) : 1.0,
                tr.finished ? double(tr.tpot_met) / double(tr.finished) : 1.0,
                tr.mean_tpot_s * 1e3, tr.max_ttft_s, tr.max_queue_wait_s);
  }
}

TEST(Simulation, IpwHoldsFastTierAndBeatsPriorityOnTokensPerJoule) {
  SimOptions o;
  const std::vector<SimRequest> trace = MakeTrace(Load(), /*duration_s=*/120.0, /*period_s=*/40.0, /*seed=*/42);
  const SimResult fcfs = Simulate(Config(PolicyKind::kFcfs, o), trace, o);
  const SimResult prio = Simulate(Config(PolicyKind::kPriority, o), trace, o);
  const SimResult ipw = Simulate(Config(PolicyKind::kIpw, o), trace, o);
  std::printf("trace: %zu requests\n", trace.size());
  const double horizon = std::max({fcfs.makespan_s, prio.makespan_s, ipw.makespan_s});
  Print("fcfs", fcfs, horizon);
  Print("priority", prio, horizon);
  Print("ipw", ipw, horizon);

  const SchedulerConfig defaults;
  for (const SimResult* r : {&fcfs, &prio, &ipw}) {
    for (Tier t : kAllTiers) {
      // Every request had its outcome: nothing lost, nothing refused.
      EXPECT_EQ(r->tier(t).rejected, 0) << TierName(t);
      EXPECT_EQ(r->tier(t).finished, r->tier(t).submitted) << TierName(t);
    }
  }
  // The load is one where fcfs (and priority, with the same fixed cap) miss
  // the fast tier's TPOT target...
  EXPECT_LT(fcfs.tier(Tier::kFast).attainment(), defaults.slo(Tier::kFast).attainment);
  // ...ipw holds it, and every tier does at least as well as under priority...
  EXPECT_GE(ipw.tier(Tier::kFast).attainment(), defaults.slo(Tier::kFast).attainment);
  for (Tier t : kAllTiers) {
    EXPECT_GE(ipw.tier(t).attainment(), prio.tier(t).attainment()) << TierName(t);
  }
  // ...with at least the margin docs/architecture.md claims in output tokens per
  // joule over the same time (the simulation is deterministic: 1.124)...
  const double ratio = ipw.tokens_per_joule(horizon) / prio.tokens_per_joule(horizon);
  std::printf("ipw / priority tokens per joule: %.3f\n", ratio);
  EXPECT_GE(ratio, 1.10);
  // ...and batch work deferred into the valleys never waits past its bound
  // (plus one idle poll of the simulated coordinator).
  EXPECT_LE(ipw.tier(Tier::kBatch).max_queue_wait_s,
            absl::ToDoubleSeconds(defaults.batch_max_wait) + o.idle_poll_s);
}

}  // namespace
}  // namespace joule::scheduler::sim
