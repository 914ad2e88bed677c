// "HOST:PORT" for listening addresses and start-up lines; IPv6 literals get
// brackets ("[::1]:50051").
#pragma once

#include <string>

#include "absl/strings/str_cat.h"

namespace joule {

inline std::string HostPort(const std::string& host, int port) {
  const bool v6 = host.find(':') != std::string::npos && host.front() != '[';
  return v6 ? absl::StrCat("[", host, "]:", port) : absl::StrCat(host, ":", port);
}

}  // namespace joule
