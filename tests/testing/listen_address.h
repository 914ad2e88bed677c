// Where a local TCP port listens, for tests of bind addresses: the address
// from /proc/net/tcp (and tcp6), and whether a connection through another
// local interface gets in.
#pragma once

#include <arpa/inet.h>
#include <ifaddrs.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>

#include "gtest/gtest.h"

namespace joule::testing {

// The address a listening socket on `port` is bound to ("127.0.0.1",
// "0.0.0.0", "::" ...); nullopt when nothing listens there.
inline std::optional<std::string> ListeningAddress(int port) {
  for (const char* table : {"/proc/net/tcp", "/proc/net/tcp6"}) {
    std::ifstream in(table);
    std::string line;
    std::getline(in, line);  // the header
    while (std::getline(in, line)) {
      std::istringstream fields(line);
      std::string slot, local, remote, state;
      fields >> slot >> local >> remote >> state;
      const size_t colon = local.find(':');
      if (state != "0A" || colon == std::string::npos) continue;  // 0A: LISTEN
      if (std::stoi(local.substr(colon + 1), nullptr, 16) != port) continue;
      const std::string hex = local.substr(0, colon);
      char text[INET6_ADDRSTRLEN] = {};
      if (hex.size() == 8) {
        in_addr a{};
        a.s_addr = static_cast<uint32_t>(std::stoul(hex, nullptr, 16));  // host order of the kernel's bytes
        inet_ntop(AF_INET, &a, text, sizeof(text));
      } else {
        in6_addr a{};
        for (int w = 0; w < 4; ++w) {
          const uint32_t word = static_cast<uint32_t>(std::stoul(hex.substr(8 * w, 8), nullptr, 16));
          std::memcpy(&a.s6_addr[4 * w], &word, 4);
        }
        inet_ntop(AF_INET6, &a, text, sizeof(text));
      }
      return std::string(text);
    }
  }
  return std::nullopt;
}

// An IPv4 address of this machine that is not loopback, if it has one.
inline std::optional<std::string> NonLoopbackIPv4() {
  ifaddrs* list = nullptr;
  if (getifaddrs(&list) != 0) return std::nullopt;
  std::optional<std::string> found;
  for (ifaddrs* i = list; i != nullptr && !found; i = i->ifa_next) {
    if (i->ifa_addr == nullptr || i->ifa_addr->sa_family != AF_INET) continue;
    const in_addr a = reinterpret_cast<sockaddr_in*>(i->ifa_addr)->sin_addr;
    if ((ntohl(a.s_addr) >> 24) == 127) continue;
    char text[INET_ADDRSTRLEN] = {};
    inet_ntop(AF_INET, &a, text, sizeof(text));
    found = text;
  }
  freeifaddrs(list);
  return found;
}

// Whether a TCP connection to host:port is accepted.
inline bool CanConnect(const std::string& host, int port) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return false;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  inet_pton(AF_INET, host.c_str(), &addr.sin_addr);
  const bool ok = connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
  close(fd);
  return ok;
}

// Whether `port`, listening, is reachable from this host only: bound to a
// loopback address, and (where this machine has another address) refused there.
inline ::testing::AssertionResult ListensOnLoopbackOnly(int port) {
  const std::optional<std::string> bound = ListeningAddress(port);
  if (!bound) return ::testing::AssertionFailure() << "nothing listens on port " << port;
  const bool loopback = bound->rfind("127.", 0) == 0 || bound->rfind("::ffff:127.", 0) == 0 || *bound == "::1";
  if (!loopback) {
    return ::testing::AssertionFailure() << "port " << port << " listens on " << *bound;
  }
  if (std::optional<std::string> other = NonLoopbackIPv4(); other && CanConnect(*other, port)) {
    return ::testing::AssertionFailure() << "port " << port << " accepts connections on " << *other;
  }
  return ::testing::AssertionSuccess() << "port " << port << " listens on " << *bound;
}

}  // namespace joule::testing
