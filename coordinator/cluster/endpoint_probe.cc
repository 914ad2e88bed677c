#include "coordinator/cluster/endpoint_probe.h"

#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>

#include "absl/strings/numbers.h"
#include "absl/time/clock.h"

namespace joule::cluster {
namespace {

// Splits "HOST:PORT" or "[V6]:PORT"; false when it is neither.
bool SplitHostPort(const std::string& endpoint, std::string* host, std::string* port) {
  const size_t colon = endpoint.rfind(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 == endpoint.size()) return false;
  *host = endpoint.substr(0, colon);
  *port = endpoint.substr(colon + 1);
  if (host->front() == '[') {
    if (host->size() < 3 || host->back() != ']') return false;
    *host = host->substr(1, host->size() - 2);
  }
  int number = 0;
  return absl::SimpleAtoi(*port, &number) && number > 0 && number < 65536;
}

// The outcome of one non-blocking connect: refused, or anything else.
bool Refused(const addrinfo& a, absl::Time deadline) {
  const int fd = socket(a.ai_family, a.ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, a.ai_protocol);
  if (fd < 0) return false;
  int error = 0;
  if (connect(fd, a.ai_addr, a.ai_addrlen) != 0) error = errno;
  if (error == EINPROGRESS) {
    pollfd p{.fd = fd, .events = POLLOUT, .revents = 0};
    const int64_t ms = absl::ToInt64Milliseconds(deadline - absl::Now());
    error = ETIMEDOUT;
    if (ms > 0 && poll(&p, 1, static_cast<int>(ms)) == 1) {
      socklen_t len = sizeof(error);
      if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &len) != 0) error = errno;
    }
  }
  close(fd);
  return error == ECONNREFUSED;
}

}  // namespace

bool EndpointRefuses(const std::string& endpoint, absl::Duration timeout) {
  std::string host, port;
  if (!SplitHostPort(endpoint, &host, &port)) return false;
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICHOST | AI_NUMERICSERV;  // never a DNS query that could block
  addrinfo* found = nullptr;
  if (getaddrinfo(host.c_str(), port.c_str(), &hints, &found) != 0) return false;
  const absl::Time deadline = absl::Now() + timeout;
  bool refused = found != nullptr;
  for (const addrinfo* a = found; a != nullptr && refused; a = a->ai_next) {
    refused = Refused(*a, deadline);
  }
  freeaddrinfo(found);
  return refused;
}

}  // namespace joule::cluster
