#include "worker/service/worker_runtime.h"

#include <algorithm>
#include <utility>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "worker/service/process_stats.h"

namespace joule::worker {

WorkerRuntime::WorkerRuntime(Model* model, ep::Transport* transport, std::unique_ptr<Engine> engine,
                             std::unique_ptr<ep::ExpertParallelExecutor> executor,
                             uint64_t placement_epoch, RuntimeOptions options)
    : model_(model),
      transport_(transport),
      options_(std::move(options)),
      row_transport_(options_.expert_parallel.device.row_transport),
      engine_(std::move(engine)),
      executor_(std::move(executor)),
      stepper_(engine_.get(), transport_),
      applied_epoch_(placement_epoch) {
  model_->set_expert_executor(executor_.get());
  if (options_.energy_meter != nullptr) {
    attributor_ = std::make_unique<telemetry::EnergyAttributor>(options_.energy_meter);
  }
  absl::MutexLock lock(&mu_);
  status_.rank = transport_->rank();
  status_.placement_epoch = applied_epoch_;
  status_.group_epoch = options_.group_epoch;
  status_.loaded_weight_bytes = static_cast<int64_t>(model_->weights().LoadedBytes());
  status_.kv_total_blocks = engine_->kv_cache().allocator().num_blocks();
  status_.kv_free_blocks = engine_->kv_cache().allocator().num_free();
  if (options_.energy_meter != nullptr) status_.energy_source = options_.energy_meter->source();
}

WorkerRuntime::~WorkerRuntime() {
  Stop("runtime destroyed");
  Join();
  // The model outlives us; it must not keep calling a destroyed executor.
  model_->set_expert_executor(nullptr);
}

void WorkerRuntime::Start() {
  {
    absl::MutexLock lock(&mu_);
    serving_ = true;
    status_.ready = true;
  }
  loop_ = std::thread([this] { Loop(); });
}

void WorkerRuntime::Stop(const std::string& reason) {
  absl::MutexLock lock(&mu_);
  if (stop_requested_.load()) return;
  stop_reason_ = reason;
  stop_requested_.store(true);
}

void WorkerRuntime::Leave(const std::string& reason) {
  absl::MutexLock lock(&mu_);
  if (stop_requested_.load()) return;
  stop_reason_ = reason;
  left_.store(true);  // before stop_requested_: a round that sees the stop sees this
  stop_requested_.store(true);
}

bool WorkerRuntime::EndIfLeft() {
  if (!left_.load()) return false;
  std::string reason;
  {
    absl::MutexLock lock(&mu_);
    reason = stop_reason_;
  }
  JOULE_LOG(Info) << "rank " << transport_->rank() << ": left the group (" << reason
                  << "); failing " << live_.size() << " in-flight request(s)";
  FailAll(absl::UnavailableError(absl::StrCat("worker shutting down: ", reason)));
  return true;
}

void WorkerRuntime::Join() {
  if (loop_.joinable()) loop_.join();
}

bool WorkerRuntime::WaitForExit(absl::Duration timeout) {
  return exited_.WaitForNotificationWithTimeout(timeout);
}

absl::Status WorkerRuntime::exit_status() const {
  absl::MutexLock lock(&mu_);
  return exit_status_;
}

absl::Status WorkerRuntime::Submit(const std::string& request_id, GenerationRequest request,
                                   RequestCallbacks callbacks) {
  absl::MutexLock lock(&mu_);
  if (!serving_) {
    return absl::UnavailableError(status_.error.empty()
                                      ? std::string("worker is not serving")
                                      : absl::StrCat("worker is not serving: ", status_.error));
  }
  if (ids_.contains(request_id)) {
    return absl::AlreadyExistsError(absl::StrCat("request_id '", request_id, "' is already running"));
  }
  const uint64_t id = next_id_++;
  request.id = id;
  Live live{.request_id = request_id, .callbacks = std::move(callbacks),
            .prompt_tokens = static_cast<int>(request.prompt.size()),
            .resumed_tokens = static_cast<int>(request.resumed.size())};
  accepted_.emplace(id, std::move(live));
  ids_.emplace(request_id, id);
  inbox_.push_back(AddOp{id, std::move(request)});
  return absl::OkStatus();
}

bool WorkerRuntime::Cancel(const std::string& request_id) {
  absl::MutexLock lock(&mu_);
  auto it = ids_.find(request_id);
  if (it == ids_.end()) return false;
  inbox_.push_back(CancelOp{it->second});
  return true;
}

WorkerStatus WorkerRuntime::Status() {
  WorkerStatus s;
  {
    absl::MutexLock lock(&mu_);
    s = status_;
  }
  s.resident_bytes = ResidentBytes();
  return s;
}

void WorkerRuntime::SetStepPlan(StepPlan plan, StepPlanDone done) {
  absl::Status refused;
  {
    absl::MutexLock lock(&mu_);
    if (!serving_) {
      refused = absl::UnavailableError("worker is not serving");
    } else if (plan.sequence > plan_sequence_) {
      plan_sequence_ = plan.sequence;
      offered_plans_.push_back(OfferedPlan{std::move(plan), std::move(done)});
      return;
    }
  }
  // A plan not newer than one held was overtaken by it: ignored.
  if (refused.ok()) {
    done(0);
  } else {
    done(refused);
  }
}

std::optional<double> WorkerRuntime::ReadEnergyMeter() {
  const std::optional<double> zero = attributor_ ? attributor_->first_reading() : std::nullopt;
  if (!zero) return std::nullopt;
  absl::StatusOr<double> j = options_.energy_meter->ReadJoules();
  if (!j.ok()) return std::nullopt;
  return *j - *zero;
}

void WorkerRuntime::OfferPlacement(PreparedPlacement placement) {
  absl::MutexLock lock(&mu_);
  if (offered_ && offered_->epoch >= placement.epoch) return;
  if (!placement.weights && offered_ && offered_->weights) {
    // The newer placement was prepared against the older one's weights.
    placement.weights = std::move(offered_->weights);
  }
  offered_ = std::move(placement);
}

std::vector<std::vector<int64_t>> WorkerRuntime::TakeExpertLoad() {
  absl::MutexLock lock(&mu_);
  std::vector<std::vector<int64_t>> out = std::move(expert_load_);
  expert_load_.clear();
  return out;
}

void WorkerRuntime::Loop() {
  JOULE_LOG(Info) << "rank " << transport_->rank() << "/" << transport_->world_size()
                  << ": step loop started (" << transport_->name() << " transport, placement epoch "
                  << applied_epoch_ << ")";
  while (true) {
    if (EndIfLeft()) break;
    if (rounds_ % static_cast<uint64_t>(std::max(1, options_.control_interval)) == 0) {
      const Round round = ControlRound();
      if (round == Round::kEnd) break;
      if (round == Round::kRegrouped) continue;  // the new group starts with a control round
    }
    Drain();
    if (attributor_) {
      // A failed read loses this round's energy (counted); serving goes on.
      if (absl::Status s = attributor_->BeginStep(); !s.ok()) {
        JOULE_LOG(Warning) << "rank " << transport_->rank() << ": energy meter: " << s.message();
      }
    }
    const absl::Time step_start = absl::Now();
    absl::StatusOr<ep::LockstepStepper::Result> r = stepper_.Step();
    if (r.ok()) InjectDelay(r->step);
    const absl::Duration took = absl::Now() - step_start;
    if (!r.ok() && EndIfLeft()) break;
    if (!r.ok() && WaitForGroup(r.status())) continue;  // the survivors regrouped
    if (!r.ok()) {
      // Names this rank: on a GPU worker the cause may be its own device
      // (a CUDA error), not a peer.
      const absl::Status failure = absl::UnavailableError(absl::StrCat(
          "expert-parallel step failed on rank ", transport_->rank(), ": ", r.status().message()));
      JOULE_LOG(Error) << "rank " << transport_->rank() << ": " << failure.message()
                       << "; failing " << live_.size() << " in-flight request(s)";
      FailAll(failure);
      absl::MutexLock lock(&mu_);
      exit_status_ = failure;
      break;
    }
    ++rounds_;
    if (attributor_) {
      AttributeEnergy(*r, took);
    } else {
      RecordStep(r->step, took, 0);
    }
    if (r->global_tokens > 0) AccumulateExpertLoad();
    {
      absl::MutexLock lock(&mu_);
      status_.preemptions_total += r->step.preempted.size();
      status_.prompt_tokens_total += static_cast<uint64_t>(r->step.prefill_tokens);
      status_.generation_tokens_total += r->step.tokens.size();
      status_.prefix_cache_queries_total += static_cast<uint64_t>(r->step.prefix_cache_queries);
      status_.prefix_cache_hits_total += static_cast<uint64_t>(r->step.prefix_cache_hits);
      if (r->global_tokens > 0) ++status_.busy_steps;
    }
    PublishStatus();
    AnswerStepPlans(r->step);
    Deliver(r->step);
    if (r->global_tokens == 0) {
      // Nobody had work: pause briefly (or until something arrives) before
      // the next round, which every rank still runs. While every rank's
      // sequences rest (pacing), pause until the first falls due, within
      // idle_wait_max: a request arriving at another rank meanwhile waits for
      // this one's next round at most that long.
      const absl::Duration pause =
          std::max(options_.idle_wait, std::min(r->rest, options_.idle_wait_max));
      absl::MutexLock lock(&mu_);
      auto wake = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return !inbox_.empty() || !offered_plans_.empty() || stop_requested_.load();
      };
      mu_.AwaitWithTimeout(absl::Condition(&wake), pause);
    }
  }
  JOULE_LOG(Info) << "rank " << transport_->rank() << ": step loop ended after " << rounds_
                  << " rounds";
  exited_.Notify();
  absl::MutexLock wake(&mu_);  // InstallGroup waits on mu_ for the loop's end too
}

