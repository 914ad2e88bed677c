// Test helpers for mutual TLS and the cluster token: throwaway secrets from
// deploy/local/make_secrets.sh (two CAs), TLS client channels, and a check
// that every method of a service (from its descriptor) refuses calls without
// the cluster token.
#pragma once

#include <stdlib.h>

#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <google/protobuf/descriptor.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "common/file.h"
#include "common/grpc_security.h"
#include "gtest/gtest.h"

namespace joule::testing_security {

// One cluster's throwaway secrets (deploy/local/make_secrets.sh).
struct ClusterSecrets {
  std::string dir;
  std::string ca_pem, cert_pem, key_pem, token;

  std::string path(const std::string& name) const { return dir + "/" + name; }
  GrpcSecurityFlags flags() const {
    return {.tls_cert = path("node.pem"),
            .tls_key = path("node.key"),
            .tls_ca = path("ca.pem"),
            .cluster_token_file = path("cluster-token")};
  }
};

inline ClusterSecrets MakeSecrets() {
  std::string tmpl = ::testing::TempDir() + "/joule-secrets-XXXXXX";
  ClusterSecrets s;
  s.dir = mkdtemp(tmpl.data());
  const std::string command =
      absl::StrCat("bash " JOULE_SOURCE_DIR "/deploy/local/make_secrets.sh '", s.dir, "'");
  EXPECT_EQ(std::system(command.c_str()), 0) << command;
  s.ca_pem = ReadFile(s.path("ca.pem")).value_or("");
  s.cert_pem = ReadFile(s.path("node.pem")).value_or("");
  s.key_pem = ReadFile(s.path("node.key")).value_or("");
  s.token = std::string(absl::StripAsciiWhitespace(ReadFile(s.path("cluster-token")).value_or("")));
  EXPECT_FALSE(s.cert_pem.empty() || s.key_pem.empty() || s.token.empty());
  return s;
}

// Made once: openssl takes a moment.
inline const ClusterSecrets& CaA() {
  static const ClusterSecrets* secrets = new ClusterSecrets(MakeSecrets());
  return *secrets;
}
inline const ClusterSecrets& CaB() {
  static const ClusterSecrets* secrets = new ClusterSecrets(MakeSecrets());
  return *secrets;
}

// A client that trusts `roots`' CA and presents `client`'s certificate (none: nullptr).
inline std::shared_ptr<grpc::Channel> TlsChannel(int port, const ClusterSecrets& roots,
                                          const ClusterSecrets* client) {
  grpc::SslCredentialsOptions options{.pem_root_certs = roots.ca_pem};
  if (client != nullptr) {
    options.pem_private_key = client->key_pem;
    options.pem_cert_chain = client->cert_pem;
  }
  return grpc::CreateChannel(absl::StrCat("127.0.0.1:", port), grpc::SslCredentials(options));
}

inline std::chrono::system_clock::time_point In(absl::Duration d) { return absl::ToChronoTime(absl::Now() + d); }

// Calls /SERVICE/METHOD with an empty request, the token as given (absent: nullopt).
inline grpc::Status CallEmpty(grpc::Channel* channel, const std::string& method,
                       const std::optional<std::string>& token) {
  grpc::GenericStub stub(channel->shared_from_this());
  grpc::ClientContext context;
  context.set_deadline(In(absl::Seconds(10)));
  if (token.has_value()) context.AddMetadata(kClusterTokenKey, *token);
  grpc::Slice empty(std::string{});
  grpc::ByteBuffer request(&empty, 1);  // a serialized message with every field at its default
  grpc::ByteBuffer reply;
  grpc::Status result;
  absl::Notification done;
  stub.UnaryCall(&context, method, grpc::StubOptions(), &request, &reply, [&](grpc::Status s) {
    result = std::move(s);
    done.Notify();
  });
  done.WaitForNotification();
  return result;
}

// Every method of `service` ("joule.v1.Worker"), from the descriptor pool.
inline std::vector<std::string> MethodPaths(const std::string& service) {
  const google::protobuf::ServiceDescriptor* descriptor =
      google::protobuf::DescriptorPool::generated_pool()->FindServiceByName(service);
  EXPECT_NE(descriptor, nullptr) << service;
  std::vector<std::string> paths;
  for (int i = 0; descriptor != nullptr && i < descriptor->method_count(); ++i) {
    paths.push_back(absl::StrCat("/", service, "/", descriptor->method(i)->name()));
  }
  return paths;
}

// Without the token, with a wrong one of the same length, with one a byte
// longer or shorter: UNAUTHENTICATED, saying nothing about the token. With it:
// the call gets past the check.
inline void ExpectEveryMethodNeedsTheToken(grpc::Channel* channel, const std::string& service,
                                    const std::string& token) {
  std::string wrong = token;
  wrong[0] = wrong[0] == 'a' ? 'b' : 'a';
  const std::vector<std::optional<std::string>> refused = {
      std::nullopt, "", wrong, token + "0", token.substr(0, token.size() - 1)};
  const std::vector<std::string> methods = MethodPaths(service);
  ASSERT_FALSE(methods.empty());
  for (const std::string& method : methods) {
    for (const std::optional<std::string>& presented : refused) {
      grpc::Status s = CallEmpty(channel, method, presented);
      EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAUTHENTICATED)
          << method << " with token '" << presented.value_or("(none)") << "': " << s.error_message();
      EXPECT_EQ(s.error_message(), "missing or wrong cluster token") << method;
    }
    grpc::Status s = CallEmpty(channel, method, token);
    EXPECT_NE(s.error_code(), grpc::StatusCode::UNAUTHENTICATED) << method << ": " << s.error_message();
    EXPECT_NE(s.error_code(), grpc::StatusCode::UNIMPLEMENTED) << method;
  }
}

}  // namespace joule::testing_security
