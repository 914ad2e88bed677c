// The worker's /metrics: every metric of the table is served over loopback
// with its rank label and the status's current value, and the runtime's
// counters count what it actually computed.
#include "worker/service/worker_metrics.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <map>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/listen_address.h"
#include "tests/worker/service/runtime_cluster.h"

namespace joule::worker {
namespace {

using ::testing::HasSubstr;
using testing_util::Collector;
using testing_util::Greedy;
using testing_util::Prompt;
using testing_util::RuntimeCluster;

// A handler that only reports a status the test sets.
class StatusOnlyHandler final : public WorkerHandler {
 public:
  absl::Status Submit(const std::string&, GenerationRequest, RequestCallbacks) override {
    return absl::UnimplementedError("status only");
  }
  bool Cancel(const std::string&) override { return false; }
  WorkerStatus Status() override {
    absl::MutexLock lock(&mu_);
    return status_;
  }
  void Set(WorkerStatus s) {
    absl::MutexLock lock(&mu_);
    status_ = std::move(s);
  }

 private:
  absl::Mutex mu_;
  WorkerStatus status_;
};

// Sends `request` to 127.0.0.1:port and returns the whole response (headers
// and body): empty when the server closed or reset the connection without one.
std::string HttpExchange(int port, const std::string& request) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return "";
  timeval timeout{.tv_sec = 10, .tv_usec = 0};  // a server that never answers fails the test, not hangs it
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  std::string out;
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) {
    // MSG_NOSIGNAL: a server that closes early is an assertion failure, not SIGPIPE.
    if (send(fd, request.data(), request.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(request.size())) {
      char buf[4096];
      ssize_t n;
      while ((n = read(fd, buf, sizeof(buf))) > 0) out.append(buf, n);
    }
  }
  close(fd);
  return out;
}

// GET http://127.0.0.1:port/path; the whole response (headers and body).
std::string HttpGet(int port, const std::string& path) {
  return HttpExchange(port, absl::StrCat("GET ", path, " HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n"));
}

// "name{labels} value" lines of a text exposition, by "name{labels}".
std::map<std::string, double> Samples(const std::string& text) {
  std::map<std::string, double> out;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#') continue;
    const size_t space = line.rfind(' ');
    if (space == std::string::npos || line.rfind("joule_", 0) != 0) continue;
    out[line.substr(0, space)] = std::stod(line.substr(space + 1));
  }
  return out;
}