WorkerRuntime::Round WorkerRuntime::ControlRound() {
  {
    absl::MutexLock lock(&mu_);
    if (offered_ && offered_->epoch <= applied_epoch_) offered_.reset();
    if (offered_ && (!candidate_ || offered_->epoch > candidate_->epoch)) {
      if (!offered_->weights && candidate_ && candidate_->weights) {
        offered_->weights = std::move(candidate_->weights);
      }
      candidate_ = std::move(*offered_);
      offered_.reset();
    }
  }
  const int world = transport_->world_size();
  Control mine{.ready_epoch = candidate_ ? candidate_->epoch : applied_epoch_,
               .stopping = stop_requested_.load() && !left_.load() ? 1u : 0u,
               .step_token_cap = engine_->LocalStepTokenCap()};
  std::vector<Control> all(world);
  if (absl::Status s = transport_->AllGather(&mine, sizeof(Control), all.data()); !s.ok()) {
    if (EndIfLeft()) return Round::kEnd;
    if (WaitForGroup(s)) return Round::kRegrouped;
    const absl::Status failure =
        absl::UnavailableError(absl::StrCat("expert-parallel step failed: ", s.message()));
    JOULE_LOG(Error) << "rank " << transport_->rank() << ": " << failure.message() << "; failing "
                     << live_.size() << " in-flight request(s)";
    FailAll(failure);
    absl::MutexLock lock(&mu_);
    exit_status_ = failure;
    return Round::kEnd;
  }
  for (int r = 0; r < world; ++r) {
    if (all[r].stopping == 0) continue;
    std::string reason;
    absl::Status exit;
    if (r == transport_->rank()) {
      absl::MutexLock lock(&mu_);
      reason = stop_reason_;
    } else {
      reason = absl::StrCat("rank ", r, " is shutting down");
      exit = absl::UnavailableError(reason);
    }
    JOULE_LOG(Info) << "rank " << transport_->rank() << ": stopping (" << reason << "); failing "
                    << live_.size() << " in-flight request(s)";
    FailAll(absl::UnavailableError(absl::StrCat("worker shutting down: ", reason)));
    absl::MutexLock lock(&mu_);
    exit_status_ = exit;
    return Round::kEnd;
  }
  // One step's time is every rank's (lockstep): the tightest cap anywhere
  // bounds every rank's steps, not only the rank holding the fast request.
  int64_t cap = 0;
  for (const Control& c : all) {
    if (c.step_token_cap > 0 && (cap == 0 || c.step_token_cap < cap)) cap = c.step_token_cap;
  }
  if (static_cast<int>(cap) != step_cap_) {
    step_cap_ = static_cast<int>(cap);
    ApplyStepDirectives({});
    absl::MutexLock lock(&mu_);
    status_.step_token_cap = step_cap_;
  }
  const uint64_t epoch = all[0].ready_epoch;
  const bool agreed = std::all_of(all.begin(), all.end(),
                                  [&](const Control& c) { return c.ready_epoch == epoch; });
  if (agreed && epoch > applied_epoch_ && !ApplyPlacement(epoch)) return Round::kEnd;
  return Round::kGo;
}

