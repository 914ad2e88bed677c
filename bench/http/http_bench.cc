// joule-http-bench: measures the coordinator's HTTP front door against a
// running cluster (bench/http/run.sh starts one).
//
//  (a) added latency: the same short non-streaming completion over HTTP
//      (POST /v1/completions, keep-alive connection) and over the gRPC
//      Frontend (joule-cli's path), interleaved in one run so both see the same
//      machine; p50/p99 of each and of the difference.
//  (b) concurrent SSE streams: opens N streaming completions at once from one
//      thread (Boost.Beast, async), counts streams that are open and receiving
//      tokens at the same time, and every error (connect, HTTP status, error
//      event, a stream that ends without [DONE]); then disconnects them all and
//      waits for the worker's /metrics to show every sequence and KV block freed.
//
// Writes one JSON object (--json FILE, else stdout).
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "boost/asio.hpp"
#include "boost/beast/core.hpp"
#include "boost/beast/http.hpp"
#include "nlohmann/json.hpp"
#include "common/options.h"
#include "common/grpc_security.h"
#include "proto/joule/v1/generate.grpc.pb.h"

namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;
using Clock = std::chrono::steady_clock;
using nlohmann::json;

#define JOULE_HTTP_BENCH_FLAGS(X)                                                                \
  X(std::string, http, "127.0.0.1:8000", "host:port of the HTTP front door")                    \
  X(std::string, grpc, "", "host:port of the gRPC Frontend (required for the latency phase)")   \
  X(std::string, model, "", "model id; empty: the first of GET /v1/models")                    \
  X(int, warmup, 30, "untimed requests per path before the latency phase")                     \
  X(int, latency_requests, 300, "timed requests per path; 0 skips the latency phase")          \
  X(int, latency_max_tokens, 1, "max_tokens of a latency request")                             \
  X(int, streams, 1000, "concurrent SSE streams to open")                                      \
  X(int, stream_max_tokens, 500, "max_tokens of each stream")                                  \
  X(double, open_timeout_s, 120, "for every stream to get its first token")                    \
  X(double, hold_s, 5, "streams stay open this long after that")                               \
  X(int, coordinator_pid, 0, "for CPU time and threads while streams are open")                \
  X(std::string, worker_metrics, "", "host:port of a worker's /metrics, to check cancellation freed KV") \
  X(std::string, json_out, "", "write the results here (default: stdout)")

struct BenchConfig {
  JOULE_HTTP_BENCH_FLAGS(JOULE_OPTION_FIELD)
  std::vector<joule::Option> Options() { return {JOULE_HTTP_BENCH_FLAGS(JOULE_OPTION_BIND)}; }
  absl::Status Validate() const {
    if (grpc.empty() && latency_requests > 0) {
      return absl::InvalidArgumentError("--grpc: required for the latency phase");
    }
    return absl::OkStatus();
  }
};

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

std::pair<std::string, std::string> HostPort(const std::string& hp) {
  const size_t colon = hp.rfind(':');
  if (colon == std::string::npos) return {hp, "80"};
  return {hp.substr(0, colon), hp.substr(colon + 1)};
}

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const double idx = p / 100.0 * (v.size() - 1);
  const size_t lo = static_cast<size_t>(idx);
  const size_t hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (v[hi] - v[lo]) * (idx - lo);
}

std::string PromptJson() { return "[1,2,3,4]"; }

// ---- (a) latency

// One keep-alive HTTP/1.1 connection, synchronous.
class HttpConnection {
 public:
  explicit HttpConnection(const std::string& hp) : socket_(io_), hp_(hp) { Connect(); }
  void Connect() {
    beast::error_code ignored;
    socket_.close(ignored);
    buffer_.clear();
    auto [host, port] = HostPort(hp_);
    host_ = host;
    tcp::resolver resolver(io_);
    asio::connect(socket_, resolver.resolve(host, port));
    socket_.set_option(tcp::no_delay(true));
  }
  // Status and body.
  std::pair<int, std::string> Request(http::verb verb, const std::string& target,
                                      const std::string& body) {
    http::request<http::string_body> req{verb, target, 11};
    req.set(http::field::host, host_);
    req.set(http::field::content_type, "application/json");
    req.keep_alive(true);
    req.body() = body;
    req.prepare_payload();
    http::write(socket_, req);
    http::response<http::string_body> res;
    http::read(socket_, buffer_, res);
    return {res.result_int(), res.body()};
  }

