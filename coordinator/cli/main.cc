// joule-cli: talks to a coordinator's Frontend service with token ids, so a
// cluster is usable before the HTTP front door exists.
//
//   joule-cli generate  --coordinator HOST:PORT --prompt-ids 1,2,3 [--max-tokens 16]
//                       [--temperature 0] [--top-p 1] [--top-k 0] [--seed S]
//                       [--tier fast|priority|default|flex] [--timeout-s 600]
//   joule-cli status    --coordinator HOST:PORT
//   joule-cli rebalance --coordinator HOST:PORT [--redundant-experts N]
//   joule-cli drain     --coordinator HOST:PORT RANK
//
// generate prints each streamed token id on its own line as it arrives, then
// "finish_reason: stop|length|cancelled". Exit status: 0 on success, 1 when
// the coordinator returns an error (printed as "error: CODE: message") or the
// request was cancelled before it finished, 2 on bad usage.
#include <cstdio>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/grpc_security.h"
#include "coordinator/cluster/grpc_util.h"
#include "proto/joule/v1/generate.grpc.pb.h"

namespace {

using joule::v1::Frontend;

constexpr char kUsage[] =
    "usage:\n"
    "  joule-cli generate  --coordinator HOST:PORT --prompt-ids 1,2,3 [--max-tokens 16]\n"
    "                      [--temperature 0] [--top-p 1] [--top-k 0] [--seed S]\n"
    "                      [--tier fast|priority|default|flex] [--timeout-s 600]\n"
    "  joule-cli status    --coordinator HOST:PORT\n"
    "  joule-cli rebalance --coordinator HOST:PORT [--redundant-experts N]\n"
    "  joule-cli drain     --coordinator HOST:PORT RANK\n"
    "every command also takes [--tls-cert PEM --tls-key PEM --tls-ca PEM] (mutual TLS; env\n"
    "JOULE_TLS_CERT, JOULE_TLS_KEY, JOULE_TLS_CA), [--tls-server-name NAME] (the name the\n"
    "coordinator's certificate must hold, if not its host; env JOULE_TLS_SERVER_NAME) and\n"
    "[--cluster-token-file FILE] (env JOULE_CLUSTER_TOKEN); flags win over the environment\n";

int Usage(const std::string& why) {
  std::fprintf(stderr, "joule-cli: %s\n%s", why.c_str(), kUsage);
  return 2;
}

int RpcError(const grpc::Status& s) {
  std::fprintf(stderr, "error: %s: %s\n",
               std::string(absl::StatusCodeToString(static_cast<absl::StatusCode>(s.error_code()))).c_str(),
               s.error_message().c_str());
  // A TLS handshake the coordinator refused looks like an unreachable one.
  if (s.error_code() == grpc::StatusCode::UNAVAILABLE) {
    std::fprintf(stderr,
                 "hint: is the coordinator running at --coordinator, and does this client's "
                 "certificate (--tls-cert/--tls-key/--tls-ca or JOULE_TLS_*) come from its CA?\n");
  }
  return 1;
}

const char* FinishName(joule::v1::FinishReason r) {
  switch (r) {
    case joule::v1::FINISH_REASON_STOP: return "stop";
    case joule::v1::FINISH_REASON_LENGTH: return "length";
    case joule::v1::FINISH_REASON_CANCELLED: return "cancelled";
    default: return "unspecified";
  }
}

struct Flags {
  std::map<std::string, std::string> values;
  bool Has(const std::string& k) const { return values.count(k) > 0; }
  std::string Get(const std::string& k, const std::string& def = "") const {
    auto it = values.find(k);
    return it == values.end() ? def : it->second;
  }
};

template <typename T>
bool ParseNumber(const Flags& f, const std::string& name, T* out, std::string* error) {
  if (!f.Has(name)) return true;
  bool ok;
  if constexpr (std::is_floating_point_v<T>) {
    ok = absl::SimpleAtof(f.Get(name), out);
  } else {
    ok = absl::SimpleAtoi(f.Get(name), out);
  }
  if (!ok) *error = absl::StrCat("--", name, ": '", f.Get(name), "' is not a number");
  return ok;
}

int Generate(Frontend::Stub* stub, const Flags& f) {
  joule::v1::GenerateRequest request;
  if (!f.Has("prompt-ids")) return Usage("generate needs --prompt-ids");
  for (absl::string_view part : absl::StrSplit(f.Get("prompt-ids"), absl::ByAnyChar(", "), absl::SkipEmpty())) {
    int32_t id;
    if (!absl::SimpleAtoi(part, &id)) return Usage(absl::StrCat("--prompt-ids: '", part, "' is not an integer"));
    request.add_prompt_token_ids(id);
  }
  std::string error;
  int max_tokens = 16, top_k = 0, timeout_s = 600;
  float temperature = 0, top_p = 1;
  uint64_t seed = 0;
  if (!ParseNumber(f, "max-tokens", &max_tokens, &error) || !ParseNumber(f, "top-k", &top_k, &error) ||
      !ParseNumber(f, "timeout-s", &timeout_s, &error) ||
      !ParseNumber(f, "temperature", &temperature, &error) || !ParseNumber(f, "top-p", &top_p, &error) ||
      !ParseNumber(f, "seed", &seed, &error)) {
    return Usage(error);
  }
  joule::v1::SamplingParams* s = request.mutable_sampling();
  s->set_max_tokens(max_tokens);
  s->set_temperature(temperature);
  s->set_top_p(top_p);
  s->set_top_k(top_k);
  if (f.Has("seed")) s->set_seed(seed);
  request.set_service_tier(f.Get("tier"));
  request.set_request_id(f.Get("request-id"));

  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(timeout_s));
  auto reader = stub->Generate(&context, request);
  joule::v1::GenerateResponse response;
  joule::v1::GenerateResponse last;
  int tokens = 0;
  while (reader->Read(&response)) {
    for (int32_t id : response.token_ids()) {
      std::printf("%d\n", id);
      ++tokens;
    }
    std::fflush(stdout);
    if (response.finish_reason() != joule::v1::FINISH_REASON_UNSPECIFIED) last = response;
  }
  grpc::Status status = reader->Finish();
  if (!status.ok()) return RpcError(status);
  std::printf("finish_reason: %s\n", FinishName(last.finish_reason()));
  std::fflush(stdout);
  std::fprintf(stderr, "request %s served by rank %d: %d prompt tokens, %d completion tokens\n",
               last.request_id().c_str(), last.rank(), last.prompt_tokens(),
               last.completion_tokens() ? last.completion_tokens() : tokens);
  // Ended early by someone else: the tokens above are not a complete answer.
  if (last.finish_reason() == joule::v1::FINISH_REASON_CANCELLED) {
    std::fprintf(stderr, "error: CANCELLED: the request was cancelled before it finished\n");
    return 1;
  }
  return 0;
}