bool WorkerRuntime::ApplyPlacement(uint64_t epoch) {
  PreparedPlacement p = std::move(*candidate_);
  candidate_.reset();
  AccumulateExpertLoad();  // counts of the executor being replaced
  absl::Status s;
  const bool reloaded = p.weights != nullptr && executor_ != nullptr;
  if (executor_ != nullptr) {
    // Every rank starts a new executor at this round, over reloaded weights
    // or its own: executors map their shared windows together (at their
    // first layer), so a new one on some ranks only would meet the others'
    // next exchange with its mapping.
    // The old one's windows go first, together (its peers may still have
    // them mapped); it runs no more either way.
    s = executor_->ReleaseWindows();
    std::unique_ptr<ep::ExpertParallelExecutor> next;
    if (s.ok()) {
      next = MakeExecutor(p, transport_);
      s = next->status();
    }
    if (s.ok()) ReplaceExecutor(std::move(next));
  }  // without an executor this one rank holds every expert: nothing moves
  if (!s.ok()) {
    // Every other rank applied it; carrying on would route tokens wrongly.
    const absl::Status failure = absl::InternalError(
        absl::StrCat("applying placement epoch ", epoch, ": ", s.message()));
    JOULE_LOG(Error) << "rank " << transport_->rank() << ": " << failure.message();
    FailAll(absl::UnavailableError(absl::StrCat("expert-parallel step failed: ", failure.message())));
    absl::MutexLock lock(&mu_);
    exit_status_ = failure;
    return false;
  }
  applied_epoch_ = epoch;
  JOULE_LOG(Info) << "rank " << transport_->rank() << ": applied placement epoch " << epoch
                  << " at round " << rounds_ << (reloaded ? " (with newly loaded experts)" : "");
  absl::MutexLock lock(&mu_);
  status_.placement_epoch = epoch;
  // A reloaded set holds attention/dense weights too (views of the same
  // mmapped files as the model's): its size is what this rank now serves.
  status_.loaded_weight_bytes = static_cast<int64_t>(
      expert_weights_ ? expert_weights_->LoadedBytes() : model_->weights().LoadedBytes());
  return true;
}

