// Time source for the scheduler, injected so that queue waits, SLO accounting
// and the batch starvation bound can be tested with a fake clock
// (fake_clock.h). The scheduler never reads the wall clock itself.
#pragma once

#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace joule::scheduler {

class Clock {
 public:
  virtual ~Clock() = default;
  virtual absl::Time Now() const = 0;
};

class RealClock final : public Clock {
 public:
  absl::Time Now() const override { return absl::Now(); }
};

}  // namespace joule::scheduler
