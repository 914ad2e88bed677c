// GenerationBackend over the coordinator's Router.
#pragma once

#include "coordinator/cluster/router.h"
#include "coordinator/http/generation_backend.h"

namespace joule::http {

class RouterBackend final : public GenerationBackend {
 public:
  explicit RouterBackend(cluster::Router* router) : router_(router) {}

  absl::Status Validate(const v1::GenerateRequest& request) const override {
    return router_->Validate(request);
  }
  absl::Status Ready() const override { return router_->Ready(); }
  void GenerateAsync(const v1::GenerateRequest& request, absl::Time deadline,
                     std::shared_ptr<cluster::GenerateSink> sink,
                     std::function<void(absl::Status)> done) override {
    router_->GenerateAsync(request, deadline, std::move(sink), std::move(done));
  }
  void Cancel(const std::string& request_id) override { router_->Cancel(request_id); }

 private:
  cluster::Router* const router_;
};

}  // namespace joule::http