// An engine limit as status prints it: 0 is an older worker that did not say,
// not a limit of zero.
std::string Limit(int value) { return value > 0 ? std::to_string(value) : "-"; }

int Status(Frontend::Stub* stub) {
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  joule::v1::ClusterStatusReply reply;
  grpc::Status status = stub->ClusterStatus(&context, joule::v1::ClusterStatusRequest(), &reply);
  if (!status.ok()) return RpcError(status);
  std::printf("world_size: %d\nplacement_epoch: %llu\n", reply.world_size(),
              static_cast<unsigned long long>(reply.placement_epoch()));
  if (reply.group_epoch() > 0) {
    std::printf("group_epoch: %llu (%s)%s%s\n", static_cast<unsigned long long>(reply.group_epoch()),
                reply.serving() ? "serving" : "not serving",
                reply.group_reason().empty() ? "" : " after ", reply.group_reason().c_str());
  }
  for (const auto& r : reply.ranks()) {
    const std::string member =
        reply.group_epoch() > 0 && r.group_rank() >= 0 ? " group_rank=" + std::to_string(r.group_rank()) : "";
    std::printf("rank %d: %s endpoint=%s running=%d waiting=%d kv_usage=%.2f max_running=%s "
                "max_batch_tokens=%s%s%s%s\n",
                r.rank(), r.state().c_str(), r.worker_endpoint().empty() ? "-" : r.worker_endpoint().c_str(),
                r.running(), r.waiting(), r.kv_usage(), Limit(r.max_running()).c_str(), Limit(r.max_batch_tokens()).c_str(),
                member.c_str(), r.reason().empty() ? "" : " reason=", r.reason().c_str());
  }
  return 0;
}

