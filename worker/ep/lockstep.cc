#include "worker/ep/lockstep.h"

#include <algorithm>
#include <vector>

#include "common/status.h"

namespace joule::ep {

absl::StatusOr<LockstepStepper::Result> LockstepStepper::Step() {
  // Planning first fixes this rank's token count; a failed exchange leaves
  // the plan pending, and the next Step() offers the same plan again.
  // Each rank offers {tokens, rest}: rest in microseconds (Engine::RestsFor)
  // when its plan is empty because its sequences rest, 0 when it has nothing
  // planned for another reason, -1 when it has no sequences at all.
  const int64_t tokens = engine_->PlanStep();
  const absl::Duration rests = engine_->RestsFor();
  const int64_t mine[2] = {
      tokens, rests > absl::ZeroDuration() ? std::max<int64_t>(1, absl::ToInt64Microseconds(rests))
              : engine_->HasWork()         ? 0
                                           : -1};
  const int world = transport_->world_size();
  std::vector<int64_t> all(2 * static_cast<size_t>(world), 0);
  RETURN_IF_ERROR(Annotate(transport_->AllGather(mine, sizeof(mine), all.data()),
                           "lockstep step: token count exchange"));
  Result result;
  int64_t rest_us = -1;
  for (int p = 0; p < world; ++p) {
    result.global_tokens += all[2 * p];
    const int64_t r = all[2 * p + 1];
    if (r >= 0) rest_us = rest_us < 0 ? r : std::min(rest_us, r);
  }
  if (result.global_tokens == 0 && rest_us > 0) result.rest = absl::Microseconds(rest_us);
  // The step runs anyway: resting paced sequences take their next token in it.
  if (tokens == 0 && result.global_tokens > 0) engine_->RideAlong();
  // Every rank sees the same counts: either all run the step (the idle ones
  // over an empty batch, to serve their experts) or none runs a forward pass.
  ASSIGN_OR_RETURN(result.step, engine_->RunPlannedStep(/*run_empty=*/result.global_tokens > 0));
  return result;
}

}  // namespace joule::ep
