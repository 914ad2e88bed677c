// Mutual TLS and the cluster token over a real coordinator on 127.0.0.1:0
// (Coordinator and Frontend services), with certificates from
// deploy/local/make_secrets.sh under two CAs. Every method is called through
// a GenericStub driven by the service descriptors, so a method added later
// without the token check fails here (the Worker service:
// tests/worker/service/worker_security_test.cc, apart because it links UCX).
#include <stdlib.h>

#include <memory>
#include <set>
#include <string>

#include <google/protobuf/descriptor.h>
#include <grpcpp/grpcpp.h>

#include "absl/strings/str_cat.h"
#include "common/grpc_security.h"
#include "common/model_fingerprint.h"
#include "coordinator/cluster/coordinator_server.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "proto/joule/v1/cluster.grpc.pb.h"
#include "proto/joule/v1/generate.grpc.pb.h"
#include "tests/coordinator/cluster/test_model.h"
#include "tests/testing/grpc_security_testing.h"

namespace joule {
namespace {

using ::testing::HasSubstr;
using testing_security::CaA;
using testing_security::ClusterSecrets;
using testing_security::CaB;
using testing_security::ExpectEveryMethodNeedsTheToken;
using testing_security::In;
using testing_security::TlsChannel;

// The services of the internal protos are exactly those these tests cover.
TEST(InternalServicesTest, EveryOneIsCoveredHere) {
  std::set<std::string> services;
  for (const char* file : {"joule/v1/cluster.proto", "joule/v1/generate.proto"}) {
    const google::protobuf::FileDescriptor* descriptor =
        google::protobuf::DescriptorPool::generated_pool()->FindFileByName(file);
    ASSERT_NE(descriptor, nullptr) << file;
    for (int i = 0; i < descriptor->service_count(); ++i) services.insert(descriptor->service(i)->full_name());
  }
  EXPECT_EQ(services, (std::set<std::string>{"joule.v1.Coordinator", "joule.v1.Frontend", "joule.v1.Worker"}))
      << "a new service needs the token check in every method and a case in this file";
}

class CoordinatorSecurityTest : public ::testing::Test {
 protected:
  void Start(const ClusterSecrets& secrets) {
    cluster::CoordinatorOptions o;
    o.model = model_.path();
    o.workers = 1;
    o.port = 0;
    o.tls_cert = secrets.path("node.pem");
    o.tls_key = secrets.path("node.key");
    o.tls_ca = secrets.path("ca.pem");
    o.cluster_token_file = secrets.path("cluster-token");
    auto server = cluster::CoordinatorServer::Start(o);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = *std::move(server);
  }
  void TearDown() override {
    if (server_) server_->Stop();
  }
  grpc::Status ClusterStatus(grpc::Channel* channel, const std::string& token,
                             v1::ClusterStatusReply* reply) {
    grpc::ClientContext context;
    context.set_deadline(In(absl::Seconds(10)));
    context.AddMetadata(kClusterTokenKey, token);
    return v1::Frontend::NewStub(channel->shared_from_this())
        ->ClusterStatus(&context, v1::ClusterStatusRequest(), reply);
  }

