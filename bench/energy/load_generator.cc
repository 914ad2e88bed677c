#include "bench/energy/load_generator.h"

#include <algorithm>
#include <chrono>
#include <memory>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"

namespace joule::bench {
namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;
using Clock = std::chrono::steady_clock;
using Json = nlohmann::json;
constexpr auto kTuple = asio::as_tuple(asio::use_awaitable);

std::chrono::nanoseconds Seconds(double s) {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::duration<double>(s));
}

std::string RequestBody(const LoadConfig& config, const PlannedRequest& p) {
  Json body = {{"model", config.model},
               {"max_tokens", p.max_tokens},
               {"stream", true},
               {"stream_options", {{"include_usage", true}}},
               {"service_tier", std::string(TierApiValue(p.tier))}};
  if (p.prompt_text.empty()) {
    body["prompt"] = p.prompt;
  } else {
    body["prompt"] = p.prompt_text;
  }
  if (config.ignore_eos) body["ignore_eos"] = true;
  return body.dump();
}

class Run {
 public:
  Run(const LoadConfig& config, const std::vector<PlannedRequest>& plan, RunResult* result)
      : config_(config), plan_(plan), result_(result) {}

  absl::Status Start() {
    boost::system::error_code ec;
    tcp::resolver resolver(ioc_);
    target_ = resolver.resolve(config_.target.host, config_.target.port, ec);
    if (ec) {
      return absl::UnavailableError(absl::StrCat("cannot resolve ", config_.target.host, ":",
                                                 config_.target.port, ": ", ec.message()));
    }
    for (const Url& u : config_.metrics) {
      auto r = resolver.resolve(u.host, u.port, ec);
      if (ec) return absl::UnavailableError(absl::StrCat("cannot resolve metrics host ", u.host, ": ", ec.message()));
      metrics_.push_back(r);
    }
    result_->requests.resize(plan_.size());
    for (size_t i = 0; i < plan_.size(); ++i) {
      RequestRecord& r = result_->requests[i];
      r.tier = plan_[i].tier;
      r.scheduled_s = plan_[i].at_s;
      r.prompt_tokens = plan_[i].prompt_tokens;
      r.max_tokens = plan_[i].max_tokens;
    }
    asio::co_spawn(ioc_, Main(), asio::detached);
    ioc_.run();
    // Whatever the drain left unfinished.
    for (RequestRecord& r : result_->requests) {
      if (r.done_s < 0 && r.error.empty()) r.error = "unfinished at the drain timeout";
    }
    return absl::OkStatus();
  }

 private:
  double Now() const { return std::chrono::duration<double>(Clock::now() - start_).count(); }

  asio::awaitable<void> SleepUntil(double t_s) {
    asio::steady_timer timer(co_await asio::this_coro::executor);
    timer.expires_at(start_ + Seconds(t_s));
    co_await timer.async_wait(kTuple);
  }

  asio::awaitable<void> Main() {
    start_ = Clock::now();
    const bool energy = !config_.metrics.empty();
    if (energy && config_.idle_s > 0) {
      // Idle power first, while nothing of ours runs; the load then starts at 0.
      result_->idle_start = co_await Scrape("idle start");
      co_await SleepUntil(config_.idle_s);
      result_->idle_end = co_await Scrape("idle end");
      const double offset = Now();
      start_ += Seconds(offset);
      for (auto* s : {&result_->idle_start, &result_->idle_end}) {
        if (*s) (*s)->t_s -= offset;
      }
    } else {
      start_ = Clock::now();
    }
    auto ex = co_await asio::this_coro::executor;
    asio::co_spawn(ex, Dispatch(), asio::detached);
    if (config_.progress_s > 0 && config_.on_progress) asio::co_spawn(ex, ReportProgress(), asio::detached);

    // The window is the nominal [warmup, duration], or the energy scrapes' times.
    co_await SleepUntil(config_.warmup_s);
    result_->window_start_s = config_.warmup_s;
    if (energy) result_->window_start = co_await Scrape("window start", /*with_counters=*/true);
    co_await SleepUntil(config_.duration_s);
    result_->window_end_s = config_.duration_s;
    if (energy) result_->window_end = co_await Scrape("window end", /*with_counters=*/true);
    if (result_->window_start) result_->window_start_s = result_->window_start->t_s;
    if (result_->window_end) result_->window_end_s = result_->window_end->t_s;

    const double give_up = config_.duration_s + config_.drain_timeout_s;
    while (inflight_ > 0 && Now() < give_up) co_await SleepUntil(std::min(give_up, Now() + 0.02));
    if (inflight_ > 0) {
      result_->warnings.push_back(absl::StrCat(inflight_, " request(s) still running at the drain timeout (",
                                               config_.drain_timeout_s, " s)"));
    }
    result_->load_end_s = Now();
    stopping_ = true;
    ioc_.stop();
  }