TEST(WorkerMetricsTest, ServesTheTableOverLoopbackWithCurrentValues) {
  StatusOnlyHandler handler;
  WorkerStatus s;
  s.rank = 3;
  s.ready = true;
  s.kv_usage = 0.25;
  s.kv_free_blocks = 48;
  s.kv_total_blocks = 64;
  s.running = 5;
  s.waiting = 2;
  s.preemptions_total = 7;
  s.prompt_tokens_total = 1234;
  s.generation_tokens_total = 567;
  handler.Set(s);
  auto server = WorkerMetricsServer::Start("127.0.0.1", 0, &handler);
  ASSERT_TRUE(server.ok()) << server.status();
  ASSERT_GT((*server)->port(), 0);

  const std::string response = HttpGet((*server)->port(), "/metrics");
  EXPECT_THAT(response, HasSubstr("200 OK"));
  EXPECT_THAT(response, HasSubstr("# TYPE joule_num_preemptions_total counter"));
  EXPECT_THAT(response, HasSubstr("# TYPE joule_kv_cache_usage_perc gauge"));
  std::map<std::string, double> m = Samples(response);
  EXPECT_DOUBLE_EQ(m["joule_kv_cache_usage_perc{rank=\"3\"}"], 0.25);
  EXPECT_DOUBLE_EQ(m["joule_kv_cache_free_blocks{rank=\"3\"}"], 48);
  EXPECT_DOUBLE_EQ(m["joule_kv_cache_total_blocks{rank=\"3\"}"], 64);
  EXPECT_DOUBLE_EQ(m["joule_num_requests_running{rank=\"3\"}"], 5);
  EXPECT_DOUBLE_EQ(m["joule_num_requests_waiting{rank=\"3\"}"], 2);
  EXPECT_DOUBLE_EQ(m["joule_num_preemptions_total{rank=\"3\"}"], 7);
  EXPECT_DOUBLE_EQ(m["joule_prompt_tokens_total{rank=\"3\"}"], 1234);
  EXPECT_DOUBLE_EQ(m["joule_generation_tokens_total{rank=\"3\"}"], 567);
  EXPECT_DOUBLE_EQ(m["joule_worker_ready{rank=\"3\"}"], 1);
  // Every metric of the table.
  EXPECT_EQ(m.size(), WorkerMetricFamilies(s).size());

  // Values are read at scrape time.
  s.running = 0;
  s.generation_tokens_total = 600;
  handler.Set(s);
  m = Samples(HttpGet((*server)->port(), "/metrics"));
  EXPECT_DOUBLE_EQ(m["joule_num_requests_running{rank=\"3\"}"], 0);
  EXPECT_DOUBLE_EQ(m["joule_generation_tokens_total{rank=\"3\"}"], 600);

  EXPECT_THAT(HttpGet((*server)->port(), "/other"), HasSubstr("404 Not Found"));

  // With a meter: energy families labelled by its source, total = the buckets.
  s.energy_source = "rapl";
  s.energy_attributed_joules = 30;
  s.energy_idle_joules = 10;
  s.energy_unattributed_joules = 2.5;
  s.energy_joules = 42.5;
  handler.Set(s);
  m = Samples(HttpGet((*server)->port(), "/metrics"));
  EXPECT_DOUBLE_EQ(m["joule_energy_joules_total{rank=\"3\",source=\"rapl\"}"], 42.5);
  EXPECT_DOUBLE_EQ(m["joule_energy_idle_joules_total{rank=\"3\",source=\"rapl\"}"], 10);
  EXPECT_DOUBLE_EQ(m["joule_energy_attributed_joules_total{rank=\"3\",source=\"rapl\"}"], 30);
  EXPECT_DOUBLE_EQ(m["joule_energy_unattributed_joules_total{rank=\"3\",source=\"rapl\"}"], 2.5);
  EXPECT_EQ(m.size(), WorkerMetricFamilies(s).size());

  // Power by source, the exchange counters, and one series per expert of each MoE layer.
  s.power_watts = 312.5;
  s.dispatch_bytes_total = 4096;
  s.combine_seconds_total = 0.75;
  s.two_batch_layers_total = 96;
  s.expert_tokens_total = {{}, {3, 0, 5}};
  handler.Set(s);
  m = Samples(HttpGet((*server)->port(), "/metrics"));
  EXPECT_DOUBLE_EQ(m["joule_power_watts{rank=\"3\",source=\"rapl\"}"], 312.5);
  EXPECT_EQ(m.count("joule_power_instant_watts{rank=\"3\",source=\"rapl\"}"), 0u)
      << "a meter without an instant reading exports none";
  EXPECT_DOUBLE_EQ(m["joule_dispatch_bytes_total{rank=\"3\"}"], 4096);
  EXPECT_DOUBLE_EQ(m["joule_combine_seconds_total{rank=\"3\"}"], 0.75);
  EXPECT_DOUBLE_EQ(m["joule_two_batch_layers_total{rank=\"3\"}"], 96);
  EXPECT_DOUBLE_EQ(m["joule_expert_tokens_total{rank=\"3\",layer=\"1\",expert=\"0\"}"], 3);
  EXPECT_DOUBLE_EQ(m["joule_expert_tokens_total{rank=\"3\",layer=\"1\",expert=\"1\"}"], 0);
  EXPECT_DOUBLE_EQ(m["joule_expert_tokens_total{rank=\"3\",layer=\"1\",expert=\"2\"}"], 5);
  EXPECT_EQ(m.size(), WorkerMetricFamilies(s).size() - 1 + 3);

  // NVML's instant power, by rank and source, where the meter has it.
  s.energy_source = "nvml";
  s.power_instant_watts = 287.25;
  handler.Set(s);
  m = Samples(HttpGet((*server)->port(), "/metrics"));
  EXPECT_DOUBLE_EQ(m["joule_power_instant_watts{rank=\"3\",source=\"nvml\"}"], 287.25);
  EXPECT_DOUBLE_EQ(m["joule_power_watts{rank=\"3\",source=\"nvml\"}"], 312.5);
}

