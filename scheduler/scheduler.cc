#include "scheduler/scheduler.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "absl/strings/cord.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "scheduler/policy.h"

namespace joule::scheduler {
namespace {

constexpr char kRetryAfterPayload[] = "type.joule.dev/scheduler.retry_after_ms";
// Weight of the newest observation in the running averages below.
constexpr double kEwma = 0.1;
constexpr absl::Duration kMaxRetryAfter = absl::Seconds(60);

}  // namespace

std::optional<absl::Duration> RetryAfter(const absl::Status& status) {
  auto payload = status.GetPayload(kRetryAfterPayload);
  if (!payload) return std::nullopt;
  int64_t ms = 0;
  if (!absl::SimpleAtoi(std::string(*payload), &ms)) return std::nullopt;
  return absl::Milliseconds(ms);
}

absl::StatusOr<std::unique_ptr<Scheduler>> Scheduler::Create(SchedulerConfig config,
                                                              const Clock* clock) {
  RETURN_IF_ERROR(config.Validate());
  if (clock == nullptr) return absl::InvalidArgumentError("scheduler: clock is required");
  std::unique_ptr<Policy> policy = MakePolicy(config);
  return std::unique_ptr<Scheduler>(new Scheduler(std::move(config), clock, std::move(policy)));
}

Scheduler::Scheduler(SchedulerConfig config, const Clock* clock, std::unique_ptr<Policy> policy)
    : config_(std::move(config)),
      clock_(clock),
      policy_(std::move(policy)),
      slo_(config_.tiers),
      prefix_(static_cast<size_t>(config_.prefix_affinity.index_blocks)) {
  for (const CalibrationSample& c : config_.calibration) cost_.Observe(c.rank, c.sample);
}

Scheduler::~Scheduler() = default;

PolicyState Scheduler::StateLocked(absl::Time now) const {
  return PolicyState{now,     &config_,     &cost_,   &slo_,          &queues_,
                     &ranks_, &step_gap_s_, &prefix_, &engine_limits_};
}

absl::Status Scheduler::Submit(const RequestInfo& info) {
  if (info.prompt_tokens < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("prompt_tokens: must be at least 1, got ", info.prompt_tokens));
  }
  if (info.max_tokens < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_tokens: must be at least 1, got ", info.max_tokens));
  }
  absl::MutexLock lock(&mu_);
  if (requests_.contains(info.id)) {
    return absl::AlreadyExistsError(absl::StrCat("request ", info.id, " is already scheduled"));
  }
  const int t = static_cast<int>(info.tier);
  int64_t waiting = static_cast<int64_t>(queues_[t].size());
  for (const auto& [rank, reqs] : ranks_) {
    for (const auto& [seq, r] : reqs) {
      if (r->tier() == info.tier && !r->first_token) ++waiting;
    }
  }
  slo_.RecordSubmitted(info.tier);
  const int cap = config_.slo(info.tier).queue_cap;
  if (waiting >= cap) {
    slo_.RecordRejected(info.tier);
    const absl::Duration retry = RetryAfterLocked(info.tier);
    absl::Status status = absl::ResourceExhaustedError(absl::StrCat(
        "tier ", std::string(TierName(info.tier)), ": ", waiting,
        " requests are waiting (queue_cap ", cap, "); retry after ",
        absl::ToInt64Seconds(retry), " s"));
    status.SetPayload(kRetryAfterPayload, absl::Cord(absl::StrCat(absl::ToInt64Milliseconds(retry))));
    return status;
  }
  auto r = std::make_unique<Request>();
  r->info = info;
  r->seq = next_seq_++;
  r->submitted = clock_->Now();
  queues_[t][r->seq] = r.get();
  requests_[info.id] = std::move(r);
  return absl::OkStatus();
}

absl::Duration Scheduler::RetryAfterLocked(Tier tier) const {
  // The time the tier's waiting requests take to start at the recent rate,
  // in whole seconds (HTTP Retry-After), at least one.
  const int t = static_cast<int>(tier);
  absl::Duration estimate = config_.retry_after;
  if (start_rate_[t] > 0) {
    int64_t waiting = static_cast<int64_t>(queues_[t].size());
    estimate = absl::Seconds(static_cast<double>(waiting) / start_rate_[t]);
  }
  const double seconds = std::ceil(absl::ToDoubleSeconds(estimate));
  return std::clamp(absl::Seconds(seconds), absl::Seconds(1), kMaxRetryAfter);
}

