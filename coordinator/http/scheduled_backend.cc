#include "coordinator/http/scheduled_backend.h"

#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/logging.h"
#include "coordinator/http/http_metrics.h"
#include "scheduler/tier.h"

namespace joule::http {

// Passes responses through and tells the scheduler about tokens; remembers
// whether the request reached a finish reason (finished vs cancelled).
class ScheduledBackend::CountingSink final : public cluster::GenerateSink {
 public:
  CountingSink(ScheduledBackend* backend, std::shared_ptr<cluster::GenerateSink> inner,
               scheduler::Scheduler* scheduler, uint64_t id, int rank)
      : backend_(backend), inner_(std::move(inner)), scheduler_(scheduler), id_(id), rank_(rank) {}

  bool Write(const v1::GenerateResponse& response) override {
    if (response.rank() != rank_) {
      // The router resumed it on another rank after its rank died.
      rank_ = response.rank();
      scheduler_->OnMoved(id_, rank_);
    }
    if (response.token_ids_size() > 0) {
      scheduler_->OnTokens(id_, response.token_ids_size());
      // Running now: the rank's step plan may change (order, preemptions).
      if (!started_) backend_->Wake();
      started_ = true;
    }
    if (response.finish_reason() == v1::FINISH_REASON_STOP ||
        response.finish_reason() == v1::FINISH_REASON_LENGTH) {
      finished_ = true;
    }
    return inner_->Write(response);
  }
  bool ClientGone() const override { return inner_->ClientGone(); }
  bool finished() const { return finished_; }