std::unique_ptr<ep::ExpertParallelExecutor> WorkerRuntime::MakeExecutor(PreparedPlacement& p,
                                                                        ep::Transport* transport) {
  if (p.weights != nullptr) expert_weights_ = std::move(p.weights);
  const ModelWeights* weights = expert_weights_ ? expert_weights_.get() : &model_->weights();
  ep::ExpertParallelOptions options = options_.expert_parallel;
  options.device.row_transport = row_transport_;
  return std::make_unique<ep::ExpertParallelExecutor>(weights, transport, p.placement,
                                                      model_->stream(), options);
}

void WorkerRuntime::ReplaceExecutor(std::unique_ptr<ep::ExpertParallelExecutor> executor) {
  model_->set_expert_executor(executor.get());
  // The new one's stats start at zero; the metrics are counters since the worker started.
  const ep::ExpertParallelExecutor::Stats old = executor_->stats();
  retired_ep_stats_.dispatch_bytes += old.dispatch_bytes;
  retired_ep_stats_.combine_bytes += old.combine_bytes;
  retired_ep_stats_.dispatch_seconds += old.dispatch_seconds;
  retired_ep_stats_.combine_seconds += old.combine_seconds;
  retired_ep_stats_.two_batch_layers += old.two_batch_layers;
  executor_ = std::move(executor);
}

void WorkerRuntime::AdoptExpertWeights(std::unique_ptr<ModelWeights> weights) {
  expert_weights_ = std::move(weights);
  absl::MutexLock lock(&mu_);
  status_.loaded_weight_bytes = static_cast<int64_t>(expert_weights_->LoadedBytes());
}

