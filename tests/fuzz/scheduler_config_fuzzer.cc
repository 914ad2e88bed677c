// The scheduler configuration (scheduler/config.h: ParseSchedulerConfig) on
// any bytes. A configuration it accepts must pass Validate(), print (the
// start-up log), and drive a scheduler through a few requests of every tier
// on two ranks: the limits, SLOs, ipw knobs and calibration samples it carries
// reach the policies and the cost model, where an extreme value that parsing
// let through would show as a crash or undefined behaviour.
#include <cstddef>
#include <cstdint>
#include <string>

#include "scheduler/config.h"
#include "scheduler/fake_clock.h"
#include "scheduler/scheduler.h"
#include "tests/fuzz/fuzz_check.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace joule::scheduler;
  absl::StatusOr<SchedulerConfig> parsed = ParseSchedulerConfig(joule::fuzz::Text(data, size));
  if (!parsed.ok()) {
    FUZZ_CHECK(parsed.status().code() == absl::StatusCode::kInvalidArgument && !parsed.status().message().empty(),
               "%s", parsed.status().ToString().c_str());
    return 0;
  }
  const absl::Status valid = parsed->Validate();
  FUZZ_CHECK(valid.ok(), "accepted but invalid: %s", valid.ToString().c_str());
  FUZZ_CHECK(!DescribeSchedulerConfig(*parsed).empty(), "nothing to print");

  FakeClock clock;
  absl::StatusOr<std::unique_ptr<Scheduler>> scheduler = Scheduler::Create(*parsed, &clock);
  FUZZ_CHECK(scheduler.ok(), "a valid config is refused: %s", scheduler.status().ToString().c_str());
  Scheduler& s = **scheduler;
  const ClusterView cluster{.ranks = {{.rank = 0}, {.rank = 1}}};
  uint64_t next_id = 1;
  for (Tier tier : kAllTiers) {
    (void)s.Submit({.id = next_id++, .tier = tier, .prompt_tokens = 100, .max_tokens = 20});
  }
  for (int round = 0; round < 3; ++round) {
    for (const Assignment& a : s.Dispatch(cluster)) {
      FUZZ_CHECK(a.rank == 0 || a.rank == 1, "assigned to rank %d", a.rank);
      s.OnTokens(a.id, 1);
      s.OnTokens(a.id, 5);
      if (round > 0) s.OnFinished(a.id);
    }
    for (int rank = 0; rank < 2; ++rank) {
      const StepLimits limits = s.StepLimitsFor(rank);
      (void)limits;
      for (Tier tier : kAllTiers) {
        FUZZ_CHECK(s.StepTokenCapFor(rank, tier) >= 0, "negative step token cap");
        (void)s.TokenIntervalFor(tier);
      }
      s.OnStep(rank, {.batch_tokens = 64 * (round + 1), .context_tokens = 512, .duration = absl::Milliseconds(20),
                      .energy_joules = 3.0});
    }
    clock.Advance(absl::Milliseconds(50));
    (void)s.NextWakeup();
  }
  s.OnRankLost(1);
  (void)s.Snapshot();
  return 0;
}
