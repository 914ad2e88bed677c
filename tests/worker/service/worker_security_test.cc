// The Worker gRPC service behind mutual TLS and the cluster token, on
// 127.0.0.1:0: every method (from the service descriptor) refuses calls
// without the token, and a client certificate from another CA is refused.
#include <memory>

#include <grpcpp/grpcpp.h>

#include "common/grpc_security.h"
#include "gtest/gtest.h"
#include "proto/joule/v1/generate.grpc.pb.h"
#include "tests/testing/grpc_security_testing.h"
#include "worker/service/starting_handler.h"
#include "worker/service/worker_grpc_service.h"

namespace joule {
namespace {

using testing_security::CaA;
using testing_security::CaB;
using testing_security::CallEmpty;
using testing_security::ExpectEveryMethodNeedsTheToken;
using testing_security::In;
using testing_security::TlsChannel;

TEST(WorkerSecurityTest, EveryMethodNeedsTheClusterTokenAndAClusterCertificate) {
  absl::StatusOr<GrpcSecurity> security = LoadGrpcSecurity(CaA().flags());
  ASSERT_TRUE(security.ok()) << security.status();
  worker::StartingHandler handler;  // no runtime: past the check, calls fail as "starting"
  worker::WorkerGrpcService service(&handler, security->token);
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", MakeServerCredentials(*security), &port);
  builder.RegisterService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  ASSERT_NE(server, nullptr);
  ExpectEveryMethodNeedsTheToken(TlsChannel(port, CaA(), &CaA()).get(), "joule.v1.Worker",
                                 CaA().token);
  grpc::Status other_ca = CallEmpty(TlsChannel(port, CaA(), &CaB()).get(), "/joule.v1.Worker/Status",
                                    CaA().token);
  EXPECT_FALSE(other_ca.ok()) << "a certificate from another CA got in";
  server->Shutdown(In(absl::Seconds(1)));
}

}  // namespace
}  // namespace joule
