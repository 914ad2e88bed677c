#include "worker/service/heartbeat.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/logging.h"

namespace joule::worker {

HeartbeatLoop::HeartbeatLoop(CoordinatorClient* coordinator, WorkerRuntime* runtime,
                             PlacementLoader* loader, HeartbeatOptions options,
                             std::function<void(absl::Status)> on_stop,
                             std::function<void(const v1::GroupUpdate&)> on_group,
                             std::function<void(absl::Time)> on_unknown)
    : coordinator_(coordinator),
      runtime_(runtime),
      loader_(loader),
      options_(std::move(options)),
      on_stop_(std::move(on_stop)),
      on_group_(std::move(on_group)),
      on_unknown_(std::move(on_unknown)),
      worker_secret_(options_.worker_secret) {}

void HeartbeatLoop::ForgetPlacements() {
  offered_epoch_ = 0;
  rejected_epoch_ = 0;
}

void HeartbeatLoop::SetWorkerSecret(std::string secret) {
  absl::MutexLock lock(&secret_mu_);
  worker_secret_ = std::move(secret);
}

HeartbeatLoop::~HeartbeatLoop() { Stop(); }

void HeartbeatLoop::Start() {
  thread_ = std::thread([this] { Loop(); });
}

void HeartbeatLoop::Stop() {
  if (!quit_.HasBeenNotified()) quit_.Notify();
  if (thread_.joinable()) thread_.join();
}

void HeartbeatLoop::Loop() {
  do {
    (void)Beat();  // failures are counted and logged inside
  } while (!stopped_ && !quit_.WaitForNotificationWithTimeout(options_.interval));
}

absl::Status HeartbeatLoop::Beat() {
  const WorkerStatus status = runtime_->Status();
  v1::HeartbeatRequest request;
  request.set_worker_id(options_.worker_id);
  {
    absl::MutexLock lock(&secret_mu_);
    request.set_worker_secret(worker_secret_);
  }
  request.set_rank(options_.rank);
  request.set_ready(status.ready);
  request.set_running(status.running);
  request.set_waiting(status.waiting);
  request.set_kv_usage(status.kv_usage);
  request.set_kv_free_blocks(status.kv_free_blocks);
  request.set_placement_epoch(status.placement_epoch);
  request.set_group_epoch(status.group_epoch);
  request.set_energy_joules(status.energy_joules);
  request.set_power_watts(status.power_watts);
  request.set_energy_source(status.energy_source);
  const std::vector<std::vector<int64_t>> load = runtime_->TakeExpertLoad();
  for (size_t l = 0; l < load.size(); ++l) {
    // Dense layers (and MoE layers nobody routed to) have nothing to report.
    if (std::all_of(load[l].begin(), load[l].end(), [](int64_t n) { return n == 0; })) continue;
    v1::ExpertLoad* el = request.add_expert_load();
    el->set_layer(static_cast<int32_t>(l));
    el->mutable_tokens()->Add(load[l].begin(), load[l].end());
  }

  for (const scheduler::StepSample& step : runtime_->TakeStepSamples()) {
    v1::StepRecord* r = request.add_steps();
    r->set_batch_tokens(step.batch_tokens);
    r->set_context_tokens(step.context_tokens);
    r->set_seconds(absl::ToDoubleSeconds(step.duration));
    r->set_energy_joules(step.energy_joules);
    r->set_ended_unix_micros(absl::ToUnixMicros(step.ended_at));
  }

  const absl::Time sent = absl::Now();
  absl::StatusOr<v1::HeartbeatReply> reply = coordinator_->Heartbeat(request);
  if (!reply.ok() && absl::IsNotFound(reply.status()) && on_unknown_) {
    missed_ = 0;  // it answers: a coordinator that does not know us (restarted)
    on_unknown_(sent);
    return reply.status();
  }
  if (!reply.ok()) {
    ++missed_;
    JOULE_LOG(Warning) << "rank " << options_.rank << ": heartbeat " << missed_ << "/"
                       << options_.max_missed << " failed: " << reply.status().message();
    if (missed_ > options_.max_missed && !stopped_) {
      stopped_ = true;
      const absl::Status why = absl::UnavailableError(absl::StrCat(
          "coordinator unreachable for ", missed_, " heartbeats: ", reply.status().message()));
      JOULE_LOG(Error) << "rank " << options_.rank << ": " << why.message() << "; stopping";
      on_stop_(why);
    }
    return reply.status();
  }
  missed_ = 0;
  if (reply->has_group()) {
    // A new group first: placements are for the group the worker serves in.
    if (on_group_) on_group_(reply->group());
  } else if (reply->has_placement() && reply->placement().epoch() > offered_epoch_ &&
      reply->placement().epoch() > status.placement_epoch &&
      reply->placement().epoch() != rejected_epoch_) {
    absl::StatusOr<PreparedPlacement> prepared = loader_->Prepare(reply->placement());
    if (prepared.ok()) {
      offered_epoch_ = prepared->epoch;
      JOULE_LOG(Info) << "rank " << options_.rank << ": placement epoch " << offered_epoch_
                      << " ready; applying between steps once every rank has it";
      runtime_->OfferPlacement(std::move(*prepared));
    } else {
      // Keep running the current placement; the coordinator sees our epoch.
      rejected_epoch_ = reply->placement().epoch();
      JOULE_LOG(Error) << "rank " << options_.rank << ": cannot run placement epoch "
                       << reply->placement().epoch() << ": " << prepared.status().message();
    }
  }
  if (reply->shutdown() && !stopped_) {
    stopped_ = true;
    if (!reply->shutdown_reason().empty()) {
      JOULE_LOG(Error) << "rank " << options_.rank << ": " << reply->shutdown_reason();
      on_stop_(absl::FailedPreconditionError(reply->shutdown_reason()));
    } else {
      JOULE_LOG(Info) << "rank " << options_.rank << ": coordinator asked to shut down";
      on_stop_(absl::OkStatus());
    }
  }
  return absl::OkStatus();
}

}  // namespace joule::worker
