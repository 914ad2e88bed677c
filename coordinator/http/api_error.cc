#include "coordinator/http/api_error.h"

#include "absl/types/optional.h"

#include "absl/strings/cord.h"
#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"

namespace joule::http {
namespace {

constexpr char kParamUrl[] = "joule.dev/http/param";
constexpr char kCodeUrl[] = "joule.dev/http/code";
constexpr char kStatusUrl[] = "joule.dev/http/status";

absl::string_view AbslView(std::string_view s) { return absl::string_view(s.data(), s.size()); }

absl::Status WithPayload(absl::Status status, const char* url, std::string_view value) {
  if (!status.ok()) status.SetPayload(url, absl::Cord(AbslView(value)));
  return status;
}

std::string Payload(const absl::Status& status, const char* url) {
  absl::optional<absl::Cord> p = status.GetPayload(url);
  return p ? std::string(*p) : std::string();
}

}  // namespace

std::string ServerErrorReason(const absl::Status& status) {
  const std::string_view msg(status.message().data(), status.message().size());
  switch (status.code()) {
    case absl::StatusCode::kCancelled:
      return "the request was cancelled before it finished";
    case absl::StatusCode::kDeadlineExceeded:
      return "the request did not finish before its deadline";
    case absl::StatusCode::kUnavailable:
      break;
    default:
      return "internal error; the server log has the details";
  }
  // The Router's reasons that say something to a client, by their fixed
  // phrases; whatever surrounds them (ranks' addresses, errors) is dropped.
  struct Known {
    std::string_view phrase;
    std::string_view reason;
  };
  constexpr Known kKnown[] = {
      {" died", "a worker serving the request died"},
      {"no rank is left in the expert-parallel group", "no rank is left in the expert-parallel group"},
      {"no rank of the expert-parallel group is ready", "no rank of the expert-parallel group is ready"},
      {"the expert-parallel group is re-forming", "the expert-parallel group is re-forming"},
      {"no worker is ready", "no worker is ready"},
      {"coordinator is shutting down", "the coordinator is shutting down"},
  };
  std::string reason;
  for (const Known& k : kKnown) {
    if (msg.find(k.phrase) != std::string_view::npos) absl::StrAppend(&reason, AbslView(k.reason), "; ");
  }
  if (reason.empty()) reason = "the cluster cannot serve the request now; ";
  return absl::StrCat(reason, "retry after a moment");
}

absl::Status InvalidField(std::string_view param, std::string_view detail) {
  return WithParam(absl::InvalidArgumentError(absl::StrCat(AbslView(param), ": ", AbslView(detail))),
                   param);
}

absl::Status WithParam(absl::Status status, std::string_view param) {
  return WithPayload(std::move(status), kParamUrl, param);
}

absl::Status WithErrorCode(absl::Status status, std::string_view code) {
  return WithPayload(std::move(status), kCodeUrl, code);
}

absl::Status WithHttpStatus(absl::Status status, int http_status) {
  return WithPayload(std::move(status), kStatusUrl, std::to_string(http_status));
}

ApiError ToApiError(const absl::Status& status) {
  ApiError e;
  e.message = std::string(status.message());
  e.param = Payload(status, kParamUrl);
  e.code = Payload(status, kCodeUrl);
  switch (status.code()) {
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kFailedPrecondition:
    case absl::StatusCode::kOutOfRange:
    case absl::StatusCode::kAlreadyExists:
      e.http_status = 400;
      break;
    case absl::StatusCode::kUnauthenticated:
      e.http_status = 401;
      break;
    case absl::StatusCode::kPermissionDenied:
      e.http_status = 403;
      break;
    case absl::StatusCode::kNotFound:
      e.http_status = 404;
      break;
    case absl::StatusCode::kResourceExhausted:
      e.http_status = 429;
      break;
    case absl::StatusCode::kUnavailable:
      e.http_status = 503;
      break;
    case absl::StatusCode::kDeadlineExceeded:
      e.http_status = 504;
      break;
    default:
      e.http_status = 500;
      break;
  }
  const std::string explicit_status = Payload(status, kStatusUrl);
  if (!explicit_status.empty()) e.http_status = std::stoi(explicit_status);
  if (e.http_status >= 500) e.message = ServerErrorReason(status);
  // OpenAI's types: what a client library branches on.
  if (status.code() == absl::StatusCode::kCancelled) {
    e.type = "cancelled";
  } else if (e.http_status == 429) {
    e.type = "rate_limit_error";
  } else if (e.http_status >= 500) {
    e.type = e.http_status == 503 ? "service_unavailable_error" : "server_error";
  } else {
    e.type = "invalid_request_error";
  }
  return e;
}

std::string ErrorJson(const ApiError& error) {
  nlohmann::json j = {{"error",
                       {{"message", error.message},
                        {"type", error.type},
                        {"param", error.param.empty() ? nlohmann::json() : nlohmann::json(error.param)},
                        {"code", error.code.empty() ? nlohmann::json() : nlohmann::json(error.code)}}}};
  return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

}  // namespace joule::http
