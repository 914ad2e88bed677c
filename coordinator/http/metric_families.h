// Building Prometheus metric families by hand, for collectables that read a
// component's state at scrape time (scheduler_metrics.h, cluster_metrics.h).
#pragma once

#include <cstdint>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "prometheus/metric_family.h"

namespace joule::http {

inline prometheus::MetricFamily NewFamily(const char* name, prometheus::MetricType type,
                                          const char* help) {
  return prometheus::MetricFamily{.name = name, .help = help, .type = type, .metric = {}};
}

// One sample of a counter or gauge family.
inline void AddSample(prometheus::MetricFamily* family,
                      std::vector<prometheus::ClientMetric::Label> labels, double value) {
  prometheus::ClientMetric m;
  m.label = std::move(labels);
  if (family->type == prometheus::MetricType::Counter) {
    m.counter.value = value;
  } else {
    m.gauge.value = value;
  }
  family->metric.push_back(std::move(m));
}

// One histogram of `values` over `bounds` (upper bounds, ascending; +Inf is added).
inline void AddHistogram(prometheus::MetricFamily* family, const std::vector<double>& bounds,
                         const std::vector<double>& values) {
  prometheus::ClientMetric m;
  m.histogram.sample_count = values.size();
  for (double v : values) m.histogram.sample_sum += v;
  std::vector<double> all = bounds;
  all.push_back(std::numeric_limits<double>::infinity());
  for (double bound : all) {
    uint64_t n = 0;
    for (double v : values) n += v <= bound ? 1 : 0;
    m.histogram.bucket.push_back({.cumulative_count = n, .upper_bound = bound});
  }
  family->metric.push_back(std::move(m));
}

}  // namespace joule::http
