// The scheduler's fake clock under the control plane's name (see clock.h).
#pragma once

#include "coordinator/cluster/clock.h"
#include "scheduler/fake_clock.h"

namespace joule::cluster {

using FakeClock = scheduler::FakeClock;

}  // namespace joule::cluster
