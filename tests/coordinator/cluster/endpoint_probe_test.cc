// EndpointRefuses on real loopback sockets: a port nobody listens on refuses,
// a listening one does not, and what cannot be judged without a DNS query
// or parse is no conclusion.
#include "coordinator/cluster/endpoint_probe.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"

namespace joule::cluster {
namespace {

// A loopback socket bound to a free port, listening or not.
struct BoundSocket {
  int fd = -1;
  int port = 0;
  explicit BoundSocket(bool listening) {
    fd = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof(a);
    if (bind(fd, reinterpret_cast<sockaddr*>(&a), len) != 0 ||
        getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) != 0 ||
        (listening && listen(fd, 4) != 0)) {
      ADD_FAILURE() << "cannot bind a loopback socket";
    }
    port = ntohs(a.sin_port);
  }
  ~BoundSocket() { close(fd); }
};

TEST(EndpointRefuses, APortNobodyListensOnRefuses) {
  // Bound but not listening: the kernel answers a connect with a reset.
  BoundSocket closed(/*listening=*/false);
  EXPECT_TRUE(EndpointRefuses(absl::StrCat("127.0.0.1:", closed.port), absl::Seconds(1)));
}

TEST(EndpointRefuses, AListeningPortDoesNot) {
  BoundSocket open(/*listening=*/true);
  EXPECT_FALSE(EndpointRefuses(absl::StrCat("127.0.0.1:", open.port), absl::Seconds(1)));
}

TEST(EndpointRefuses, WhatCannotBeJudgedIsNoConclusion) {
  BoundSocket closed(/*listening=*/false);
  // A host name would need DNS; the rest do not parse.
  EXPECT_FALSE(EndpointRefuses(absl::StrCat("localhost:", closed.port), absl::Seconds(1)));
  for (const char* bad : {"", "127.0.0.1", "127.0.0.1:", ":80", "127.0.0.1:0", "127.0.0.1:70000",
                          "127.0.0.1:x", "[::1:80", "unix:/tmp/sock"}) {
    EXPECT_FALSE(EndpointRefuses(bad, absl::Seconds(1))) << bad;
  }
}

}  // namespace
}  // namespace joule::cluster