 private:
  ScheduledBackend* const backend_;
  const std::shared_ptr<cluster::GenerateSink> inner_;
  scheduler::Scheduler* const scheduler_;
  const uint64_t id_;
  int rank_;               // where its responses come from
  // Written and read on the request's callback sequence:
  bool started_ = false;   // a token arrived
  bool finished_ = false;
};

ScheduledBackend::ScheduledBackend(cluster::Router* router, cluster::Membership* membership,
                                   scheduler::Scheduler* scheduler, prometheus::Registry* registry)
    : router_(router), membership_(membership), scheduler_(scheduler) {
  if (registry != nullptr) {
    auto& family = prometheus::BuildHistogram()
                       .Name("joule_request_queue_time_seconds")
                       .Help("Time a request waited in the coordinator's tier queue before "
                             "the scheduler sent it to a rank")
                       .Register(*registry);
    for (scheduler::Tier t : scheduler::kAllTiers) {
      queue_time_[static_cast<int>(t)] =
          &family.Add({{"tier", std::string(scheduler::TierName(t))}}, LatencyBuckets());
    }
  }
  // The workers' measured steps teach the scheduler's cost model; a better
  // model may change what the policy dispatches, hence the wake-up.
  membership_->SetStepObserver(
      [this](int rank, const std::vector<scheduler::StepSample>& steps) {
        for (const scheduler::StepSample& step : steps) scheduler_->OnStep(rank, step);
        Wake();
      });
  loop_ = std::thread([this] { Loop(); });
}

ScheduledBackend::~ScheduledBackend() { Shutdown(); }

void ScheduledBackend::Shutdown() {
  {
    absl::MutexLock lock(&mu_);
    // Once: the destructor's call comes after the coordinator's Stop() made
    // the first, when the membership may already be destroyed.
    if (stopping_) return;
    stopping_ = true;
  }
  // A heartbeat already holding the observer may still call it: the
  // backend outlives the coordinator's RPC server (see its Stop()).
  membership_->SetStepObserver(nullptr);
  absl::flat_hash_map<uint64_t, Queued> left;
  if (loop_.joinable()) loop_.join();
  {
    absl::MutexLock lock(&mu_);
    left.swap(queued_);
    ids_.clear();
  }
  for (auto& [id, q] : left) {
    scheduler_->OnCancelled(id);
    q.done(absl::UnavailableError("coordinator is shutting down"));
  }
}

absl::Status ScheduledBackend::Validate(const v1::GenerateRequest& request) const {
  return router_->Validate(request);
}

absl::Status ScheduledBackend::Ready() const { return router_->Ready(); }

void ScheduledBackend::GenerateAsync(const v1::GenerateRequest& request, absl::Time deadline,
                                     std::shared_ptr<cluster::GenerateSink> sink,
                                     std::function<void(absl::Status)> done) {
  if (absl::Status s = router_->Validate(request); !s.ok()) {
    done(std::move(s));
    return;
  }
  // Readiness first: a cluster that cannot serve should say 503, not queue.
  if (absl::Status s = router_->Ready(); !s.ok()) {
    done(std::move(s));
    return;
  }
  const scheduler::Tier tier = scheduler::ParseServiceTier(request.service_tier()).value();
  // Hashed outside the lock, and only where prefix-aware routing uses them.
  const scheduler::PrefixAffinityOptions& affinity = scheduler_->config().prefix_affinity;
  std::vector<uint64_t> prefix_blocks;
  if (affinity.enabled) {
    prefix_blocks = scheduler::PrefixIndex::BlockHashes(request.prompt_token_ids(), affinity.block_tokens);
  }
  uint64_t id = 0;
  absl::Status refused;
  {
    absl::MutexLock lock(&mu_);
    if (stopping_) {
      refused = absl::UnavailableError("coordinator is shutting down");
    } else if (ids_.contains(request.request_id())) {
      refused = absl::AlreadyExistsError(absl::StrCat(
          "request_id: '", request.request_id(), "' is already in flight; ids must be unique"));
    } else {
      id = next_id_++;
      refused = scheduler_->Submit({.id = id,
                                    .tier = tier,
                                    .prompt_tokens = request.prompt_token_ids_size(),
                                    .max_tokens = request.sampling().max_tokens(),
                                    .prefix_blocks = std::move(prefix_blocks)});
      if (refused.ok()) {
        queued_[id] = Queued{tier, request, deadline, std::move(sink), std::move(done), absl::Now()};
        ids_[request.request_id()] = id;
        woken_ = true;
      }
    }
  }
  if (!refused.ok()) done(std::move(refused));
}

void ScheduledBackend::Cancel(const std::string& request_id) {
  std::function<void(absl::Status)> done;
  uint64_t id = 0;
  {
    absl::MutexLock lock(&mu_);
    auto it = ids_.find(request_id);
    if (it == ids_.end()) return;
    id = it->second;
    auto q = queued_.find(id);
    if (q == queued_.end()) {
      // Already sent: the router cancels the worker call; its done reports.
      ids_.erase(it);
    } else {
      done = std::move(q->second.done);
      queued_.erase(q);
      ids_.erase(it);
    }
  }
  if (done) {
    scheduler_->OnCancelled(id);
    done(absl::OkStatus());  // the client went away: not an error
    Wake();
    return;
  }
  router_->Cancel(request_id);
}

void ScheduledBackend::Wake() {
  absl::MutexLock lock(&mu_);
  woken_ = true;
}

scheduler::ClusterView ScheduledBackend::View() {
  scheduler::ClusterView view;
  for (const cluster::RankInfo& r : membership_->Ranks()) {
    NoteEngineLimits(r);
    view.ranks.push_back({.rank = r.rank,
                          .ready = r.state == cluster::RankState::kReady,
                          .engine = {.max_running = r.max_running,
                                     .max_batch_tokens = r.max_batch_tokens}});
  }
  return view;
}

void ScheduledBackend::NoteEngineLimits(const cluster::RankInfo& r) {
  if (r.state == cluster::RankState::kFree) return;
  auto registration = std::make_tuple(r.worker_id, r.max_running, r.max_batch_tokens);
  auto [noted, inserted] = limits_noted_.try_emplace(r.rank, registration);
  if (!inserted && noted->second == registration) return;
  noted->second = registration;
  const scheduler::SchedulerConfig& config = scheduler_->config();
  std::vector<std::string> capped;
  if (r.max_running > 0 && r.max_running < config.max_running) {
    capped.push_back(absl::StrCat("runs at most ", r.max_running,
                                  " sequences (--max-running); the scheduler's max_running ",
                                  config.max_running, " is capped to it"));
  }
  if (r.max_batch_tokens > 0 && r.max_batch_tokens < config.max_batch_tokens) {
    capped.push_back(absl::StrCat(
        "takes at most ", r.max_batch_tokens,
        " tokens per step (--max-batch-tokens); the scheduler's max_batch_tokens ",
        config.max_batch_tokens, " is capped to it"));
  }
  if (capped.empty()) return;
  JOULE_LOG(Info) << "rank " << r.rank << " " << absl::StrJoin(capped, "; it ");
}

void ScheduledBackend::Loop() {
  std::vector<bool> was_ready;
  while (true) {
    {
      absl::MutexLock lock(&mu_);
      // Membership changes have no event here: look at least every 50 ms.
      absl::Duration wait = absl::Milliseconds(50);
      for (std::optional<absl::Time> at : {scheduler_->NextWakeup(), plan_due_}) {
        if (at) wait = std::min(wait, std::max(absl::ZeroDuration(), *at - absl::Now()));
      }
      auto wake = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return woken_ || stopping_; };
      mu_.AwaitWithTimeout(absl::Condition(&wake), wait);
      if (stopping_) return;
      woken_ = false;
    }
    const scheduler::ClusterView view = View();
    // A rank that stopped being ready loses its requests (the router fails them).
    was_ready.resize(std::max(was_ready.size(), view.ranks.size()));
    for (const scheduler::RankInfo& r : view.ranks) {
      if (was_ready[r.rank] && !r.ready) scheduler_->OnRankLost(r.rank);
      was_ready[r.rank] = r.ready;
    }
    for (const scheduler::Assignment& a : scheduler_->Dispatch(view)) {
      Queued q;
      {
        absl::MutexLock lock(&mu_);
        auto it = queued_.find(a.id);
        if (it == queued_.end()) continue;  // cancelled meanwhile
        q = std::move(it->second);
        queued_.erase(it);
      }
      if (prometheus::Histogram* h = queue_time_[static_cast<int>(q.tier)]) {
        h->Observe(absl::ToDoubleSeconds(absl::Now() - q.queued_at));
      }
      Send(a.id, a.rank, std::move(q));
    }
    SendStepPlans(view);
  }
}