std::vector<Assignment> Scheduler::Dispatch(const ClusterView& cluster) {
  absl::MutexLock lock(&mu_);
  std::vector<int> ready;
  for (const RankInfo& r : cluster.ranks) {
    engine_limits_[r.rank] = r.engine;
    if (r.ready) ready.push_back(r.rank);
  }
  std::sort(ready.begin(), ready.end());
  ready.erase(std::unique(ready.begin(), ready.end()), ready.end());
  if (ready.empty()) return {};
  const absl::Time now = clock_->Now();
  const PolicyState state = StateLocked(now);
  std::vector<Assignment> out = policy_->Dispatch(state, ready);
  for (const Assignment& a : out) {
    Request* r = requests_.at(a.id).get();
    r->cached_tokens = policy_internal::CachedOn(state, *r, a.rank);
    if (config_.prefix_affinity.enabled) prefix_.Insert(a.rank, r->info.prefix_blocks);
    const int t = static_cast<int>(r->tier());
    queues_[t].erase(r->seq);
    r->starved = policy_internal::Starved(state, *r);
    r->state = Request::State::kDispatched;
    r->rank = a.rank;
    r->dispatched = now;
    ranks_[a.rank][r->seq] = r;
    // Start rate per tier, for retry-after hints.
    if (last_start_[t] != absl::Time()) {
      const double dt = std::max(1e-3, absl::ToDoubleSeconds(now - last_start_[t]));
      start_rate_[t] = start_rate_[t] == 0 ? 1.0 / dt
                                           : (1 - kEwma) * start_rate_[t] + kEwma / dt;
    }
    last_start_[t] = now;
  }
  return out;
}

std::optional<absl::Time> Scheduler::NextWakeup() const {
  absl::MutexLock lock(&mu_);
  const auto& batch = queues_[static_cast<int>(Tier::kBatch)];
  if (batch.empty()) return std::nullopt;
  // Submission order is also the order of reaching the maximum wait.
  return batch.begin()->second->submitted + config_.batch_max_wait;
}

StepLimits Scheduler::StepLimitsFor(int rank) {
  absl::MutexLock lock(&mu_);
  const PolicyState state = StateLocked(clock_->Now());
  StepLimits limits = policy_->Limits(state, rank);
  last_limits_[rank] = limits;
  return limits;
}

int64_t Scheduler::StepTokenCapFor(int rank, Tier tier) {
  absl::MutexLock lock(&mu_);
  const PolicyState state = StateLocked(clock_->Now());
  return policy_->StepTokenCap(state, rank, tier);
}

absl::Duration Scheduler::TokenIntervalFor(Tier tier) const {
  absl::MutexLock lock(&mu_);
  return policy_->TokenInterval(tier);
}

void Scheduler::OnTokens(uint64_t id, int64_t count) {
  absl::MutexLock lock(&mu_);
  auto it = requests_.find(id);
  if (it == requests_.end() || count <= 0) return;
  Request* r = it->second.get();
  if (r->state == Request::State::kQueued) return;  // not ours to run yet
  const absl::Time now = clock_->Now();
  if (!r->first_token) r->first_token = now;
  r->last_token = now;
  r->generated += count;
  r->state = Request::State::kRunning;
}

void Scheduler::OnPreempted(uint64_t id) {
  absl::MutexLock lock(&mu_);
  auto it = requests_.find(id);
  if (it == requests_.end() || it->second->state != Request::State::kRunning) return;
  it->second->state = Request::State::kDispatched;
  it->second->preemptions++;
}

void Scheduler::OnFinished(uint64_t id) {
  absl::MutexLock lock(&mu_);
  auto it = requests_.find(id);
  if (it == requests_.end()) return;
  const Request& r = *it->second;
  const absl::Time now = clock_->Now();
  RequestTiming timing;
  timing.ttft = (r.first_token ? *r.first_token : now) - r.submitted;
  if (r.generated >= 2) timing.tpot = (r.last_token - *r.first_token) / (r.generated - 1);
  timing.output_tokens = r.generated;
  const bool attained = slo_.RecordFinished(r.tier(), timing);
  const TierSlo& slo = config_.slo(r.tier());
  if (slo.tpot > absl::ZeroDuration() && timing.tpot) {
    policy_->OnFinished(r.tier(), attained, *timing.tpot <= slo.tpot);
  }
  Forget(id);
}

void Scheduler::OnCancelled(uint64_t id) {
  absl::MutexLock lock(&mu_);
  auto it = requests_.find(id);
  if (it == requests_.end()) return;
  slo_.RecordCancelled(it->second->tier());
  Forget(id);
}