 private:
  asio::io_context io_;
  tcp::socket socket_;
  beast::flat_buffer buffer_;
  const std::string hp_;
  std::string host_;
};

struct LatencyResult {
  std::vector<double> http_ms, grpc_ms;
  int http_errors = 0, grpc_errors = 0;
  int http_reconnects = 0;  // the server closed a keep-alive connection
  std::string first_error;
};

LatencyResult MeasureLatency(const BenchConfig& o, const std::string& model) {
  LatencyResult r;
  HttpConnection conn(o.http);
  // The cluster's TLS and token from the environment (JOULE_TLS_*, JOULE_CLUSTER_TOKEN), as
  // joule-cli reads them; none set: plain text.
  absl::StatusOr<joule::GrpcSecurity> security = joule::LoadGrpcSecurity({});
  if (!security.ok()) {
    std::fprintf(stderr, "joule-http-bench: %s\n", std::string(security.status().message()).c_str());
    std::exit(2);
  }
  auto channel = joule::MakeChannel(o.grpc, *security, grpc::ChannelArguments());
  auto stub = joule::v1::Frontend::NewStub(channel);
  const std::string body = json{{"model", model},
                                {"prompt", json::parse(PromptJson())},
                                {"max_tokens", o.latency_max_tokens},
                                {"temperature", 0}}
                               .dump();
  joule::v1::GenerateRequest greq;
  for (int id : {1, 2, 3, 4}) greq.add_prompt_token_ids(id);
  greq.mutable_sampling()->set_max_tokens(o.latency_max_tokens);
  greq.mutable_sampling()->set_temperature(0);

  auto http_once = [&]() -> std::optional<double> {
    auto t0 = Clock::now();
    try {
      std::pair<int, std::string> answer;
      try {
        answer = conn.Request(http::verb::post, "/v1/completions", body);
      } catch (const boost::system::system_error& e) {
        // The server closed the keep-alive connection: a fresh one, timed from
        // the retry (the failed attempt is counted, not timed).
        if (e.code() != http::error::end_of_stream && e.code() != asio::error::connection_reset &&
            e.code() != asio::error::broken_pipe && e.code() != asio::error::eof) {
          throw;
        }
        ++r.http_reconnects;
        conn.Connect();
        t0 = Clock::now();
        answer = conn.Request(http::verb::post, "/v1/completions", body);
      }
      auto& [status, text] = answer;
      const double ms = Seconds(Clock::now() - t0) * 1e3;
      if (status != 200 || text.find("\"choices\"") == std::string::npos) {
        if (r.first_error.empty()) r.first_error = "HTTP " + std::to_string(status) + ": " + text;
        return std::nullopt;
      }
      return ms;
    } catch (const std::exception& e) {
      if (r.first_error.empty()) r.first_error = std::string("HTTP: ") + e.what();
      return std::nullopt;
    }
  };
  auto grpc_once = [&]() -> std::optional<double> {
    const auto t0 = Clock::now();
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    auto reader = stub->Generate(&ctx, greq);
    joule::v1::GenerateResponse msg;
    bool finished = false;
    while (reader->Read(&msg)) finished = finished || msg.finish_reason() != 0;
    const grpc::Status s = reader->Finish();
    const double ms = Seconds(Clock::now() - t0) * 1e3;
    if (!s.ok() || !finished) {
      if (r.first_error.empty()) r.first_error = "gRPC: " + s.error_message();
      return std::nullopt;
    }
    return ms;
  };

  for (int i = 0; i < o.warmup; ++i) {
    http_once();
    grpc_once();
  }
  r.first_error.clear();
  r.http_reconnects = 0;
  std::mt19937 rng(42);
  for (int i = 0; i < o.latency_requests; ++i) {
    // Interleaved, in a random order per pair, so drift hits both paths alike.
    const bool http_first = rng() % 2 == 0;
    for (int k = 0; k < 2; ++k) {
      if ((k == 0) == http_first) {
        if (auto ms = http_once()) r.http_ms.push_back(*ms); else ++r.http_errors;
      } else {
        if (auto ms = grpc_once()) r.grpc_ms.push_back(*ms); else ++r.grpc_errors;
      }
    }
  }
  return r;
}

// ---- (b) concurrent SSE streams

