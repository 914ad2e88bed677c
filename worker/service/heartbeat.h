// The worker's heartbeat: one owned thread that reports load to the
// coordinator every interval and acts on the reply (a new placement, shutdown).
//
// Each heartbeat carries readiness, running/waiting counts, KV usage and the
// per-expert token counts since the last one (for EPLB), and the steps
// measured since then (for the coordinator's step cost model). A placement newer
// than the one offered last is prepared (loading experts if needed) and
// offered to the runtime, which applies it between steps on every rank at
// once. When the coordinator asks to shut down, or cannot be reached for more
// than `max_missed` intervals, on_stop runs once (from this thread).
#pragma once

#include <atomic>
#include <functional>
#include <string>
#include <thread>

#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "worker/service/coordinator_client.h"
#include "worker/service/placement_loader.h"
#include "worker/service/worker_runtime.h"

namespace joule::worker {

struct HeartbeatOptions {
  std::string worker_id;
  std::string worker_secret;  // RegisterReply.worker_secret (SetWorkerSecret replaces it)
  int rank = 0;
  absl::Duration interval = absl::Seconds(1);
  int max_missed = 5;  // consecutive failed heartbeats tolerated
};

class HeartbeatLoop {
 public:
  // on_stop(OK): the coordinator asked to shut down; on_stop(error): it is
  // unreachable. Nothing is owned; all must outlive the loop.
  // on_group(update): the coordinator formed a new expert-parallel group (a
  // peer died); the worker regroups (it must not block this thread).
  // on_unknown(sent): the coordinator did not know this worker when the
  // heartbeat sent at `sent` arrived (NOT_FOUND: it restarted); the worker
  // registers again (not on this thread). Such replies are not missed heartbeats.
  HeartbeatLoop(CoordinatorClient* coordinator, WorkerRuntime* runtime, PlacementLoader* loader,
                HeartbeatOptions options, std::function<void(absl::Status)> on_stop,
                std::function<void(const v1::GroupUpdate&)> on_group = nullptr,
                std::function<void(absl::Time sent)> on_unknown = nullptr);
  ~HeartbeatLoop();  // Stop()

  void Start();
  // Sends no more heartbeats; joins the thread. Idempotent.
  void Stop();

  // One heartbeat and its reply, synchronously (what the thread does every
  // interval). Returns the RPC's status.
  absl::Status Beat();

  // Forgets the placements offered so far (a new coordinator numbers its
  // placements from 1 again). Safe from any thread.
  void ForgetPlacements();
  // The secret of a new registration (the coordinator restarted). Safe from any thread.
  void SetWorkerSecret(std::string secret);

 private:
  void Loop();

  CoordinatorClient* const coordinator_;
  WorkerRuntime* const runtime_;
  PlacementLoader* const loader_;
  const HeartbeatOptions options_;
  const std::function<void(absl::Status)> on_stop_;
  const std::function<void(const v1::GroupUpdate&)> on_group_;
  const std::function<void(absl::Time)> on_unknown_;
  absl::Mutex secret_mu_;
  std::string worker_secret_ ABSL_GUARDED_BY(secret_mu_);
  std::atomic<uint64_t> offered_epoch_ = 0;   // newest placement handed to the runtime
  std::atomic<uint64_t> rejected_epoch_ = 0;  // one that could not be prepared (not retried)
  int missed_ = 0;
  bool stopped_ = false;  // on_stop has run
  absl::Notification quit_;
  std::thread thread_;
};

}  // namespace joule::worker
