// The wire formats joule-bench reads: server-sent events, URLs, and the
// Prometheus text exposition format (for the energy counter).
#pragma once

#include <functional>
#include <set>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"

namespace joule::bench {

// Splits a byte stream into SSE events and hands each event's data (the
// `data:` lines joined by '\n') to the callback. Bytes may arrive in any split.
class SseParser {
 public:
  explicit SseParser(std::function<void(std::string_view data)> on_event) : on_event_(std::move(on_event)) {}
  void Feed(std::string_view bytes);

 private:
  void Line(std::string_view line);
  std::function<void(std::string_view)> on_event_;
  std::string pending_;  // an incomplete line
  std::string data_;
  bool has_data_ = false;
};

struct Url {
  std::string host;
  std::string port;
  std::string target;  // path and query, "/" if none
};
// "http://host[:port][/path]"; InvalidArgument naming `field` otherwise (no https).
absl::StatusOr<Url> ParseUrl(std::string_view url, std::string_view field);

struct CounterSum {
  double value = 0;
  int series = 0;
  std::set<std::string> sources;  // values of the `source` label
};
// Sums every sample of `metric` (any labels). NotFound if there is none.
absl::StatusOr<CounterSum> SumCounter(std::string_view text, std::string_view metric);

}  // namespace joule::bench
