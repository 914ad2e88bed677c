#include "scheduler/cost_model.h"

#include <algorithm>
#include <cmath>

namespace joule::scheduler {
namespace {

// Feature scaling keeps the three columns of similar magnitude.
constexpr double kTokenScale = 1e-3;
constexpr double kContextScale = 1e-5;
// Initial covariance: weak enough that a few samples override the prior.
constexpr double kInitialVariance = 1e3;
// Forgetting inflates the covariance along directions the data never
// excites (e.g. context while it stays constant); stop forgetting past this.
constexpr double kMaxTrace = 1e5;

std::array<double, 3> Features(int64_t tokens, int64_t context) {
  return {1.0, static_cast<double>(tokens) * kTokenScale,
          static_cast<double>(context) * kContextScale};
}

// Coefficients per scaled feature <-> per token / per context token.
std::array<double, 3> ToScaled(const std::array<double, 3>& c) {
  return {c[0], c[1] / kTokenScale, c[2] / kContextScale};
}
std::array<double, 3> FromScaled(const std::array<double, 3>& c) {
  return {c[0], c[1] * kTokenScale, c[2] * kContextScale};
}

double Dot(const std::array<double, 3>& a, const std::array<double, 3>& b) {
  return a[0] * b[0] + a[1] * b[1] + a[2] * b[2];
}

}  // namespace

StepCostModel::StepCostModel(StepCostModelOptions options)
    : options_(options), pooled_(NewFit()) {}

StepCostModel::Fit StepCostModel::NewFit() const {
  Fit f;
  f.time = ToScaled(options_.prior.time);
  f.energy = ToScaled(options_.prior.energy);
  for (int i = 0; i < 3; ++i) f.p[i][i] = kInitialVariance;
  return f;
}

void StepCostModel::Update(Fit* f, const StepSample& s) const {
  const std::array<double, 3> x = Features(s.batch_tokens, s.context_tokens);
  const double lambda = options_.forgetting;
  std::array<double, 3> px{};
  for (int i = 0; i < 3; ++i) px[i] = Dot(f->p[i], x);
  const double denom = lambda + Dot(x, px);
  std::array<double, 3> k{};
  for (int i = 0; i < 3; ++i) k[i] = px[i] / denom;
  const double time_err = absl::ToDoubleSeconds(s.duration) - Dot(f->time, x);
  const double energy_err = s.energy_joules - Dot(f->energy, x);
  for (int i = 0; i < 3; ++i) {
    f->time[i] += k[i] * time_err;
    f->energy[i] += k[i] * energy_err;
  }
  // P = (P - k x^T P) / lambda; P is symmetric so x^T P = px^T.
  double trace = 0;
  for (int i = 0; i < 3; ++i) {
    for (int j = 0; j < 3; ++j) f->p[i][j] -= k[i] * px[j];
    trace += f->p[i][i];
  }
  if (trace / lambda < kMaxTrace) {
    for (auto& row : f->p) {
      for (double& v : row) v /= lambda;
    }
  }
  ++f->samples;
}

void StepCostModel::Observe(int rank, const StepSample& sample) {
  // A step with no tokens says nothing about the marginal costs, and idle
  // ranks in lockstep report many of them.
  if (sample.batch_tokens <= 0) return;
  auto [it, inserted] = ranks_.try_emplace(rank);
  if (inserted) it->second = NewFit();
  Update(&it->second, sample);
  Update(&pooled_, sample);
}

void StepCostModel::Calibrate(int rank, const std::vector<StepSample>& sweep) {
  for (const StepSample& s : sweep) Observe(rank, s);
}

const StepCostModel::Fit* StepCostModel::Use(int rank) const {
  auto it = ranks_.find(rank);
  if (it != ranks_.end() && it->second.samples >= options_.min_samples) return &it->second;
  return &pooled_;
}

StepCost StepCostModel::Predict(int rank, int64_t batch_tokens, int64_t context_tokens) const {
  const Fit* f = Use(rank);
  const std::array<double, 3> x = Features(batch_tokens, context_tokens);
  return {std::max(0.0, Dot(f->time, x)), std::max(0.0, Dot(f->energy, x))};
}

int64_t StepCostModel::MaxTokensWithin(int rank, absl::Duration budget, int64_t context_tokens,
                                       int64_t cap) const {
  const StepCostCoefficients c = Coefficients(rank);
  const double room = absl::ToDoubleSeconds(budget) - c.time[0] -
                      c.time[2] * static_cast<double>(context_tokens);
  if (room <= 0) return 0;
  if (c.time[1] <= 0) return cap;
  // The epsilon keeps a budget that lands exactly on a token count (22.5 ms
  // = 10 ms + 125 * 0.1 ms) from losing that token to rounding.
  return std::clamp<int64_t>(static_cast<int64_t>(std::floor(room / c.time[1] + 1e-6)), 0, cap);
}

int64_t StepCostModel::EfficientBatch(int rank, int64_t context_tokens, int64_t cap,
                                      double slack) const {
  if (cap <= 1) return std::max<int64_t>(cap, 0);
  const StepCostCoefficients c = Coefficients(rank);
  const double fixed = std::max(0.0, c.energy[0] + c.energy[2] * static_cast<double>(context_tokens));
  const double per_token = std::max(0.0, c.energy[1]);
  const double at_cap = fixed / static_cast<double>(cap) + per_token;
  const double target = (1.0 + slack) * at_cap - per_token;  // fixed / n must stay below
  if (target <= 0) return cap;
  return std::clamp<int64_t>(static_cast<int64_t>(std::ceil(fixed / target)), 1, cap);
}

StepCostCoefficients StepCostModel::Coefficients(int rank) const {
  const Fit* f = Use(rank);
  return {FromScaled(f->time), FromScaled(f->energy), f->samples};
}

int64_t StepCostModel::Samples(int rank) const {
  auto it = ranks_.find(rank);
  return it == ranks_.end() ? 0 : it->second.samples;
}

}  // namespace joule::scheduler
