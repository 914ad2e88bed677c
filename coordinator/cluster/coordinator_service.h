// Thin gRPC adapters: Coordinator (workers register, rendezvous, heartbeat)
// over Membership, Frontend (token-id clients) over Router. They convert
// deadlines and statuses and nothing else. Every method checks the cluster
// token first (common/grpc_security.h).
#pragma once

#include "common/grpc_security.h"
#include "coordinator/cluster/membership.h"
#include "coordinator/cluster/router.h"
#include "proto/joule/v1/cluster.grpc.pb.h"
#include "proto/joule/v1/generate.grpc.pb.h"

namespace joule::cluster {

class CoordinatorServiceImpl final : public v1::Coordinator::Service {
 public:
  // An empty token: every call is accepted.
  explicit CoordinatorServiceImpl(Membership* membership, ClusterToken token = {})
      : membership_(membership), token_(std::move(token)) {}

  grpc::Status Register(grpc::ServerContext* context, const v1::RegisterRequest* request,
                        v1::RegisterReply* reply) override;
  grpc::Status Rendezvous(grpc::ServerContext* context, const v1::RendezvousRequest* request,
                          v1::RendezvousReply* reply) override;
  grpc::Status Heartbeat(grpc::ServerContext* context, const v1::HeartbeatRequest* request,
                         v1::HeartbeatReply* reply) override;

 private:
  Membership* const membership_;
  const ClusterToken token_;
};

class FrontendServiceImpl final : public v1::Frontend::Service {
 public:
  FrontendServiceImpl(Membership* membership, Router* router, ClusterToken token = {})
      : membership_(membership), router_(router), token_(std::move(token)) {}

  grpc::Status Generate(grpc::ServerContext* context, const v1::GenerateRequest* request,
                        grpc::ServerWriter<v1::GenerateResponse>* writer) override;
  grpc::Status ClusterStatus(grpc::ServerContext* context, const v1::ClusterStatusRequest* request,
                             v1::ClusterStatusReply* reply) override;
  grpc::Status Rebalance(grpc::ServerContext* context, const v1::RebalanceRequest* request,
                         v1::RebalanceReply* reply) override;
  grpc::Status Drain(grpc::ServerContext* context, const v1::DrainRequest* request,
                     v1::DrainReply* reply) override;

 private:
  Membership* const membership_;
  Router* const router_;
  const ClusterToken token_;
};

}  // namespace joule::cluster
