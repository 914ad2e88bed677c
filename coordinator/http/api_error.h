// Errors of the OpenAI-compatible API. Business code returns absl::Status; the
// details OpenAI's error shape needs beyond code and message (the offending
// request field, a machine-readable code, an HTTP status absl has no code for)
// travel as status payloads, so every layer keeps using plain absl::Status.
//
//   {"error": {"message": "...", "type": "invalid_request_error",
//              "param": "temperature", "code": null}}
#pragma once

#include <string>
#include <string_view>

#include "absl/status/status.h"

namespace joule::http {

// InvalidArgument "PARAM: DETAIL" with `param` attached (HTTP 400).
absl::Status InvalidField(std::string_view param, std::string_view detail);

// Attach OpenAI's `param`, `code` or an explicit HTTP status to `status`.
absl::Status WithParam(absl::Status status, std::string_view param);
absl::Status WithErrorCode(absl::Status status, std::string_view code);
absl::Status WithHttpStatus(absl::Status status, int http_status);

// An error as the API reports it.
struct ApiError {
  int http_status = 500;
  std::string type;     // invalid_request_error, authentication_error, ...
  std::string message;
  std::string param;    // empty: null
  std::string code;     // empty: null
};

// InvalidArgument/FailedPrecondition/OutOfRange -> 400, Unauthenticated -> 401,
// NotFound -> 404, ResourceExhausted -> 429, Unavailable -> 503,
// DeadlineExceeded -> 504, everything else 500; an attached HTTP status wins.
// Cancelled (the request was ended before it finished) has type "cancelled".
// A 5xx's message is the reason only (ServerErrorReason): the status's own
// text names ranks' addresses, request ids and transport errors, which are
// for the log.
ApiError ToApiError(const absl::Status& status);

// What a client is told about a server-side failure: a fixed reason per kind,
// without addresses, hosts, ports, paths, ids or transport error text.
std::string ServerErrorReason(const absl::Status& status);

// {"error": {...}} as JSON text.
std::string ErrorJson(const ApiError& error);

}  // namespace joule::http
