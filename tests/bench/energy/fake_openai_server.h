// A small OpenAI-style completions server for joule-bench's tests: streams
// `max_tokens` SSE chunks with known delays, rejects chosen tiers with an HTTP
// status, and serves /metrics with an energy counter that grows with a known
// idle power and a known energy per token. Binds port 0, runs on one thread.
#pragma once

#include <atomic>
#include <chrono>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "nlohmann/json.hpp"

namespace joule::bench::testing {

struct FakeServerOptions {
  std::chrono::milliseconds ttft{50};   // request read -> first chunk
  std::chrono::milliseconds itl{10};    // between chunks
  std::map<std::string, int> reject;    // service_tier -> HTTP status
  double idle_watts = 100;              // the counter's slope with no tokens
  double joules_per_token = 0.5;        // and its step per token sent
  bool report_energy = true;            // usage.energy_joules
};

class FakeOpenAiServer {
 public:
  explicit FakeOpenAiServer(FakeServerOptions options)
      : options_(std::move(options)), acceptor_(ioc_, {boost::asio::ip::make_address("127.0.0.1"), 0}) {
    start_ = std::chrono::steady_clock::now();
    boost::asio::co_spawn(ioc_, Accept(), boost::asio::detached);
    thread_ = std::thread([this] { ioc_.run(); });
  }
  ~FakeOpenAiServer() {
    ioc_.stop();
    thread_.join();
  }
  int port() const { return acceptor_.local_endpoint().port(); }
  std::string url() const { return absl::StrCat("http://127.0.0.1:", port()); }

  int completions() const { return completions_.load(); }
  std::vector<std::string> tiers_seen() {
    std::lock_guard<std::mutex> lock(mu_);
    return tiers_seen_;
  }
  // Token-id prompts, in the order the requests were read.
  std::vector<std::vector<int32_t>> prompts_seen() {
    std::lock_guard<std::mutex> lock(mu_);
    return prompts_seen_;
  }
  // What the server actually did for each streamed request (its timers run late on a busy
  // machine): request read -> first chunk written, and the mean time between its chunks.
  std::vector<double> served_ttft_ms() {
    std::lock_guard<std::mutex> lock(mu_);
    return served_ttft_ms_;
  }
  std::vector<double> served_tpot_ms() {
    std::lock_guard<std::mutex> lock(mu_);
    return served_tpot_ms_;
  }
  double EnergyNow() const {
    const double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
    return options_.idle_watts * t + options_.joules_per_token * tokens_sent_.load();
  }

 private:
  using tcp = boost::asio::ip::tcp;
  static constexpr auto kTuple = boost::asio::as_tuple(boost::asio::use_awaitable);

  boost::asio::awaitable<void> Accept() {
    while (true) {
      auto [ec, socket] = co_await acceptor_.async_accept(kTuple);
      if (ec) co_return;
      boost::system::error_code ignored;
      socket.set_option(tcp::no_delay(true), ignored);  // one SSE chunk per segment, now
      boost::asio::co_spawn(ioc_, Serve(std::move(socket)), boost::asio::detached);
    }
  }

  boost::asio::awaitable<void> Write(tcp::socket& s, const std::string& bytes) {
    co_await boost::asio::async_write(s, boost::asio::buffer(bytes), kTuple);
  }
  static std::string Chunk(const std::string& data) {
    return absl::StrFormat("%x\r\n%s\r\n", data.size(), data);
  }

