// Step cost model: each rank's step time and step energy as linear functions
// of the step's batch tokens and context tokens (the sum of the context
// lengths its sequences attend over),
//
//   time   = t0 + t1 * batch_tokens + t2 * context_tokens
//   energy = e0 + e1 * batch_tokens + e2 * context_tokens
//
// t0/e0 are the fixed per-step cost (weights read once per step, launch and
// collective latency); they are why joules per token fall with batch size.
// Learned online by recursive least squares with exponential forgetting, so
// it follows clock and thermal drift; seeded from a calibration sweep.
// A rank without enough samples of its own borrows the pooled model of all
// ranks, and before any sample at all the prior given at construction.
#pragma once

#include <array>
#include <cstdint>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/time/time.h"

namespace joule::scheduler {

// What a worker measured for one step.
struct StepSample {
  int64_t batch_tokens = 0;
  int64_t context_tokens = 0;
  absl::Duration duration;
  double energy_joules = 0;
  // When the step ended on the worker's clock; InfinitePast: when observed.
  // Workers report steps in batches (heartbeats), so the scheduler cannot
  // take the arrival time for the step's time.
  absl::Time ended_at = absl::InfinitePast();
};

struct StepCost {
  double seconds = 0;
  double joules = 0;
};

struct StepCostCoefficients {
  std::array<double, 3> time{};    // seconds: fixed, per batch token, per context token
  std::array<double, 3> energy{};  // joules: fixed, per batch token, per context token
  int64_t samples = 0;
};

struct StepCostModelOptions {
  // Weight of the past per sample: 0.999 remembers about the last 1000 steps.
  double forgetting = 0.999;
  // Samples a rank needs before its own fit replaces the pooled one.
  int64_t min_samples = 16;
  // Before any sample: 10 ms + 20 us per token, 400 W while stepping.
  StepCostCoefficients prior = {{10e-3, 20e-6, 0.0}, {4.0, 8e-3, 0.0}, 0};
};

class StepCostModel {
 public:
  explicit StepCostModel(StepCostModelOptions options = {});

  void Observe(int rank, const StepSample& sample);
  // Feeds a calibration sweep (the same as observing each sample).
  void Calibrate(int rank, const std::vector<StepSample>& sweep);

  // Predicted cost of one step; never negative.
  StepCost Predict(int rank, int64_t batch_tokens, int64_t context_tokens) const;
  // The largest batch (<= cap) whose predicted step time stays within
  // `budget`; 0 when even one token would not.
  int64_t MaxTokensWithin(int rank, absl::Duration budget, int64_t context_tokens,
                          int64_t cap) const;
  // The smallest batch (<= cap) whose predicted joules per token are within
  // (1 + slack) of those at `cap`: the size worth waiting for.
  int64_t EfficientBatch(int rank, int64_t context_tokens, int64_t cap, double slack) const;

  // The coefficients in use for `rank` (its own, pooled, or the prior).
  StepCostCoefficients Coefficients(int rank) const;
  int64_t Samples(int rank) const;

 private:
  // Recursive least squares over features [1, tokens/1e3, context/1e5]
  // (scaled so the covariance stays well conditioned), one target each for
  // time and energy sharing the covariance.
  struct Fit {
    std::array<double, 3> time{};
    std::array<double, 3> energy{};
    std::array<std::array<double, 3>, 3> p{};  // inverse information matrix
    int64_t samples = 0;
  };
  void Update(Fit* fit, const StepSample& sample) const;
  Fit NewFit() const;
  const Fit* Use(int rank) const;

  StepCostModelOptions options_;
  absl::flat_hash_map<int, Fit> ranks_;
  Fit pooled_;
};

}  // namespace joule::scheduler
