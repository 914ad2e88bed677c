#include "common/grpc_security.h"

#include <cstdlib>
#include <utility>
#include <vector>

#include <grpcpp/support/client_interceptor.h>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "common/file.h"
#include "common/secrets.h"

namespace joule {
namespace {

// The flag's value, else the environment variable's.
std::string FlagOrEnv(const std::string& flag, const char* env) {
  if (!flag.empty()) return flag;
  const char* value = std::getenv(env);
  return value ? value : "";
}

absl::StatusOr<std::string> ReadPem(const char* flag, const std::string& path) {
  absl::StatusOr<std::string> text = ReadFile(path);
  if (!text.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(flag, ": cannot read ", path, ": ",
                                                   text.status().message()));
  }
  if (text->empty()) return absl::InvalidArgumentError(absl::StrCat(flag, ": ", path, " is empty"));
  return text;
}

absl::StatusOr<ClusterToken> LoadToken(const std::string& file) {
  std::string value;
  if (!file.empty()) {
    absl::StatusOr<std::string> text = ReadFile(file);
    if (!text.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("--cluster-token-file: cannot read ", file,
                                                     ": ", text.status().message()));
    }
    value = std::string(absl::StripAsciiWhitespace(*text));
    if (value.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("--cluster-token-file: ", file, " is empty"));
    }
  } else if (const char* env = std::getenv("JOULE_CLUSTER_TOKEN"); env != nullptr && *env) {
    value = std::string(absl::StripAsciiWhitespace(env));
    if (value.empty()) return absl::InvalidArgumentError("JOULE_CLUSTER_TOKEN: is blank");
  }
  return ClusterToken(std::move(value));
}

// Adds the cluster token to the metadata of every call on the channel.
class ClusterTokenInterceptor final : public grpc::experimental::Interceptor {
 public:
  explicit ClusterTokenInterceptor(const std::string* token) : token_(token) {}
  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    if (methods->QueryInterceptionHookPoint(
            grpc::experimental::InterceptionHookPoints::PRE_SEND_INITIAL_METADATA)) {
      methods->GetSendInitialMetadata()->emplace(kClusterTokenKey, *token_);
    }
    methods->Proceed();
  }

 private:
  const std::string* token_;  // owned by the factory, which the channel keeps
};

class ClusterTokenInterceptorFactory final
    : public grpc::experimental::ClientInterceptorFactoryInterface {
 public:
  explicit ClusterTokenInterceptorFactory(std::string token) : token_(std::move(token)) {}
  grpc::experimental::Interceptor* CreateClientInterceptor(
      grpc::experimental::ClientRpcInfo* info) override {
    return new ClusterTokenInterceptor(&token_);
  }

 private:
  const std::string token_;
};

}  // namespace

grpc::Status ClusterToken::Check(const grpc::ServerContextBase& context) const {
  if (value_.empty()) return grpc::Status::OK;
  const auto& metadata = context.client_metadata();
  const auto it = metadata.find(kClusterTokenKey);
  // A missing token is compared as an empty one, so both refusals look alike.
  const std::string_view presented =
      it == metadata.end() ? std::string_view() : std::string_view(it->second.data(), it->second.size());
  if (SecretEquals(presented, value_)) return grpc::Status::OK;
  return grpc::Status(grpc::StatusCode::UNAUTHENTICATED, "missing or wrong cluster token");
}

absl::StatusOr<GrpcSecurity> LoadGrpcSecurity(const GrpcSecurityFlags& flags) {
  const std::string cert = FlagOrEnv(flags.tls_cert, "JOULE_TLS_CERT");
  const std::string key = FlagOrEnv(flags.tls_key, "JOULE_TLS_KEY");
  const std::string ca = FlagOrEnv(flags.tls_ca, "JOULE_TLS_CA");
  GrpcSecurity security;
  if (!cert.empty() || !key.empty() || !ca.empty()) {
    // Half a TLS setup would silently fall back to plain text: refuse it.
    if (cert.empty()) return absl::InvalidArgumentError("--tls-cert: required with --tls-key and --tls-ca");
    if (key.empty()) return absl::InvalidArgumentError("--tls-key: required with --tls-cert and --tls-ca");
    if (ca.empty()) return absl::InvalidArgumentError("--tls-ca: required with --tls-cert and --tls-key");
    auto cert_pem = ReadPem("--tls-cert", cert);
    if (!cert_pem.ok()) return cert_pem.status();
    auto key_pem = ReadPem("--tls-key", key);
    if (!key_pem.ok()) return key_pem.status();
    auto ca_pem = ReadPem("--tls-ca", ca);
    if (!ca_pem.ok()) return ca_pem.status();
    security.cert_pem = *std::move(cert_pem);
    security.key_pem = *std::move(key_pem);
    security.ca_pem = *std::move(ca_pem);
    security.server_name = FlagOrEnv(flags.tls_server_name, "JOULE_TLS_SERVER_NAME");
  }
  absl::StatusOr<ClusterToken> token = LoadToken(flags.cluster_token_file);
  if (!token.ok()) return token.status();
  security.token = *std::move(token);
  return security;
}

std::shared_ptr<grpc::ServerCredentials> MakeServerCredentials(const GrpcSecurity& security) {
  if (!security.tls()) return grpc::InsecureServerCredentials();
  grpc::SslServerCredentialsOptions options(
      GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  options.pem_root_certs = security.ca_pem;
  options.pem_key_cert_pairs.push_back({security.key_pem, security.cert_pem});
  return grpc::SslServerCredentials(options);
}

std::shared_ptr<grpc::Channel> MakeChannel(const std::string& target, const GrpcSecurity& security,
                                           const grpc::ChannelArguments& args) {
  std::shared_ptr<grpc::ChannelCredentials> credentials =
      security.tls() ? grpc::SslCredentials({.pem_root_certs = security.ca_pem,
                                             .pem_private_key = security.key_pem,
                                             .pem_cert_chain = security.cert_pem})
                     : grpc::InsecureChannelCredentials();
  grpc::ChannelArguments channel_args = args;
  // Pods and hosts come and go; one certificate name for all of them does not.
  if (security.tls() && !security.server_name.empty()) {
    channel_args.SetSslTargetNameOverride(security.server_name);
  }
  if (security.token.empty()) return grpc::CreateCustomChannel(target, credentials, channel_args);
  std::vector<std::unique_ptr<grpc::experimental::ClientInterceptorFactoryInterface>> interceptors;
  interceptors.push_back(std::make_unique<ClusterTokenInterceptorFactory>(security.token.value()));
  return grpc::experimental::CreateCustomChannelWithInterceptors(target, credentials, channel_args,
                                                                 std::move(interceptors));
}

std::string GrpcSecurityWarning(const GrpcSecurity& security) {
  constexpr char kNoTls[] = "is not encrypted (no --tls-cert/--tls-key/--tls-ca)";
  constexpr char kNoToken[] =
      "has no cluster token (no --cluster-token-file or JOULE_CLUSTER_TOKEN): anyone who reaches "
      "a port may call it";
  if (!security.tls() && security.token.empty()) {
    return absl::StrCat("warning: internal gRPC ", kNoTls, " and ", kNoToken);
  }
  if (!security.tls()) return absl::StrCat("warning: internal gRPC ", kNoTls);
  if (security.token.empty()) return absl::StrCat("warning: internal gRPC ", kNoToken);
  return "";
}

}  // namespace joule