  boost::asio::awaitable<void> Serve(tcp::socket socket) {
    namespace http = boost::beast::http;
    boost::beast::flat_buffer buffer;
    http::request<http::string_body> req;
    auto [ec, n] = co_await http::async_read(socket, buffer, req, kTuple);
    if (ec) co_return;
    if (req.method() == http::verb::get && req.target() == "/metrics") {
      const std::string body = absl::StrFormat(
          "# TYPE joule_energy_joules_total counter\n"
          "joule_energy_joules_total{source=\"model\",rank=\"0\"} %.6f\n"
          "joule_energy_joules_total_created{source=\"model\"} 1e9\n"
          "# TYPE fake_prompt_tokens_total counter\n"
          "fake_prompt_tokens_total %d\n",
          EnergyNow(), prompt_tokens_read_.load());
      co_await Write(socket, absl::StrCat("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: ",
                                          body.size(), "\r\nConnection: close\r\n\r\n", body));
      co_return;
    }
    nlohmann::json j = nlohmann::json::parse(req.body(), nullptr, false);
    const std::string tier = j.value("service_tier", std::string("default"));
    const int max_tokens = j.value("max_tokens", 16);
    const int prompt_tokens = j.contains("prompt") && j["prompt"].is_array() ? static_cast<int>(j["prompt"].size()) : -1;
    {
      std::lock_guard<std::mutex> lock(mu_);
      tiers_seen_.push_back(tier);
      if (prompt_tokens >= 0) {
        prompts_seen_.push_back(j["prompt"].get<std::vector<int32_t>>());
        prompt_tokens_read_ += prompt_tokens;
      }
    }
    if (auto it = options_.reject.find(tier); it != options_.reject.end()) {
      const std::string body = R"({"error":{"message":"tier queue full","type":"rate_limit"}})";
      co_await Write(socket, absl::StrCat("HTTP/1.1 ", it->second, " Rejected\r\nContent-Type: application/json\r\n"
                                          "Content-Length: ", body.size(), "\r\nConnection: close\r\n\r\n", body));
      co_return;
    }
    co_await Write(socket,
                   "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
                   "Connection: close\r\n\r\n");
    boost::asio::steady_timer timer(ioc_);
    const auto read_at = std::chrono::steady_clock::now();
    std::chrono::steady_clock::time_point first_at, last_at;
    for (int i = 0; i < max_tokens; ++i) {
      timer.expires_after(i == 0 ? options_.ttft : options_.itl);
      co_await timer.async_wait(kTuple);
      ++tokens_sent_;
      nlohmann::json chunk = {{"object", "text_completion"},
                              {"choices", {{{"index", 0}, {"text", "x"}, {"finish_reason", nullptr}}}}};
      co_await Write(socket, Chunk("data: " + chunk.dump() + "\n\n"));
      last_at = std::chrono::steady_clock::now();
      if (i == 0) first_at = last_at;
    }
    if (max_tokens > 1) {
      using ms = std::chrono::duration<double, std::milli>;
      std::lock_guard<std::mutex> lock(mu_);
      served_ttft_ms_.push_back(ms(first_at - read_at).count());
      served_tpot_ms_.push_back(ms(last_at - first_at).count() / (max_tokens - 1));
    }
    nlohmann::json usage = {{"prompt_tokens", prompt_tokens}, {"completion_tokens", max_tokens}};
    if (options_.report_energy) usage["energy_joules"] = options_.joules_per_token * max_tokens;
    nlohmann::json last = {{"object", "text_completion"}, {"choices", nlohmann::json::array()}, {"usage", usage}};
    co_await Write(socket, Chunk("data: " + last.dump() + "\n\n") + Chunk("data: [DONE]\n\n") + "0\r\n\r\n");
    ++completions_;
  }

  const FakeServerOptions options_;
  boost::asio::io_context ioc_{1};
  tcp::acceptor acceptor_;
  std::thread thread_;
  std::chrono::steady_clock::time_point start_;
  std::atomic<int> completions_{0};
  std::atomic<int64_t> tokens_sent_{0};
  std::atomic<int> prompt_tokens_read_{0};  // served as fake_prompt_tokens_total
  std::mutex mu_;
  std::vector<std::string> tiers_seen_;
  std::vector<std::vector<int32_t>> prompts_seen_;
  std::vector<double> served_ttft_ms_;
  std::vector<double> served_tpot_ms_;
};

}  // namespace joule::bench::testing