struct Stream : std::enable_shared_from_this<Stream> {
  explicit Stream(asio::io_context& io) : socket(io) {}
  tcp::socket socket;
  beast::flat_buffer buffer;
  http::request<http::string_body> request;
  http::response_parser<http::buffer_body> parser;
  char chunk[4096];
  std::string pending;  // an incomplete SSE line
  int64_t events = 0;   // data events with a completion chunk
  bool got_done = false;
  bool ended = false;   // the response ended (or failed)
  bool closed_by_us = false;
  std::string error;    // empty: no error
  double first_event_s = -1;
};

class StreamBench {
 public:
  StreamBench(const BenchConfig& o, const std::string& model) : o_(o) {
    auto [host, port] = HostPort(o.http);
    host_ = host;
    tcp::resolver resolver(io_);
    endpoint_ = *resolver.resolve(host, port).begin();
    body_ = json{{"model", model},
                 {"prompt", json::parse(PromptJson())},
                 {"max_tokens", o.stream_max_tokens},
                 {"temperature", 0},
                 {"ignore_eos", true},
                 {"stream", true}}
                .dump();
  }

  json Run() {
    start_ = Clock::now();
    for (int i = 0; i < o_.streams; ++i) {
      auto s = std::make_shared<Stream>(io_);
      streams_.push_back(s);
      Open(s);
    }
    // Until every stream has its first token or has failed.
    double all_streaming_s = -1;
    const auto open_deadline = start_ + std::chrono::duration_cast<Clock::duration>(
                                            std::chrono::duration<double>(o_.open_timeout_s));
    while (Clock::now() < open_deadline) {
      io_.run_for(std::chrono::milliseconds(50));
      Sample();
      int waiting = 0;
      for (auto& s : streams_) waiting += s->first_event_s < 0 && s->error.empty();
      if (waiting == 0) {
        all_streaming_s = Seconds(Clock::now() - start_);
        break;
      }
    }
    // Hold: streams stay open; count those still receiving tokens.
    std::vector<int64_t> events_before;
    for (auto& s : streams_) events_before.push_back(s->events);
    const double cpu0 = CoordinatorCpuSeconds();
    const auto hold_start = Clock::now();
    const auto hold_end = hold_start + std::chrono::duration_cast<Clock::duration>(
                                           std::chrono::duration<double>(o_.hold_s));
    while (Clock::now() < hold_end) {
      io_.run_for(std::chrono::milliseconds(50));
      Sample();
    }
    const double hold_wall = Seconds(Clock::now() - hold_start);
    const double cpu1 = CoordinatorCpuSeconds();
    const int threads = CoordinatorThreads();
    int receiving_during_hold = 0, finished = 0, errors = 0;
    int64_t hold_events = 0;
    std::map<std::string, int> error_kinds;
    for (size_t i = 0; i < streams_.size(); ++i) {
      auto& s = streams_[i];
      if (!s->error.empty()) {
        ++errors;
        ++error_kinds[s->error.substr(0, 80)];
        continue;
      }
      if (s->got_done) ++finished;
      hold_events += s->events - events_before[i];
      receiving_during_hold += s->events > events_before[i] && !s->ended;
    }
    // Disconnect every stream: the coordinator must cancel the worker calls.
    for (auto& s : streams_) {
      s->closed_by_us = true;
      beast::error_code ignored;
      s->socket.shutdown(tcp::socket::shutdown_both, ignored);
      s->socket.close(ignored);
    }
    io_.run_for(std::chrono::milliseconds(200));
    json out = {
        {"streams", o_.streams},
        {"max_tokens", o_.stream_max_tokens},
        {"all_streaming_after_s", all_streaming_s},
        {"peak_concurrent_streaming", peak_streaming_},
        {"receiving_tokens_during_hold", receiving_during_hold},
        {"hold_s", hold_wall},
        {"token_events_per_s_during_hold", hold_events / hold_wall},
        {"finished_before_disconnect", finished},
        {"errors", errors},
        {"error_kinds", error_kinds},
    };
    if (o_.coordinator_pid > 0) {
      out["coordinator_cpu_cores_during_hold"] = (cpu1 - cpu0) / hold_wall;
      out["coordinator_threads"] = threads;
      out["coordinator_rss_mb"] = CoordinatorRssMb();
    }
    return out;
  }