void Scheduler::Forget(uint64_t id) {
  auto it = requests_.find(id);
  Request* r = it->second.get();
  if (r->state == Request::State::kQueued) {
    queues_[static_cast<int>(r->tier())].erase(r->seq);
  } else if (auto rank = ranks_.find(r->rank); rank != ranks_.end()) {
    rank->second.erase(r->seq);
  }
  requests_.erase(it);
}

// The most time between back-to-back steps that counts as step overhead.
constexpr double kMaxStepOverheadSeconds = 0.01;

void Scheduler::OnStep(int rank, const StepSample& sample, const TierTokens& tier_tokens) {
  absl::MutexLock lock(&mu_);
  cost_.Observe(rank, sample);
  const absl::Time now = sample.ended_at == absl::InfinitePast() ? clock_->Now() : sample.ended_at;
  // Time between back-to-back steps that is not step time. Only while the
  // rank had work throughout; an idle rank's pauses are not overhead.
  auto last = last_step_at_.find(rank);
  auto busy = ranks_.find(rank);
  if (last != last_step_at_.end() && busy != ranks_.end() && !busy->second.empty()) {
    const double gap = absl::ToDoubleSeconds(now - last->second - sample.duration);
    // Longer gaps are pauses (paced requests not due, lulls), not overhead.
    if (gap >= 0 && gap < kMaxStepOverheadSeconds) {
      auto [g, inserted] = step_gap_s_.try_emplace(rank, gap);
      if (!inserted) g->second = (1 - kEwma) * g->second + kEwma * gap;
    }
  }
  last_step_at_[rank] = now;
  step_energy_ += sample.energy_joules;
  step_tokens_ += sample.batch_tokens;
  int64_t attributed = 0;
  for (int64_t n : tier_tokens) attributed += n;
  if (attributed <= 0) return;
  for (Tier t : kAllTiers) {
    const int64_t n = tier_tokens[static_cast<int>(t)];
    if (n > 0) {
      slo_.RecordStepEnergy(t, n,
                            sample.energy_joules * static_cast<double>(n) /
                                static_cast<double>(attributed));
    }
  }
}

void Scheduler::OnRankLost(int rank) {
  absl::MutexLock lock(&mu_);
  auto it = ranks_.find(rank);
  if (it == ranks_.end()) return;
  // Still tracked, on no rank: their outcome (or their new rank) comes later.
  for (const auto& [seq, r] : it->second) r->rank = -1;
  it->second.clear();
  last_step_at_.erase(rank);
  prefix_.ForgetRank(rank);
}

void Scheduler::OnMoved(uint64_t id, int rank) {
  absl::MutexLock lock(&mu_);
  auto it = requests_.find(id);
  if (it == requests_.end()) return;
  Request* r = it->second.get();
  if (r->state == Request::State::kQueued || r->rank == rank) return;
  if (auto old = ranks_.find(r->rank); old != ranks_.end()) old->second.erase(r->seq);
  r->rank = rank;
  ranks_[rank][r->seq] = r;
}

SchedulerSnapshot Scheduler::Snapshot() const {
  absl::MutexLock lock(&mu_);
  SchedulerSnapshot s;
  s.policy = config_.policy;
  s.ipw_safety = policy_->safety();
  s.step_energy_joules = step_energy_;
  s.step_tokens = step_tokens_;
  for (Tier t : kAllTiers) {
    TierSnapshot& ts = s.tiers[static_cast<int>(t)];
    ts.tier = t;
    ts.slo = config_.slo(t);
    ts.queued = static_cast<int64_t>(queues_[static_cast<int>(t)].size());
    ts.stats = slo_.stats(t);
    ts.recent_attainment = slo_.RecentAttainment(t);
  }
  const PolicyState state = StateLocked(clock_->Now());
  for (const auto& [rank, reqs] : ranks_) {
    RankSnapshot rs;
    rs.rank = rank;
    rs.in_flight = static_cast<int64_t>(reqs.size());
    rs.cost = cost_.Coefficients(rank);
    for (Tier t : kAllTiers) {
      rs.step_token_cap[static_cast<int>(t)] = policy_->StepTokenCap(state, rank, t);
    }
    if (auto l = last_limits_.find(rank); l != last_limits_.end()) rs.last_limits = l->second;
    for (const auto& [seq, r] : reqs) {
      TierSnapshot& ts = s.tiers[static_cast<int>(r->tier())];
      (r->state == Request::State::kRunning ? ts.running : ts.dispatched)++;
    }
    s.ranks.push_back(rs);
  }
  return s;
}

}  // namespace joule::scheduler