// Bad framing gets an answer, as from the coordinator's front door: a request
// head over 8 KiB (here 100 KB of header) is 431, bytes that are not HTTP 400,
// and the server goes on serving scrapes.
TEST(WorkerMetricsTest, OversizedHeaderGets431AndGarbageGets400) {
  StatusOnlyHandler handler;
  auto server = WorkerMetricsServer::Start("127.0.0.1", 0, &handler);
  ASSERT_TRUE(server.ok()) << server.status();
  const int port = (*server)->port();

  const std::string huge = absl::StrCat("GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: ",
                                        std::string(100 * 1024, 'a'), "\r\n\r\n");
  const std::string response = HttpExchange(port, huge);
  EXPECT_THAT(response, ::testing::StartsWith("HTTP/1.0 431 Request Header Fields Too Large\r\n"));
  EXPECT_THAT(response, HasSubstr("header fields exceed the server's limit of 8 KiB"));
  // The limit is 8 KiB, not some larger buffer: just over it is refused, just under served.
  auto with_padding = [](size_t n) {
    return absl::StrCat("GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: ", std::string(n, 'a'),
                        "\r\n\r\n");
  };
  EXPECT_THAT(HttpExchange(port, with_padding(8 * 1024 + 16)),
              ::testing::StartsWith("HTTP/1.0 431 Request Header Fields Too Large\r\n"));
  EXPECT_THAT(HttpExchange(port, with_padding(7 * 1024)), ::testing::StartsWith("HTTP/1.0 200 OK\r\n"));

  EXPECT_THAT(HttpExchange(port, "GET /metrics HTTP/1.1\r\nBad Header\r\n\r\n"),
              ::testing::StartsWith("HTTP/1.0 400 Bad Request\r\n"));
  EXPECT_THAT(HttpExchange(port, "POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
              ::testing::StartsWith("HTTP/1.0 405 Method Not Allowed\r\n"));
  EXPECT_THAT(HttpGet(port, "/metrics"), ::testing::StartsWith("HTTP/1.0 200 OK\r\n"));
}

// Bound to 127.0.0.1 (the --metrics-host default), the port is not reachable
// through this machine's other addresses.
TEST(WorkerMetricsTest, LoopbackBindIsNotReachableFromOtherInterfaces) {
  StatusOnlyHandler handler;
  auto server = WorkerMetricsServer::Start("127.0.0.1", 0, &handler);
  ASSERT_TRUE(server.ok()) << server.status();
  EXPECT_TRUE(joule::testing::ListensOnLoopbackOnly((*server)->port()));
  auto wide = WorkerMetricsServer::Start("0.0.0.0", 0, &handler);
  ASSERT_TRUE(wide.ok()) << wide.status();
  EXPECT_EQ(joule::testing::ListeningAddress((*wide)->port()), "0.0.0.0");  // the check can fail
}

TEST(WorkerMetricsTest, PortInUseIsAClearError) {
  StatusOnlyHandler handler;
  auto first = WorkerMetricsServer::Start("127.0.0.1", 0, &handler);
  ASSERT_TRUE(first.ok()) << first.status();
  auto second = WorkerMetricsServer::Start("127.0.0.1", (*first)->port(), &handler);
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(std::string(second.status().message()),
              HasSubstr(absl::StrCat("cannot serve metrics on 127.0.0.1:", (*first)->port())));
}

TEST(WorkerMetricsTest, RuntimeCountsPromptAndGenerationTokens) {
  RuntimeCluster cluster(testing::TinyModelDir("qwen3_moe-tiny"), 1, absl::Seconds(20));
  cluster.StartAll();
  WorkerRuntime& runtime = cluster.runtime(0);
  Collector a, b;
  ASSERT_TRUE(runtime.Submit("a", {.prompt = Prompt(11, 1), .sampling = Greedy(6)}, a.callbacks()).ok());
  ASSERT_TRUE(runtime.Submit("b", {.prompt = Prompt(5, 2), .sampling = Greedy(9)}, b.callbacks()).ok());
  ASSERT_TRUE(a.WaitDone());
  ASSERT_TRUE(b.WaitDone());
  // The step that delivered the last token has published its counts.
  std::map<std::string, double> m;
  for (const prometheus::MetricFamily& f : WorkerMetricFamilies(runtime.Status())) {
    m[f.name] = f.type == prometheus::MetricType::Counter ? f.metric[0].counter.value
                                                           : f.metric[0].gauge.value;
    EXPECT_EQ(f.metric[0].label[0].value, "0");
  }
  EXPECT_EQ(m["joule_prompt_tokens_total"], 11 + 5);
  EXPECT_EQ(m["joule_generation_tokens_total"], 6 + 9);
  EXPECT_EQ(m["joule_num_preemptions_total"], 0);
  EXPECT_EQ(m["joule_num_requests_running"], 0);
  EXPECT_GT(m["joule_kv_cache_total_blocks"], 0);
  EXPECT_EQ(m["joule_kv_cache_free_blocks"], m["joule_kv_cache_total_blocks"]);
  runtime.Stop("test over");
  runtime.Join();
}

}  // namespace
}  // namespace joule::worker