 private:
  void Open(const std::shared_ptr<Stream>& s) {
    s->socket.async_connect(endpoint_, [this, s](beast::error_code ec) {
      if (ec) return Fail(s, "connect: " + ec.message());
      s->socket.set_option(tcp::no_delay(true));
      s->request = {http::verb::post, "/v1/completions", 11};
      s->request.set(http::field::host, host_);
      s->request.set(http::field::content_type, "application/json");
      s->request.set(http::field::accept, "text/event-stream");
      s->request.body() = body_;
      s->request.prepare_payload();
      http::async_write(s->socket, s->request, [this, s](beast::error_code ec, size_t) {
        if (ec) return Fail(s, "write: " + ec.message());
        s->parser.body_limit(boost::none);
        http::async_read_header(s->socket, s->buffer, s->parser,
                                [this, s](beast::error_code ec, size_t) {
                                  if (ec) return Fail(s, "read header: " + ec.message());
                                  const int status = s->parser.get().result_int();
                                  if (status != 200) {
                                    return Fail(s, "HTTP status " + std::to_string(status));
                                  }
                                  ReadBody(s);
                                });
      });
    });
  }

  void ReadBody(const std::shared_ptr<Stream>& s) {
    s->parser.get().body().data = s->chunk;
    s->parser.get().body().size = sizeof(s->chunk);
    http::async_read_some(s->socket, s->buffer, s->parser, [this, s](beast::error_code ec, size_t) {
      if (ec == http::error::need_buffer) ec = {};
      if (ec && ec != http::error::end_of_stream) {
        if (s->closed_by_us) return;
        return Fail(s, "read body: " + ec.message());
      }
      const size_t n = sizeof(s->chunk) - s->parser.get().body().size;
      Consume(s, std::string(s->chunk, n));
      if (s->parser.is_done() || ec == http::error::end_of_stream) {
        s->ended = true;
        if (!s->got_done && s->error.empty()) Fail(s, "stream ended without data: [DONE]");
        return;
      }
      ReadBody(s);
    });
  }

  void Consume(const std::shared_ptr<Stream>& s, const std::string& data) {
    s->pending += data;
    size_t start = 0, nl;
    while ((nl = s->pending.find('\n', start)) != std::string::npos) {
      std::string line = s->pending.substr(start, nl - start);
      start = nl + 1;
      if (!line.empty() && line.back() == '\r') line.pop_back();
      if (line.rfind("data: ", 0) != 0) continue;
      const std::string payload = line.substr(6);
      if (payload == "[DONE]") {
        s->got_done = true;
      } else if (payload.find("\"error\"") != std::string::npos) {
        Fail(s, "error event: " + payload.substr(0, 200));
      } else {
        ++s->events;
        if (s->first_event_s < 0) s->first_event_s = Seconds(Clock::now() - start_);
      }
    }
    s->pending.erase(0, start);
  }

  void Fail(const std::shared_ptr<Stream>& s, const std::string& why) {
    s->ended = true;
    if (s->error.empty()) s->error = why;
  }

  void Sample() {
    int streaming = 0;
    for (auto& s : streams_) streaming += s->events > 0 && !s->ended && s->error.empty();
    peak_streaming_ = std::max(peak_streaming_, streaming);
  }

  double CoordinatorCpuSeconds() const {
    if (o_.coordinator_pid <= 0) return 0;
    std::ifstream in("/proc/" + std::to_string(o_.coordinator_pid) + "/stat");
    std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    const size_t paren = text.rfind(')');
    if (paren == std::string::npos) return 0;
    std::istringstream fields(text.substr(paren + 2));
    std::string f;
    double utime = 0, stime = 0;
    for (int i = 3; fields >> f; ++i) {  // field 3 is the state
      if (i == 14) utime = std::stod(f);
      if (i == 15) {
        stime = std::stod(f);
        break;
      }
    }
    return (utime + stime) / sysconf(_SC_CLK_TCK);
  }
  std::string StatusField(const std::string& name) const {
    std::ifstream in("/proc/" + std::to_string(o_.coordinator_pid) + "/status");
    std::string line;
    while (std::getline(in, line)) {
      if (line.rfind(name + ":", 0) == 0) return line.substr(name.size() + 1);
    }
    return "";
  }
  int CoordinatorThreads() const { return o_.coordinator_pid > 0 ? std::atoi(StatusField("Threads").c_str()) : 0; }
  double CoordinatorRssMb() const { return std::atof(StatusField("VmRSS").c_str()) / 1024.0; }

