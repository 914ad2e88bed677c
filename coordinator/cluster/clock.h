// Time source for the control plane: the scheduler's (scheduler/clock.h), so
// the coordinator, its membership and its scheduler share one clock and tests
// drive them all with one fake (fake_clock.h).
#pragma once

#include "scheduler/clock.h"

namespace joule::cluster {

using Clock = scheduler::Clock;
using RealClock = scheduler::RealClock;

}  // namespace joule::cluster
