// The WorkerHandler the gRPC server is built with before the runtime exists:
// the server starts first (its port goes into the registration), requests get
// Unavailable until the rank is ready, then everything goes to the runtime.
#pragma once

#include <atomic>

#include "worker/service/process_stats.h"
#include "worker/service/worker_handler.h"

namespace joule::worker {

class StartingHandler : public WorkerHandler {
 public:
  // Set once; the runtime must outlive the server.
  void set_runtime(WorkerHandler* runtime) { runtime_.store(runtime); }

  absl::Status Submit(const std::string& request_id, GenerationRequest request,
                      RequestCallbacks callbacks) override {
    WorkerHandler* r = runtime_.load();
    if (r == nullptr) {
      return absl::UnavailableError("worker is starting (registering, loading weights, connecting peers)");
    }
    return r->Submit(request_id, std::move(request), std::move(callbacks));
  }
  bool Cancel(const std::string& request_id) override {
    WorkerHandler* r = runtime_.load();
    return r != nullptr && r->Cancel(request_id);
  }
  WorkerStatus Status() override {
    WorkerHandler* r = runtime_.load();
    if (r != nullptr) return r->Status();
    WorkerStatus s;
    s.resident_bytes = ResidentBytes();
    return s;
  }
  void SetStepPlan(StepPlan plan, StepPlanDone done) override {
    WorkerHandler* r = runtime_.load();
    if (r == nullptr) {
      done(absl::UnavailableError(
          "worker is starting (registering, loading weights, connecting peers)"));
      return;
    }
    r->SetStepPlan(std::move(plan), std::move(done));
  }
  std::optional<double> ReadEnergyMeter() override {
    WorkerHandler* r = runtime_.load();
    return r != nullptr ? r->ReadEnergyMeter() : std::nullopt;
  }

 private:
  std::atomic<WorkerHandler*> runtime_{nullptr};
};

}  // namespace joule::worker