int Rebalance(Frontend::Stub* stub, const Flags& f) {
  joule::v1::RebalanceRequest request;
  std::string error;
  int extra = 0;
  if (!ParseNumber(f, "redundant-experts", &extra, &error)) return Usage(error);
  if (f.Has("redundant-experts")) request.set_redundant_experts(extra);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  joule::v1::RebalanceReply reply;
  grpc::Status status = stub->Rebalance(&context, request, &reply);
  if (!status.ok()) return RpcError(status);
  std::printf("placement_epoch: %llu\n", static_cast<unsigned long long>(reply.placement_epoch()));
  return 0;
}

int Drain(Frontend::Stub* stub, const std::vector<std::string>& args) {
  int rank = 0;
  if (args.size() != 1 || !absl::SimpleAtoi(args[0], &rank)) {
    return Usage("drain needs one RANK (an integer)");
  }
  joule::v1::DrainRequest request;
  request.set_rank(rank);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  joule::v1::DrainReply reply;
  grpc::Status status = stub->Drain(&context, request, &reply);
  if (!status.ok()) return RpcError(status);
  std::printf("rank %d drained; group_epoch: %llu serves without it\n", rank,
              static_cast<unsigned long long>(reply.group_epoch()));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) return Usage("missing command");
  const std::string command = argv[1];
  if (command == "--help" || command == "-h" || command == "help") {
    std::fputs(kUsage, stdout);
    return 0;
  }
  Flags f;
  std::vector<std::string> positional;
  for (int i = 2; i < argc; ++i) {
    std::string a = argv[i];
    if (a.rfind("--", 0) != 0) {
      positional.push_back(a);
      continue;
    }
    a = a.substr(2);
    if (auto eq = a.find('='); eq != std::string::npos) {
      f.values[a.substr(0, eq)] = a.substr(eq + 1);
    } else if (i + 1 < argc) {
      f.values[a] = argv[++i];
    } else {
      return Usage(absl::StrCat("--", a, ": missing value"));
    }
  }
  if (!f.Has("coordinator")) return Usage("--coordinator HOST:PORT is required");
  if (command != "drain" && !positional.empty()) {
    return Usage(absl::StrCat("unexpected argument '", positional[0], "'"));
  }
  // Flags win over JOULE_TLS_* and JOULE_CLUSTER_TOKEN (common/grpc_security.h).
  absl::StatusOr<joule::GrpcSecurity> security = joule::LoadGrpcSecurity(
      {.tls_cert = f.Get("tls-cert"),
       .tls_key = f.Get("tls-key"),
       .tls_ca = f.Get("tls-ca"),
       .tls_server_name = f.Get("tls-server-name"),
       .cluster_token_file = f.Get("cluster-token-file")});
  if (!security.ok()) {
    std::fprintf(stderr, "joule-cli: %s\n", std::string(security.status().message()).c_str());
    return 2;
  }
  if (std::string warning = joule::GrpcSecurityWarning(*security); !warning.empty()) {
    std::fprintf(stderr, "joule-cli: %s\n", warning.c_str());
  }
  auto channel = joule::MakeChannel(f.Get("coordinator"), *security, joule::cluster::ClientChannelArgs());
  auto stub = Frontend::NewStub(channel);
  if (command == "generate") return Generate(stub.get(), f);
  if (command == "status") return Status(stub.get());
  if (command == "rebalance") return Rebalance(stub.get(), f);
  if (command == "drain") return Drain(stub.get(), positional);
  return Usage(absl::StrCat("unknown command '", command, "'"));
}
