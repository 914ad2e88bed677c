// Security of every internal gRPC channel (coordinator <-> workers, joule-cli
// -> coordinator), in one place: mutual TLS and the cluster token.
//
// Mutual TLS: with --tls-cert, --tls-key and --tls-ca (or JOULE_TLS_CERT,
// JOULE_TLS_KEY, JOULE_TLS_CA; a flag wins) servers demand a client
// certificate signed by the CA and clients present theirs, so only holders of
// a certificate from the cluster's CA can talk at all.
// Cluster token: with --cluster-token-file (or JOULE_CLUSTER_TOKEN) every call
// carries the token as metadata and every service method refuses calls
// without it (UNAUTHENTICATED). Either may be off; the start-up warning says so.
#pragma once

#include <array>
#include <memory>
#include <string>
#include <string_view>

#include <grpcpp/grpcpp.h>

#include "absl/status/statusor.h"

namespace joule {

// Rows for a binary's option table (common/options.h), X(type, field, default, help).
#define JOULE_GRPC_SECURITY_FLAGS(X)                                                               \
  X(std::string, tls_cert, "",                                                                     \
    "PEM certificate of this process for mutual TLS on internal gRPC, with --tls-key and "        \
    "--tls-ca (env JOULE_TLS_CERT); none of the three: unencrypted")                              \
  X(std::string, tls_key, "", "PEM private key of --tls-cert (env JOULE_TLS_KEY)")                 \
  X(std::string, tls_ca, "",                                                                       \
    "PEM CA certificate that signs every peer's certificate (env JOULE_TLS_CA)")                  \
  X(std::string, tls_server_name, "",                                                              \
    "name every peer's certificate is checked against instead of the host dialled, e.g. one "     \
    "name for all pods (env JOULE_TLS_SERVER_NAME); empty: the host dialled")                     \
  X(std::string, cluster_token_file, "",                                                           \
    "file holding the cluster token every internal RPC carries and every server requires "        \
    "(else env JOULE_CLUSTER_TOKEN); none: no token")

// The flags' values as given (empty: not given).
struct GrpcSecurityFlags {
  std::string tls_cert;
  std::string tls_key;
  std::string tls_ca;
  std::string tls_server_name;
  std::string cluster_token_file;
};

template <typename Config>
GrpcSecurityFlags GrpcSecurityFlagsFrom(const Config& config) {
  return {.tls_cert = config.tls_cert,
          .tls_key = config.tls_key,
          .tls_ca = config.tls_ca,
          .tls_server_name = config.tls_server_name,
          .cluster_token_file = config.cluster_token_file};
}

// The metadata key that carries the cluster token.
inline constexpr char kClusterTokenKey[] = "x-joule-cluster-token";

// The shared secret every internal call must carry; empty: none required.
class ClusterToken {
 public:
  ClusterToken() = default;
  explicit ClusterToken(std::string value) : value_(std::move(value)) {}

  bool empty() const { return value_.empty(); }
  const std::string& value() const { return value_; }

  // OK when no token is configured or the call carries this one (compared in
  // constant time); UNAUTHENTICATED, revealing nothing, otherwise. Every
  // method of every internal service calls it first.
  grpc::Status Check(const grpc::ServerContextBase& context) const;

 private:
  std::string value_;
};

// What the flags name, read: TLS material (all three PEMs or none) and the token.
struct GrpcSecurity {
  std::string cert_pem;
  std::string key_pem;
  std::string ca_pem;
  std::string server_name;  // checked in peers' certificates; empty: the host dialled
  ClusterToken token;

  bool tls() const { return !cert_pem.empty(); }
};

// Reads the files the flags (or, for an empty flag, JOULE_TLS_CERT, JOULE_TLS_KEY,
// JOULE_TLS_CA) name, and the token (--cluster-token-file, else JOULE_CLUSTER_TOKEN;
// surrounding whitespace dropped). InvalidArgument naming the flag when only some
// TLS flags are set, a file cannot be read, or a token is empty.
absl::StatusOr<GrpcSecurity> LoadGrpcSecurity(const GrpcSecurityFlags& flags);

// Mutual TLS (client certificates required and verified against the CA), or
// insecure credentials when TLS is off.
std::shared_ptr<grpc::ServerCredentials> MakeServerCredentials(const GrpcSecurity& security);

// A channel to `target` with this process's certificate (or none when TLS is
// off) whose every call carries the cluster token (when set).
std::shared_ptr<grpc::Channel> MakeChannel(const std::string& target, const GrpcSecurity& security,
                                           const grpc::ChannelArguments& args);

// The one start-up warning line when TLS or the token is off; empty when both are on.
std::string GrpcSecurityWarning(const GrpcSecurity& security);

}  // namespace joule