  const BenchConfig o_;
  asio::io_context io_;
  tcp::endpoint endpoint_;
  std::string host_, body_;
  Clock::time_point start_;
  std::vector<std::shared_ptr<Stream>> streams_;
  int peak_streaming_ = 0;
};

// Polls the worker's /metrics until no sequence runs or waits and every KV
// block is free; seconds it took, or -1.
double WaitWorkerIdle(const std::string& hp, double timeout_s, json* last) {
  const auto t0 = Clock::now();
  while (Seconds(Clock::now() - t0) < timeout_s) {
    try {
      HttpConnection conn(hp);
      auto [status, text] = conn.Request(http::verb::get, "/metrics", "");
      std::map<std::string, double> v;
      std::istringstream in(text);
      std::string line;
      while (std::getline(in, line)) {
        if (line.empty() || line[0] == '#') continue;
        const size_t brace = line.find('{'), space = line.rfind(' ');
        if (brace == std::string::npos || space == std::string::npos) continue;
        v[line.substr(0, brace)] = std::atof(line.c_str() + space + 1);
      }
      *last = v;
      if (v.count("joule_kv_cache_total_blocks") && v["joule_num_requests_running"] == 0 &&
          v["joule_num_requests_waiting"] == 0 &&
          v["joule_kv_cache_free_blocks"] == v["joule_kv_cache_total_blocks"]) {
        return Seconds(Clock::now() - t0);
      }
    } catch (const std::exception&) {
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return -1;
}

}  // namespace

int main(int argc, char** argv) {
  auto parsed = joule::ParseConfig<BenchConfig>(
      "usage: joule-http-bench --http HOST:PORT --grpc HOST:PORT [flags]", "JOULE_HTTP_BENCH_", argc,
      argv);
  if (!parsed.ok()) return joule::ReportOptionsError("joule-http-bench", parsed.status());
  const BenchConfig& o = *parsed;
  // One socket per stream: raise the descriptor limit as far as allowed.
  rlimit lim{};
  if (getrlimit(RLIMIT_NOFILE, &lim) == 0 && lim.rlim_cur < lim.rlim_max) {
    lim.rlim_cur = lim.rlim_max;
    setrlimit(RLIMIT_NOFILE, &lim);
  }

  json out;
  try {
    std::string model = o.model;
    if (model.empty()) {
      HttpConnection conn(o.http);
      auto [status, text] = conn.Request(http::verb::get, "/v1/models", "");
      if (status != 200) {
        std::fprintf(stderr, "GET /v1/models: HTTP %d: %s\n", status, text.c_str());
        return 1;
      }
      model = json::parse(text).at("data").at(0).at("id").get<std::string>();
    }
    out["model"] = model;
    if (o.latency_requests > 0) {
      LatencyResult r = MeasureLatency(o, model);
      const double hp50 = Percentile(r.http_ms, 50), gp50 = Percentile(r.grpc_ms, 50);
      const double hp99 = Percentile(r.http_ms, 99), gp99 = Percentile(r.grpc_ms, 99);
      out["latency"] = {
          {"requests_per_path", o.latency_requests},
          {"max_tokens", o.latency_max_tokens},
          {"http_ms", {{"p50", hp50}, {"p99", hp99}}},
          {"grpc_ms", {{"p50", gp50}, {"p99", gp99}}},
          {"added_ms", {{"p50", hp50 - gp50}, {"p99", hp99 - gp99}}},
          {"http_errors", r.http_errors},
          {"http_reconnects", r.http_reconnects},
          {"grpc_errors", r.grpc_errors},
          {"first_error", r.first_error},
      };
      std::fprintf(stderr, "latency: HTTP p50 %.3f ms p99 %.3f ms; gRPC p50 %.3f ms p99 %.3f ms\n",
                   hp50, hp99, gp50, gp99);
    }
    if (o.streams > 0) {
      StreamBench bench(o, model);
      out["sse"] = bench.Run();
      std::fprintf(stderr, "sse: %s\n", out["sse"].dump().c_str());
      if (!o.worker_metrics.empty()) {
        json last;
        out["sse"]["worker_idle_after_disconnect_s"] = WaitWorkerIdle(o.worker_metrics, 30, &last);
        out["sse"]["worker_metrics_after"] = last;
      }
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "joule-http-bench: %s\n", e.what());
    return 1;
  }
  if (o.json_out.empty()) {
    std::cout << out.dump(2) << "\n";
  } else {
    std::ofstream(o.json_out) << out.dump(2) << "\n";
  }
  return 0;
}
