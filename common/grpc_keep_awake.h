// Keeps gRPC's callback-API pollers from napping.
//
// gRPC (1.51, as Debian ships it) runs every callback-API completion of a
// process (server reactors, stub->async() calls) on a few "nexting" threads of
// one process-wide completion queue. A nexting thread that sees no event for
// 1 s sleeps 100 ms before it polls again, and after a quiet second they all
// do, together: a request arriving 1.0-1.1 s after the last one waited up to
// 100 ms for its first completion (measured: 41-102 ms instead of 2-8 ms).
// A tick every 250 ms (a callback call of an unknown method over an
// in-process channel: no network, a few microseconds) gives some nexting
// thread an event before its second is up, so one of them is always polling.
#pragma once

#include <memory>
#include <thread>

#include <grpcpp/grpcpp.h>

#include "absl/synchronization/notification.h"
#include "absl/time/time.h"

namespace joule {

class GrpcKeepAwake {
 public:
  // `channel`: any channel; an in-process one (grpc::Server::InProcessChannel)
  // keeps the ticks off the network. Ticks until destroyed.
  explicit GrpcKeepAwake(std::shared_ptr<grpc::Channel> channel,
                         absl::Duration period = absl::Milliseconds(250));
  ~GrpcKeepAwake();
  GrpcKeepAwake(const GrpcKeepAwake&) = delete;
  GrpcKeepAwake& operator=(const GrpcKeepAwake&) = delete;

 private:
  void Tick();

  std::shared_ptr<grpc::Channel> channel_;
  const absl::Duration period_;
  absl::Notification stop_;
  std::thread thread_;
};

}  // namespace joule
