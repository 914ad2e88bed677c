// Lockstep engine steps across expert-parallel ranks.
//
// Every step begins with an all-gather of each rank's token count for the
// step (and how long its paced sequences rest, when that is why it has none),
// so all ranks agree to run it (and the counts size the exchanges);
// ranks with nothing to do run the step with an empty batch, since every MoE
// layer needs every rank's experts. When no rank has work nobody runs a
// forward pass.
#pragma once

#include "absl/status/statusor.h"
#include "worker/engine/engine.h"
#include "worker/ep/transport.h"

namespace joule::ep {

class LockstepStepper {
 public:
  // Neither is owned.
  LockstepStepper(Engine* engine, Transport* transport) : engine_(engine), transport_(transport) {}

  struct Result {
    StepResult step;          // this rank's outcome (empty when it only joined)
    // Tokens in the step over all ranks, as the count exchange agreed (without
    // paced sequences that then rode along, Engine::RideAlong); 0: nobody ran.
    int64_t global_tokens = 0;
    // When nobody ran: how long until the first rank's resting paced
    // sequences fall due (Engine::RestsFor; ranks without any plan to rest
    // put no bound on it); zero when some rank is idle for another reason, or
    // when no rank has sequences at all.
    absl::Duration rest = absl::ZeroDuration();
  };
  // One collective step. Must be called the same number of times on every rank.
  absl::StatusOr<Result> Step();

 private:
  Engine* engine_;
  Transport* transport_;
};

}  // namespace joule::ep