bool WorkerRuntime::AwaitingGroup() const {
  absl::MutexLock lock(&mu_);
  return awaiting_group_;
}

absl::Status WorkerRuntime::InstallGroup(NewGroup group, absl::Duration timeout) {
  const uint64_t epoch = group.epoch;
  absl::MutexLock lock(&mu_);
  if (exited_.HasBeenNotified()) return absl::FailedPreconditionError("the step loop has ended");
  pending_group_ = std::move(group);
  // Counted, not compared by epoch: a restarted coordinator numbers its groups from 1 again.
  const uint64_t target = groups_installed_ + 1;
  auto installed = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return groups_installed_ >= target || exited_.HasBeenNotified();
  };
  if (!mu_.AwaitWithTimeout(absl::Condition(&installed), timeout)) {
    pending_group_.reset();
    return absl::DeadlineExceededError(absl::StrCat("group epoch ", epoch, " not installed within ",
                                                    absl::FormatDuration(timeout)));
  }
  if (groups_installed_ < target) return absl::FailedPreconditionError("the step loop has ended");
  return absl::OkStatus();
}

bool WorkerRuntime::WaitForGroup(const absl::Status& failure) {
  if (options_.regroup_timeout <= absl::ZeroDuration() || executor_ == nullptr) return false;
  JOULE_LOG(Warning) << "rank " << transport_->rank() << ": step failed (" << failure.message()
                     << "); keeping " << engine_->num_running() + engine_->num_waiting()
                     << " sequence(s) while the group re-forms (up to "
                     << absl::FormatDuration(options_.regroup_timeout) << ")";
  NewGroup group;
  {
    absl::MutexLock lock(&mu_);
    awaiting_group_ = true;
    status_.ready = false;
    status_.error = absl::StrCat("regrouping after: ", failure.message());
    auto arrived = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      return pending_group_.has_value() || stop_requested_.load();
    };
    mu_.AwaitWithTimeout(absl::Condition(&arrived), options_.regroup_timeout);
    awaiting_group_ = false;
    if (!pending_group_.has_value()) return false;
    group = std::move(*pending_group_);
    pending_group_.reset();
  }
  AccumulateExpertLoad();  // counts of the executor being replaced
  row_transport_ = group.row_transport;  // the old one went with its transport
  ReplaceExecutor(MakeExecutor(group.placement, group.transport));
  transport_ = group.transport;
  stepper_ = ep::LockstepStepper(engine_.get(), transport_);
  applied_epoch_ = group.placement.epoch;
  candidate_.reset();
  rounds_ = 0;  // every member starts the new group's control rounds together
  JOULE_LOG(Info) << "rank " << transport_->rank() << " of " << transport_->world_size()
                  << ": serving in group epoch " << group.epoch << " (placement epoch "
                  << applied_epoch_ << ")";
  absl::MutexLock lock(&mu_);
  offered_.reset();
  ++groups_installed_;
  status_.ready = true;
  status_.error.clear();
  status_.group_epoch = group.epoch;
  status_.placement_epoch = applied_epoch_;
  ++status_.regroups;
  status_.loaded_weight_bytes = static_cast<int64_t>(
      expert_weights_ ? expert_weights_->LoadedBytes() : model_->weights().LoadedBytes());
  return true;
}

void WorkerRuntime::TakeStepPlans(bool added) {
  std::vector<OfferedPlan> plans;
  {
    absl::MutexLock lock(&mu_);
    plans.swap(offered_plans_);
  }
  if (plans.empty() && !(added && !plan_order_.empty())) return;
  std::vector<uint64_t> preempt;
  if (!plans.empty()) {
    plan_order_ = std::move(plans.back().plan.order);
    plan_max_running_ = plans.back().plan.max_running;
    absl::MutexLock lock(&mu_);
    // An older plan overtaken before it was applied keeps its preemptions:
    // each was one decision, and it is not sent again.
    for (OfferedPlan& p : plans) {
      AppliedPlan& applied = applied_plans_.emplace_back();
      applied.done = std::move(p.done);
      for (const std::string& request_id : p.plan.preempt) {
        auto it = ids_.find(request_id);
        if (it == ids_.end()) continue;  // unknown here (finished, or never was)
        applied.preempt.push_back(it->second);
        preempt.push_back(it->second);
      }
    }
  }
  ApplyStepDirectives(std::move(preempt));
}

