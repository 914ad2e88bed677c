// What the HTTP front door needs from the cluster to generate: token-level
// validation, readiness, and the Router's asynchronous Generate/Cancel
// (coordinator/cluster/router.h). router_backend.h adapts the Router;
// fake_generation_backend.h serves tests without a cluster.
#pragma once

#include <functional>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "coordinator/cluster/router.h"
#include "proto/joule/v1/generate.pb.h"

namespace joule::http {

class GenerationBackend {
 public:
  virtual ~GenerationBackend() = default;

  // INVALID_ARGUMENT naming the proto field (prompt_token_ids[3], sampling.top_p, ...).
  virtual absl::Status Validate(const v1::GenerateRequest& request) const = 0;

  // OK when a request could be routed now; UNAVAILABLE with the reason otherwise.
  virtual absl::Status Ready() const = 0;

  // Starts `request`; responses arrive through sink->Write (any thread, one at
  // a time per request), then `done` exactly once with the outcome. The sink is
  // kept alive until `done` has run.
  virtual void GenerateAsync(const v1::GenerateRequest& request, absl::Time deadline,
                             std::shared_ptr<cluster::GenerateSink> sink,
                             std::function<void(absl::Status)> done) = 0;

  // The client went away: stop generating `request_id` and free its KV blocks.
  virtual void Cancel(const std::string& request_id) = 0;
};

}  // namespace joule::http