  asio::awaitable<void> Dispatch() {
    auto ex = co_await asio::this_coro::executor;
    for (size_t i = 0; i < plan_.size() && !stopping_; ++i) {
      co_await SleepUntil(plan_[i].at_s);
      ++sent_;
      if (inflight_ >= config_.max_inflight) {
        result_->requests[i].error = "dropped by the client: max_inflight reached";
        ++errors_;
        continue;
      }
      ++inflight_;
      asio::co_spawn(ex, DoRequest(i), asio::detached);
    }
  }

  asio::awaitable<void> DoRequest(size_t index) {
    RequestRecord& rec = result_->requests[index];
    co_await Exchange(plan_[index], &rec);
    if (!rec.ok()) ++errors_;
    ++done_;
    --inflight_;
  }

  // One request: connect, POST, read the SSE stream to [DONE].
  asio::awaitable<void> Exchange(const PlannedRequest& p, RequestRecord* rec) {
    beast::tcp_stream stream(co_await asio::this_coro::executor);
    stream.expires_after(Seconds(config_.request_timeout_s));
    auto fail = [&](std::string_view what, const boost::system::error_code& ec) {
      rec->error = absl::StrCat(std::string(what), ": ", ec.message());
    };
    if (auto [ec, ep] = co_await stream.async_connect(target_, kTuple); ec) co_return fail("connect", ec);
    boost::system::error_code ignored;
    stream.socket().set_option(tcp::no_delay(true), ignored);
    http::request<http::string_body> req{http::verb::post, config_.target.target, 11};
    req.set(http::field::host, config_.target.host);
    req.set(http::field::content_type, "application/json");
    req.set(http::field::accept, "text/event-stream");
    req.body() = RequestBody(config_, p);
    req.prepare_payload();
    if (auto [ec, n] = co_await http::async_write(stream, req, kTuple); ec) co_return fail("write", ec);
    rec->sent_s = Now();

    beast::flat_buffer buffer;
    http::response_parser<http::buffer_body> parser;
    parser.body_limit(boost::none);
    if (auto [ec, n] = co_await http::async_read_header(stream, buffer, parser, kTuple); ec) {
      co_return fail("reading the response header", ec);
    }
    rec->http_status = parser.get().result_int();
    const bool ok_status = rec->http_status == 200;
    std::string error_body;
    bool saw_done = false;
    SseParser sse([&](std::string_view data) { OnEvent(data, rec, &saw_done); });
    char chunk[16384];
    while (!parser.is_done()) {
      parser.get().body().data = chunk;
      parser.get().body().size = sizeof(chunk);
      // read_some: return with each piece of the body as it arrives (read would wait for the end).
      auto [ec, n] = co_await http::async_read_some(stream, buffer, parser, kTuple);
      if (ec == http::error::need_buffer) ec = {};
      const size_t got = sizeof(chunk) - parser.get().body().size;
      if (ok_status) {
        sse.Feed(std::string_view(chunk, got));
      } else if (error_body.size() < 2048) {
        error_body.append(chunk, std::min(got, 2048 - error_body.size()));
      }
      if (ec) {
        if (ok_status && saw_done) break;  // the server closed after [DONE]
        co_return fail("reading the stream", ec);
      }
    }
    if (!ok_status) {
      rec->error = absl::StrCat("HTTP ", rec->http_status, ": ", error_body);
      co_return;
    }
    if (!saw_done && rec->error.empty()) rec->error = "stream ended without data: [DONE]";
    if (rec->error.empty()) rec->done_s = Now();
    stream.socket().shutdown(tcp::socket::shutdown_both, ignored);
  }

  void OnEvent(std::string_view data, RequestRecord* rec, bool* saw_done) {
    if (data == "[DONE]") {
      *saw_done = true;
      return;
    }
    Json j = Json::parse(data.begin(), data.end(), nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded() || !j.is_object()) {
      if (rec->error.empty()) rec->error = absl::StrCat("bad SSE data: ", std::string(data.substr(0, 200)));
      return;
    }
    if (auto e = j.find("error"); e != j.end() && !e->is_null()) {
      if (rec->error.empty()) rec->error = absl::StrCat("error event: ", e->dump());
      return;
    }
    if (auto c = j.find("choices"); c != j.end() && c->is_array() && !c->empty() && (*c)[0].is_object()) {
      const Json& choice = (*c)[0];
      std::string_view text;
      if (auto t = choice.find("text"); t != choice.end() && t->is_string()) {
        text = t->get_ref<const std::string&>();
      } else if (auto d = choice.find("delta"); d != choice.end() && d->is_object()) {  // chat
        if (auto t2 = d->find("content"); t2 != d->end() && t2->is_string()) text = t2->get_ref<const std::string&>();
      }
      if (!text.empty()) {
        rec->chunk_s.push_back(Now());
        ++chunks_;
      }
    }
    if (auto u = j.find("usage"); u != j.end() && u->is_object()) {
      auto get_int = [&](const char* k, int64_t* out) {
        if (auto v = u->find(k); v != u->end() && v->is_number()) *out = v->get<int64_t>();
      };
      get_int("prompt_tokens", &rec->usage_prompt_tokens);
      get_int("completion_tokens", &rec->usage_completion_tokens);
      if (auto v = u->find("energy_joules"); v != u->end() && v->is_number()) rec->energy_joules = v->get<double>();
    }
  }