void WorkerRuntime::ApplyStepDirectives(std::vector<uint64_t> preempt) {
  StepDirectives d{.max_batch_tokens = step_cap_,
                   .max_running = plan_max_running_,
                   .preempt = std::move(preempt)};
  if (!plan_order_.empty()) {
    d.order.reserve(plan_order_.size());
    absl::MutexLock lock(&mu_);
    for (const std::string& request_id : plan_order_) {
      // Not here (yet): the order is resolved again when requests arrive.
      if (auto it = ids_.find(request_id); it != ids_.end()) d.order.push_back(it->second);
    }
  }
  engine_->SetStepDirectives(std::move(d));
}

void WorkerRuntime::AnswerStepPlans(const StepResult& step) {
  if (applied_plans_.empty()) return;
  std::vector<AppliedPlan> plans = std::move(applied_plans_);
  applied_plans_.clear();
  const absl::flat_hash_set<uint64_t> preempted(step.preempted.begin(), step.preempted.end());
  absl::flat_hash_set<uint64_t> asked;
  std::vector<int> counts;
  counts.reserve(plans.size());
  for (const AppliedPlan& p : plans) {
    int n = 0;
    for (uint64_t id : p.preempt) {
      if (!preempted.contains(id)) continue;
      ++n;
      asked.insert(id);
    }
    counts.push_back(n);
  }
  if (!asked.empty()) {
    absl::MutexLock lock(&mu_);
    status_.scheduler_preemptions_total += asked.size();
  }
  for (size_t i = 0; i < plans.size(); ++i) plans[i].done(counts[i]);
}

void WorkerRuntime::Drain() {
  std::deque<Op> ops;
  std::vector<std::pair<uint64_t, Live>> added;
  {
    absl::MutexLock lock(&mu_);
    ops.swap(inbox_);
    for (const Op& op : ops) {
      if (const AddOp* add = std::get_if<AddOp>(&op)) {
        auto it = accepted_.find(add->id);
        added.emplace_back(add->id, std::move(it->second));
        accepted_.erase(it);
      }
    }
  }
  size_t next_added = 0;
  for (Op& op : ops) {
    if (AddOp* add = std::get_if<AddOp>(&op)) {
      live_.emplace(add->id, std::move(added[next_added++].second));
      if (absl::Status s = engine_->Add(std::move(add->request)); !s.ok()) {
        Finish(add->id, RequestOutcome{.status = s});
      }
    } else {
      const uint64_t id = std::get<CancelOp>(op).id;
      auto it = live_.find(id);
      if (it == live_.end()) continue;  // finished in the meantime
      engine_->Cancel(id);
      Finish(id, RequestOutcome{.finish = FinishReason::kCancelled,
                                .prompt_tokens = it->second.prompt_tokens,
                                .completion_tokens = it->second.completion_tokens,
                                .resumed_tokens = it->second.resumed_tokens,
                                .cached_tokens = it->second.cached_tokens});
    }
  }
  // After the adds: a plan may name requests that arrived with it.
  TakeStepPlans(/*added=*/!added.empty());
}

void WorkerRuntime::Deliver(const StepResult& step) {
  TokenUpdate one{.tokens = std::vector<int32_t>(1)};
  for (const TokenOutput& t : step.tokens) {
    auto it = live_.find(t.id);
    if (it == live_.end()) continue;
    Live& live = it->second;
    ++live.completion_tokens;
    live.cached_tokens = t.cached_tokens;
    one.tokens[0] = t.token;
    one.logprobs.clear();
    if (t.logprob.has_value()) one.logprobs.push_back(*t.logprob);
    one.prompt_logprobs = t.prompt_logprobs;
    if (live.callbacks.on_tokens) live.callbacks.on_tokens(one);
    if (t.finish != FinishReason::kNone) {
      Finish(t.id, RequestOutcome{.finish = t.finish,
                                  .prompt_tokens = live.prompt_tokens,
                                  .completion_tokens = live.completion_tokens,
                                  .resumed_tokens = live.resumed_tokens,
                                  .cached_tokens = live.cached_tokens});
    }
  }
}

