#include "bench/energy/protocol.h"

#include <cmath>
#include <cstdlib>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace joule::bench {

void SseParser::Feed(std::string_view bytes) {
  pending_.append(bytes);
  size_t start = 0;
  while (true) {
    const size_t nl = pending_.find('\n', start);
    if (nl == std::string::npos) break;
    std::string_view line(pending_.data() + start, nl - start);
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    Line(line);
    start = nl + 1;
  }
  pending_.erase(0, start);
}

void SseParser::Line(std::string_view line) {
  if (line.empty()) {  // blank line: dispatch
    if (has_data_) on_event_(data_);
    data_.clear();
    has_data_ = false;
    return;
  }
  if (line.front() == ':') return;  // comment / keep-alive
  if (line.substr(0, 5) != "data:") return;  // event:, id:, retry: are not used here
  std::string_view value = line.substr(5);
  if (!value.empty() && value.front() == ' ') value.remove_prefix(1);
  if (has_data_) data_.push_back('\n');
  data_.append(value);
  has_data_ = true;
}

absl::StatusOr<Url> ParseUrl(std::string_view url, std::string_view field) {
  auto bad = [&](std::string_view why) {
    return absl::InvalidArgumentError(absl::StrCat(std::string(field), ": '", std::string(url), "': ",
                                                   std::string(why)));
  };
  constexpr std::string_view kScheme = "http://";
  if (url.substr(0, kScheme.size()) != kScheme) return bad("must start with http://");
  std::string_view rest = url.substr(kScheme.size());
  const size_t slash = rest.find('/');
  std::string_view authority = rest.substr(0, slash);
  Url out;
  out.target = slash == std::string_view::npos ? "/" : std::string(rest.substr(slash));
  const size_t colon = authority.rfind(':');
  if (colon == std::string_view::npos) {
    out.host = std::string(authority);
    out.port = "80";
  } else {
    out.host = std::string(authority.substr(0, colon));
    out.port = std::string(authority.substr(colon + 1));
    int port = 0;
    if (!absl::SimpleAtoi(out.port, &port) || port <= 0 || port > 65535) return bad("bad port");
  }
  if (out.host.empty()) return bad("no host");
  return out;
}

absl::StatusOr<CounterSum> SumCounter(std::string_view text, std::string_view metric) {
  CounterSum sum;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t nl = text.find('\n', pos);
    if (nl == std::string_view::npos) nl = text.size();
    std::string_view line = text.substr(pos, nl - pos);
    pos = nl + 1;
    if (line.empty() || line.front() == '#') continue;
    if (line.substr(0, metric.size()) != metric) continue;
    std::string_view after = line.substr(metric.size());
    std::string_view labels;
    if (!after.empty() && after.front() == '{') {
      const size_t close = after.find('}');
      if (close == std::string_view::npos) continue;
      labels = after.substr(1, close - 1);
      after = after.substr(close + 1);
    } else if (after.empty() || after.front() != ' ') {
      continue;  // a longer name with the same prefix
    }
    while (!after.empty() && after.front() == ' ') after.remove_prefix(1);
    std::string_view value = after.substr(0, after.find(' '));
    double v = 0;
    if (!absl::SimpleAtod(absl::string_view(value.data(), value.size()), &v) || !std::isfinite(v)) {
      return absl::DataLossError(absl::StrCat("bad sample value in line '", std::string(line), "'"));
    }
    sum.value += v;
    ++sum.series;
    constexpr std::string_view kSource = "source=\"";
    if (size_t s = labels.find(kSource); s != std::string_view::npos) {
      std::string_view rest = labels.substr(s + kSource.size());
      sum.sources.insert(std::string(rest.substr(0, rest.find('"'))));
    }
  }
  if (sum.series == 0) {
    return absl::NotFoundError(absl::StrCat("no samples of ", std::string(metric)));
  }
  return sum;
}

}  // namespace joule::bench
