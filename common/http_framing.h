// How Joule's HTTP servers answer a request whose bytes Beast's parser
// refused, so that the coordinator's front door (coordinator/http/http_server.cc)
// and a worker's /metrics (worker/service/worker_metrics.cc) give a client the
// same status for the same bad framing instead of dropping the connection.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include <boost/system/error_code.hpp>

namespace joule {

// A request head (request line and header fields) larger than this gets 431.
inline constexpr uint32_t kMaxHttpHeaderBytes = 8 * 1024;

struct HttpFramingError {
  int status = 0;       // 400, 413 or 431
  std::string message;  // for the client: what was wrong and the limit
};

// The answer to an error from reading a request with a Beast request_parser
// whose header limit is kMaxHttpHeaderBytes and body limit `max_body_bytes`:
// 413 for a body over the limit, 431 for a head over it, 400 for bytes that
// are not HTTP. nullopt when the error is the connection's (closed, reset,
// timed out, ended in the middle of a message): there is no one to answer.
std::optional<HttpFramingError> RequestFramingError(const boost::system::error_code& ec,
                                                    int64_t max_body_bytes);

}  // namespace joule