void WorkerRuntime::AttributeEnergy(const ep::LockstepStepper::Result& round,
                                    absl::Duration took) {
  absl::Status s;
  double step_joules = 0;
  if (round.global_tokens == 0) {
    s = attributor_->EndIdleStep();
  } else {
    std::vector<telemetry::StepTokens> tokens;
    tokens.reserve(round.step.scheduled.size());
    for (const auto& [id, n] : round.step.scheduled) tokens.push_back({id, n});
    s = attributor_->EndStep(tokens, &step_joules);
  }
  if (!s.ok() && !absl::IsFailedPrecondition(s)) {
    JOULE_LOG(Warning) << "rank " << transport_->rank() << ": energy meter: " << s.message();
  }
  // A step whose energy was not read would teach the cost model 0 J.
  if (s.ok()) RecordStep(round.step, took, step_joules);
  const telemetry::EnergyAttributor::Totals t = attributor_->totals();
  const absl::Time now = absl::Now();
  // The meter's instant power, read (outside the lock) once per power window.
  std::optional<double> instant_watts;
  if (power_window_start_ != absl::InfinitePast() && now - power_window_start_ >= absl::Seconds(1)) {
    if (absl::StatusOr<double> w = options_.energy_meter->ReadPowerWatts(); w.ok()) instant_watts = *w;
  }
  absl::MutexLock lock(&mu_);
  status_.energy_attributed_joules = t.attributed_joules;
  status_.energy_idle_joules = t.idle_joules;
  status_.energy_unattributed_joules = t.unattributed_joules;
  status_.energy_joules = t.total_joules();
  // Power over windows of at least a second: per-round deltas of a counter
  // that updates every ~100 ms (NVML) would be mostly zeros and spikes.
  if (power_window_start_ == absl::InfinitePast()) {
    power_window_start_ = now;
    power_window_joules_ = status_.energy_joules;
  } else if (const absl::Duration window = now - power_window_start_; window >= absl::Seconds(1)) {
    status_.power_watts =
        (status_.energy_joules - power_window_joules_) / absl::ToDoubleSeconds(window);
    if (instant_watts) status_.power_instant_watts = *instant_watts;
    power_window_start_ = now;
    power_window_joules_ = status_.energy_joules;
  }
}

namespace {

// Tokens this rank computed in the step.
int64_t ScheduledTokens(const StepResult& step) {
  int64_t tokens = 0;
  for (const auto& [id, n] : step.scheduled) tokens += n;
  return tokens;
}

}  // namespace

void WorkerRuntime::InjectDelay(const StepResult& step) const {
  if (options_.injected_step_delay <= absl::ZeroDuration() &&
      options_.injected_delay_per_token <= absl::ZeroDuration()) {
    return;
  }
  if (const int64_t tokens = ScheduledTokens(step); tokens > 0) {
    absl::SleepFor(options_.injected_step_delay + options_.injected_delay_per_token * tokens);
  }
}

void WorkerRuntime::RecordStep(const StepResult& step, absl::Duration took, double joules) {
  const int64_t tokens = ScheduledTokens(step);
  if (tokens <= 0) return;  // only joined the others' step: not this rank's cost
  absl::MutexLock lock(&mu_);
  if (step_samples_.size() >= kMaxStepSamples) step_samples_.pop_front();
  step_samples_.push_back(scheduler::StepSample{.batch_tokens = tokens,
                                                .context_tokens = step.context_tokens,
                                                .duration = took,
                                                .energy_joules = joules,
                                                .ended_at = absl::Now()});
}

std::vector<scheduler::StepSample> WorkerRuntime::TakeStepSamples() {
  absl::MutexLock lock(&mu_);
  std::vector<scheduler::StepSample> out(step_samples_.begin(), step_samples_.end());
  step_samples_.clear();
  return out;
}