  cluster::testing::TinyModelDir model_;
  std::unique_ptr<cluster::CoordinatorServer> server_;
};

TEST_F(CoordinatorSecurityTest, OnlyClientsWithACertificateFromTheClusterCaGetIn) {
  Start(CaA());
  const int port = server_->port();
  v1::ClusterStatusReply reply;
  grpc::Status ok = ClusterStatus(TlsChannel(port, CaA(), &CaA()).get(), CaA().token, &reply);
  ASSERT_TRUE(ok.ok()) << ok.error_message();
  EXPECT_EQ(reply.world_size(), 1);

  grpc::Status no_cert = ClusterStatus(TlsChannel(port, CaA(), nullptr).get(), CaA().token, &reply);
  EXPECT_FALSE(no_cert.ok()) << "a client without a certificate got in";
  grpc::Status other_ca = ClusterStatus(TlsChannel(port, CaA(), &CaB()).get(), CaA().token, &reply);
  EXPECT_FALSE(other_ca.ok()) << "a certificate from another CA got in";
  auto plain = grpc::CreateChannel(absl::StrCat("127.0.0.1:", port), grpc::InsecureChannelCredentials());
  EXPECT_FALSE(ClusterStatus(plain.get(), CaA().token, &reply).ok()) << "plain text got in";
}

TEST_F(CoordinatorSecurityTest, EveryMethodNeedsTheClusterToken) {
  Start(CaA());
  auto channel = TlsChannel(server_->port(), CaA(), &CaA());
  ExpectEveryMethodNeedsTheToken(channel.get(), "joule.v1.Coordinator", CaA().token);
  ExpectEveryMethodNeedsTheToken(channel.get(), "joule.v1.Frontend", CaA().token);
}

// --tls-server-name: peers are checked against one name instead of the host
// dialled (pods' addresses change; the certificate's name does not).
TEST_F(CoordinatorSecurityTest, ServerNameReplacesTheDialledHostInTheCheck) {
  Start(CaA());
  const std::string target = absl::StrCat("127.0.0.1:", server_->port());
  auto status_with = [&](const std::string& server_name) {
    GrpcSecurityFlags flags = CaA().flags();
    flags.tls_server_name = server_name;
    absl::StatusOr<GrpcSecurity> security = LoadGrpcSecurity(flags);
    EXPECT_TRUE(security.ok()) << security.status();
    v1::ClusterStatusReply reply;
    return ClusterStatus(MakeChannel(target, *security, {}).get(), CaA().token, &reply);
  };
  // The certificate names IP:127.0.0.1 and DNS:localhost (make_secrets.sh).
  EXPECT_TRUE(status_with("").ok());
  grpc::Status named = status_with("localhost");
  EXPECT_TRUE(named.ok()) << named.error_message();
  EXPECT_FALSE(status_with("joule.internal").ok()) << "a name the certificate lacks was accepted";
}

// A worker id shows in logs; the secret its registration got does not.
TEST_F(CoordinatorSecurityTest, ForgedHeartbeatIsRefusedAndChangesNothing) {
  Start(CaA());
  // MakeChannel: how the cluster's own processes connect (TLS and the token).
  absl::StatusOr<GrpcSecurity> security = LoadGrpcSecurity(CaA().flags());
  ASSERT_TRUE(security.ok()) << security.status();
  auto channel = MakeChannel(absl::StrCat("127.0.0.1:", server_->port()), *security, {});
  auto coordinator = v1::Coordinator::NewStub(channel);
  v1::RegisterRequest r;
  r.set_protocol_version(v1::PROTOCOL_VERSION_1);
  r.set_model_fingerprint(*ModelFingerprint(model_.path()));
  r.set_requested_rank(-1);
  r.set_worker_id("w0");
  r.set_transport(v1::TRANSPORT_KIND_UCX);
  r.set_worker_endpoint("127.0.0.1:1");
  v1::RegisterReply registered;
  {
    grpc::ClientContext context;
    context.set_deadline(In(absl::Seconds(10)));
    grpc::Status s = coordinator->Register(&context, r, &registered);
    ASSERT_TRUE(s.ok()) << s.error_message();
  }
  auto beat = [&](const std::string& secret, int running) {
    v1::HeartbeatRequest hb;
    hb.set_worker_id("w0");
    hb.set_rank(0);
    hb.set_worker_secret(secret);
    hb.set_ready(true);
    hb.set_running(running);
    grpc::ClientContext context;
    context.set_deadline(In(absl::Seconds(10)));
    v1::HeartbeatReply reply;
    return coordinator->Heartbeat(&context, hb, &reply);
  };
  ASSERT_TRUE(beat(registered.worker_secret(), 2).ok());
  for (const std::string& forged : {std::string(), std::string(32, '0')}) {
    grpc::Status s = beat(forged, 9);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::PERMISSION_DENIED) << s.error_message();
  }
  v1::ClusterStatusReply status;
  ASSERT_TRUE(ClusterStatus(channel.get(), CaA().token, &status).ok());
  ASSERT_EQ(status.ranks_size(), 1);
  EXPECT_EQ(status.ranks(0).running(), 2) << "the forged heartbeats changed rank 0's load";
}

// Loading the options: all three TLS files or none, errors naming the flag.
class GrpcSecurityOptionsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    for (const char* name : {"JOULE_TLS_CERT", "JOULE_TLS_KEY", "JOULE_TLS_CA", "JOULE_CLUSTER_TOKEN"}) {
      unsetenv(name);
    }
  }
  void TearDown() override { SetUp(); }
};