  // GET every metrics URL and sum the energy counter (and, `with_counters`, the
  // window counters). nullopt (and a warning) on failure.
  asio::awaitable<std::optional<EnergySample>> Scrape(std::string_view when, bool with_counters = false) {
    const double t0 = Now();
    EnergySample sample;
    std::set<std::string> missing;
    for (size_t i = 0; i < metrics_.size(); ++i) {
      const Url& url = config_.metrics[i];
      std::string where = absl::StrCat("http://", url.host, ":", url.port, url.target);
      beast::tcp_stream stream(co_await asio::this_coro::executor);
      stream.expires_after(std::chrono::seconds(10));
      auto warn = [&](std::string what) {
        result_->warnings.push_back(absl::StrCat("energy scrape (", std::string(when), ") of ", where, ": ", what));
      };
      if (auto [ec, ep] = co_await stream.async_connect(metrics_[i], kTuple); ec) {
        warn(ec.message());
        co_return std::nullopt;
      }
      http::request<http::empty_body> req{http::verb::get, url.target, 11};
      req.set(http::field::host, url.host);
      if (auto [ec, n] = co_await http::async_write(stream, req, kTuple); ec) {
        warn(ec.message());
        co_return std::nullopt;
      }
      beast::flat_buffer buffer;
      http::response<http::string_body> res;
      if (auto [ec, n] = co_await http::async_read(stream, buffer, res, kTuple); ec) {
        warn(ec.message());
        co_return std::nullopt;
      }
      if (res.result_int() != 200) {
        warn(absl::StrCat("HTTP ", res.result_int()));
        co_return std::nullopt;
      }
      absl::StatusOr<CounterSum> sum = SumCounter(res.body(), config_.energy_metric);
      if (!sum.ok()) {
        warn(std::string(sum.status().message()));
        co_return std::nullopt;
      }
      sample.joules += sum->value;
      sample.sources.insert(sum->sources.begin(), sum->sources.end());
      for (const std::string& name : config_.window_counters) {
        if (!with_counters) break;
        absl::StatusOr<CounterSum> counter = SumCounter(res.body(), name);
        if (counter.ok()) {
          sample.counters[name] += counter->value;
        } else if (missing.insert(name).second) {
          warn(std::string(counter.status().message()));
        }
      }
    }
    for (const std::string& name : missing) sample.counters.erase(name);
    sample.t_s = (t0 + Now()) / 2;
    co_return sample;
  }

  asio::awaitable<void> ReportProgress() {
    double last_t = 0;
    int64_t last_sent = 0, last_chunks = 0;
    for (double t = config_.progress_s; !stopping_; t += config_.progress_s) {
      co_await SleepUntil(t);
      if (stopping_) break;
      const double now = Now();
      Progress p{.t_s = now, .sent = sent_, .done = done_, .errors = errors_, .inflight = inflight_};
      p.rate = (sent_ - last_sent) / std::max(1e-9, now - last_t);
      p.tokens_per_s = (chunks_ - last_chunks) / std::max(1e-9, now - last_t);
      last_t = now;
      last_sent = sent_;
      last_chunks = chunks_;
      config_.on_progress(p);
    }
  }

  const LoadConfig& config_;
  const std::vector<PlannedRequest>& plan_;
  RunResult* result_;
  asio::io_context ioc_{1};
  tcp::resolver::results_type target_;
  std::vector<tcp::resolver::results_type> metrics_;
  Clock::time_point start_ = Clock::now();
  bool stopping_ = false;
  int64_t sent_ = 0, done_ = 0, errors_ = 0, inflight_ = 0, chunks_ = 0;
};

}  // namespace

absl::StatusOr<RunResult> RunLoad(const LoadConfig& config, const std::vector<PlannedRequest>& plan) {
  RunResult result;
  Run run(config, plan, &result);
  absl::Status s = run.Start();
  if (!s.ok()) return s;
  return result;
}

}  // namespace joule::bench