void WorkerRuntime::Finish(uint64_t id, const RequestOutcome& outcome_in) {
  auto it = live_.find(id);
  if (it == live_.end()) return;
  RequestOutcome outcome = outcome_in;
  if (attributor_) {
    outcome.energy_joules = attributor_->TakeRequestJoules(id);
    outcome.energy_source = options_.energy_meter->source();
  }
  Live live = std::move(it->second);
  live_.erase(it);
  {
    absl::MutexLock lock(&mu_);
    ids_.erase(live.request_id);
  }
  if (live.callbacks.on_done) live.callbacks.on_done(outcome);
}

void WorkerRuntime::FailAll(const absl::Status& status) {
  std::vector<Live> failed;
  std::vector<StepPlanDone> plans;
  for (AppliedPlan& p : applied_plans_) plans.push_back(std::move(p.done));
  applied_plans_.clear();
  {
    absl::MutexLock lock(&mu_);
    for (OfferedPlan& p : offered_plans_) plans.push_back(std::move(p.done));
    offered_plans_.clear();
    serving_ = false;
    status_.ready = false;
    status_.error = std::string(status.message());
    inbox_.clear();
    for (auto& [id, live] : accepted_) failed.push_back(std::move(live));
    accepted_.clear();
    ids_.clear();
  }
  for (auto& [id, live] : live_) {
    engine_->Cancel(id);  // frees its KV blocks
    failed.push_back(std::move(live));
  }
  live_.clear();
  for (Live& live : failed) {
    if (live.callbacks.on_done) {
      live.callbacks.on_done(RequestOutcome{.status = status,
                                            .prompt_tokens = live.prompt_tokens,
                                            .completion_tokens = live.completion_tokens,
                                  .resumed_tokens = live.resumed_tokens,
                                  .cached_tokens = live.cached_tokens});
    }
  }
  for (StepPlanDone& done : plans) done(status);
  PublishStatus();
}

void WorkerRuntime::AccumulateExpertLoad() {
  std::vector<std::vector<int64_t>> load;
  if (executor_ != nullptr) {
    load = executor_->TakeExpertLoad();
  } else {
    absl::StatusOr<std::vector<std::vector<int64_t>>> local = model_->local_experts().TakeExpertLoad();
    if (!local.ok()) {
      JOULE_LOG(Warning) << "rank " << transport_->rank() << ": expert load: " << local.status();
      return;
    }
    load = *std::move(local);
  }
  absl::MutexLock lock(&mu_);
  if (expert_load_.size() < load.size()) expert_load_.resize(load.size());
  std::vector<std::vector<int64_t>>& total = status_.expert_tokens_total;
  if (total.size() < load.size()) total.resize(load.size());
  for (size_t l = 0; l < load.size(); ++l) {
    for (std::vector<int64_t>* acc : {&expert_load_[l], &total[l]}) {
      if (acc->size() < load[l].size()) acc->resize(load[l].size(), 0);
      for (size_t e = 0; e < load[l].size(); ++e) (*acc)[e] += load[l][e];
    }
  }
}

void WorkerRuntime::PublishStatus() {
  const BlockAllocator& blocks = engine_->kv_cache().allocator();
  absl::MutexLock lock(&mu_);
  status_.running = engine_->num_running();
  status_.waiting = engine_->num_waiting();
  status_.kv_free_blocks = blocks.num_free();
  status_.kv_total_blocks = blocks.num_blocks();
  status_.kv_usage = engine_->kv_cache().Usage();
  status_.prefix_cache_blocks = blocks.num_cached();
  status_.steps = rounds_;
  const ep::ExpertParallelExecutor::Stats ep =
      executor_ != nullptr ? executor_->stats() : ep::ExpertParallelExecutor::Stats{};
  status_.dispatch_bytes_total = retired_ep_stats_.dispatch_bytes + ep.dispatch_bytes;
  status_.combine_bytes_total = retired_ep_stats_.combine_bytes + ep.combine_bytes;
  status_.dispatch_seconds_total = retired_ep_stats_.dispatch_seconds + ep.dispatch_seconds;
  status_.combine_seconds_total = retired_ep_stats_.combine_seconds + ep.combine_seconds;
  status_.two_batch_layers_total = retired_ep_stats_.two_batch_layers + ep.two_batch_layers;
}

}  // namespace joule::worker
