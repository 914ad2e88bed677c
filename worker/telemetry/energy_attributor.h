// Splits a worker's metered energy between the requests it serves.
//
// The step loop brackets every engine step with BeginStep() / EndStep(tokens):
//  - energy metered between EndStep and the next BeginStep is idle (the device
//    waited for work); it is reported, never charged to requests;
//  - energy metered over a step is charged to the step's requests in proportion
//    to the tokens each had in it (prefill chunk or decode token), so a request
//    pays for its share of every step it took part in;
//  - a step with no local tokens (an expert-parallel rank that only served other
//    ranks' experts) is metered as "unattributed": its requests live elsewhere.
// So attributed + idle + unattributed == the meter's total since the first read.
// A failed meter read loses that interval (counted in failed_reads) and the next
// successful read starts a new one: no energy is ever guessed.
#pragma once

#include <optional>
#include <cstdint>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "worker/telemetry/energy_meter.h"

namespace joule::telemetry {

// Tokens one request had in one step.
struct StepTokens {
  uint64_t request_id = 0;
  int64_t tokens = 0;
};

// Adds `joules` to `out` split by token share; requests with <= 0 tokens get nothing.
// Returns the joules handed out (== joules when any request had tokens, else 0).
double SplitByTokens(double joules, absl::Span<const StepTokens> tokens,
                     absl::flat_hash_map<uint64_t, double>* out);

class EnergyAttributor {
 public:
  // `meter` is not owned and must outlive the attributor.
  explicit EnergyAttributor(EnergyMeter* meter) : meter_(meter) {}

  // Right before a step's forward pass: energy since the previous EndStep is idle.
  absl::Status BeginStep();
  // Right after it: energy since BeginStep goes to `tokens` by share.
  // FailedPrecondition if BeginStep did not succeed first.
  // The step's whole energy (also the part nobody here is charged) goes to
  // *step_joules when given.
  absl::Status EndStep(absl::Span<const StepTokens> tokens, double* step_joules = nullptr);
  // Instead of EndStep for a bracketed round that ran no step on any rank (an
  // idle lockstep round): its energy is idle.
  absl::Status EndIdleStep();

  // Joules charged to a request so far, forgotten after Take (call when the
  // request finishes or is cancelled, for its usage.energy_joules).
  double TakeRequestJoules(uint64_t request_id);
  double PeekRequestJoules(uint64_t request_id) const;

  struct Totals {
    double attributed_joules = 0;    // charged to requests (also those already taken)
    double idle_joules = 0;          // between steps
    double unattributed_joules = 0;  // steps without local tokens
    double tokens = 0;               // tokens over all attributed steps
    int64_t steps = 0;
    int64_t failed_reads = 0;
    double total_joules() const { return attributed_joules + idle_joules + unattributed_joules; }
  };
  Totals totals() const;
  // The meter's first reading (the accounting's zero); nullopt before one.
  std::optional<double> first_reading() const;

 private:
  absl::Status Read(double* joules) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Ends the interval BeginStep opened: its energy into *joules.
  absl::Status CloseStep(const char* caller, double* joules) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  EnergyMeter* const meter_;
  mutable absl::Mutex mu_;
  bool have_last_ ABSL_GUARDED_BY(mu_) = false;  // last_ is a valid reading
  std::optional<double> first_ ABSL_GUARDED_BY(mu_);
  bool in_step_ ABSL_GUARDED_BY(mu_) = false;
  double last_ ABSL_GUARDED_BY(mu_) = 0;
  absl::flat_hash_map<uint64_t, double> per_request_ ABSL_GUARDED_BY(mu_);
  Totals totals_ ABSL_GUARDED_BY(mu_);
};

}  // namespace joule::telemetry