void ScheduledBackend::SendStepPlans(const scheduler::ClusterView& view) {
  plan_due_.reset();
  // fcfs: the engine's own order, nothing preempted.
  if (scheduler_->config().policy == scheduler::PolicyKind::kFcfs) return;
  const absl::Time now = absl::Now();
  for (const scheduler::RankInfo& r : view.ranks) {
    if (!r.ready) {
      plans_.erase(r.rank);  // a worker that comes back holds no plan
      continue;
    }
    const scheduler::StepLimits limits = scheduler_->StepLimitsFor(r.rank);
    RankPlan& last = plans_[r.rank];
    // A decision the scheduler no longer makes is forgotten: the same
    // preemption decided again later is a new decision.
    const absl::flat_hash_set<uint64_t> decided(limits.preempt.begin(), limits.preempt.end());
    absl::erase_if(last.preempt_asked, [&](uint64_t id) { return !decided.contains(id); });
    std::vector<uint64_t> preempt;
    for (uint64_t id : limits.preempt) {
      if (!last.preempt_asked.contains(id)) preempt.push_back(id);
    }
    // Unchanged when the order is the last one less the requests that ended.
    const absl::flat_hash_set<uint64_t> listed(limits.order.begin(), limits.order.end());
    std::vector<uint64_t> kept;
    for (uint64_t id : last.order) {
      if (listed.contains(id)) kept.push_back(id);
    }
    if (kept == limits.order && preempt.empty()) {
      last.order = limits.order;
      continue;
    }
    if (const absl::Time due = last.sent_at + kMinPlanInterval; now < due) {
      if (!plan_due_ || due < *plan_due_) plan_due_ = due;
      continue;
    }
    cluster::RankStepPlan plan{.max_running = limits.max_running};
    {
      absl::MutexLock lock(&mu_);
      auto name = [&](const std::vector<uint64_t>& ids, std::vector<std::string>* out)
                      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
                        for (uint64_t id : ids) {
                          auto it = sent_.find(id);
                          if (it != sent_.end()) out->push_back(it->second);
                        }
                      };
      name(limits.order, &plan.order);
      name(preempt, &plan.preempt);
    }
    last.order = limits.order;
    last.sent_at = absl::Now();  // when it goes out, not when this pass began
    last.preempt_asked.insert(preempt.begin(), preempt.end());
    router_->SendStepPlan(r.rank, plan, [this, preempt](absl::StatusOr<int> preempted) {
      // The worker preempted (some of) them: back to waiting, as far as the
      // scheduler knows (one that was not running there is unaffected:
      // OnPreempted ignores requests without a token yet, and a finished one
      // is gone).
      if (!preempted.ok() || *preempted == 0) return;
      for (uint64_t id : preempt) scheduler_->OnPreempted(id);
      Wake();
    });
  }
}

void ScheduledBackend::Send(uint64_t id, int rank, Queued q) {
  const scheduler::PolicyKind policy = scheduler_->config().policy;
  const scheduler::Tier tier = q.tier;
  v1::GenerateRequest forward = std::move(q.request);
  if (policy != scheduler::PolicyKind::kFcfs) {
    forward.set_priority(static_cast<int>(tier));
  }
  // Tiers with a time-per-output-token target carry the step cap their own
  // target needs on this rank (ipw only); the ranks keep every step within
  // the smallest cap of their live requests (lockstep), so the cap ends with
  // the request that needed it.
  if (const int64_t cap = scheduler_->StepTokenCapFor(rank, tier); cap > 0) {
    forward.set_step_token_cap(static_cast<int32_t>(cap));
  }
  forward.set_token_interval_us(absl::ToInt64Microseconds(scheduler_->TokenIntervalFor(tier)));
  auto sink = std::make_shared<CountingSink>(this, std::move(q.sink), scheduler_, id, rank);
  const std::string request_id = forward.request_id();
  std::function<void(absl::Status)> done = std::move(q.done);
  {
    absl::MutexLock lock(&mu_);
    sent_[id] = request_id;
  }
  router_->GenerateAsyncOnRank(
      rank, forward, q.deadline, sink,
      [this, id, sink, request_id, done = std::move(done)](absl::Status outcome) {
        if (outcome.ok() && sink->finished()) {
          scheduler_->OnFinished(id);
        } else {
          scheduler_->OnCancelled(id);
        }
        {
          absl::MutexLock lock(&mu_);
          auto it = ids_.find(request_id);
          if (it != ids_.end() && it->second == id) ids_.erase(it);
          sent_.erase(id);
          woken_ = true;  // room on the rank: dispatch again
        }
        done(std::move(outcome));
      });
}

}  // namespace joule::http