TEST_F(GrpcSecurityOptionsTest, NoneIsInsecureWithOneWarningLine) {
  absl::StatusOr<GrpcSecurity> s = LoadGrpcSecurity({});
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_FALSE(s->tls());
  EXPECT_TRUE(s->token.empty());
  const std::string warning = GrpcSecurityWarning(*s);
  EXPECT_THAT(warning, HasSubstr("not encrypted (no --tls-cert/--tls-key/--tls-ca)"));
  EXPECT_THAT(warning, HasSubstr("no cluster token"));
  EXPECT_EQ(warning.find('\n'), std::string::npos);
  absl::StatusOr<GrpcSecurity> full = LoadGrpcSecurity(CaA().flags());
  ASSERT_TRUE(full.ok()) << full.status();
  EXPECT_TRUE(full->tls());
  EXPECT_EQ(full->token.value(), CaA().token) << "the file's trailing newline is not part of it";
  EXPECT_EQ(GrpcSecurityWarning(*full), "");
}

TEST_F(GrpcSecurityOptionsTest, PartOfTheTlsFlagsIsAnErrorNamingTheMissingOne) {
  GrpcSecurityFlags flags = CaA().flags();
  flags.tls_key = "";
  absl::StatusOr<GrpcSecurity> s = LoadGrpcSecurity(flags);
  EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.status().message()), HasSubstr("--tls-key"));
  flags = CaA().flags();
  flags.tls_ca = "";
  EXPECT_THAT(std::string(LoadGrpcSecurity(flags).status().message()), HasSubstr("--tls-ca"));
}

TEST_F(GrpcSecurityOptionsTest, UnreadableFileNamesTheFlagAndPath) {
  GrpcSecurityFlags flags = CaA().flags();
  flags.tls_cert = "/nonexistent/node.pem";
  absl::StatusOr<GrpcSecurity> s = LoadGrpcSecurity(flags);
  EXPECT_THAT(std::string(s.status().message()), HasSubstr("--tls-cert"));
  EXPECT_THAT(std::string(s.status().message()), HasSubstr("/nonexistent/node.pem"));
  flags = CaA().flags();
  flags.cluster_token_file = "/nonexistent/token";
  s = LoadGrpcSecurity(flags);
  EXPECT_THAT(std::string(s.status().message()), HasSubstr("--cluster-token-file"));
  EXPECT_THAT(std::string(s.status().message()), HasSubstr("/nonexistent/token"));
}

TEST_F(GrpcSecurityOptionsTest, EnvironmentFillsWhatTheFlagsLeaveOut) {
  setenv("JOULE_TLS_CERT", CaA().path("node.pem").c_str(), 1);
  setenv("JOULE_TLS_KEY", CaA().path("node.key").c_str(), 1);
  setenv("JOULE_TLS_CA", "/nonexistent/ca.pem", 1);
  setenv("JOULE_CLUSTER_TOKEN", "from-env", 1);
  GrpcSecurityFlags flags;
  flags.tls_ca = CaB().path("ca.pem");  // the flag wins over JOULE_TLS_CA
  absl::StatusOr<GrpcSecurity> s = LoadGrpcSecurity(flags);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->ca_pem, CaB().ca_pem);
  EXPECT_EQ(s->cert_pem, CaA().cert_pem);
  EXPECT_EQ(s->token.value(), "from-env");
  flags.cluster_token_file = CaA().path("cluster-token");  // the file wins over the variable
  s = LoadGrpcSecurity(flags);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->token.value(), CaA().token);
}

}  // namespace
}  // namespace joule
