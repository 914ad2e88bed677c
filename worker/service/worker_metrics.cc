#include "worker/service/worker_metrics.h"

#include <chrono>
#include <memory>
#include <string>
#include <string_view>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "boost/asio.hpp"
#include "boost/beast/core/flat_buffer.hpp"
#include "boost/beast/core/tcp_stream.hpp"
#include "boost/beast/http/empty_body.hpp"
#include "boost/beast/http/parser.hpp"
#include "boost/beast/http/read.hpp"
#include "common/http_framing.h"
#include "prometheus/text_serializer.h"

namespace joule::worker {
namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace bhttp = boost::beast::http;
using asio::ip::tcp;

prometheus::MetricFamily Family(const char* name, prometheus::MetricType type, const char* help,
                                double value, const std::string& rank,
                                const std::string& source = "") {
  prometheus::MetricFamily family{.name = name, .help = help, .type = type, .metric = {}};
  prometheus::ClientMetric m;
  m.label.push_back({"rank", rank});
  if (!source.empty()) m.label.push_back({"source", source});
  if (type == prometheus::MetricType::Counter) {
    m.counter.value = value;
  } else {
    m.gauge.value = value;
  }
  family.metric.push_back(std::move(m));
  return family;
}

// One scrape: read the request head, answer, close. Bad framing is answered
// too (common/http_framing.h: 431 for a head over 8 KiB, 400 for bytes that are
// not HTTP), and a client that sends too slowly is dropped after kReadTimeout.
class Connection : public std::enable_shared_from_this<Connection> {
 public:
  Connection(tcp::socket socket, const WorkerMetrics* metrics)
      : stream_(std::move(socket)), metrics_(metrics) {}

  void Start() {
    parser_.header_limit(kMaxHttpHeaderBytes);
    stream_.expires_after(kReadTimeout);
    bhttp::async_read_header(stream_, buffer_, parser_,
                             [self = shared_from_this()](boost::system::error_code ec, size_t) {
                               if (!ec) return self->Answer();
                               if (auto bad = RequestFramingError(ec, /*max_body_bytes=*/0)) {
                                 return self->Reply(bad->status, absl::StrCat(bad->message, "\n"));
                               }
                             });
  }

 private:
  // A request head larger than this is refused with 431, a slower one dropped.
  static constexpr std::chrono::seconds kReadTimeout{10};
  // After the answer, unread request bytes are drained for this long before the
  // close, so that the client reads the answer rather than a connection reset.
  static constexpr std::chrono::seconds kLingerTime{2};

  void Answer() {
    const bhttp::request<bhttp::empty_body>& request = parser_.get();
    const std::string_view target(request.target().data(), request.target().size());
    if (request.method() != bhttp::verb::get) return Reply(405, "only GET\n");
    if (target != "/metrics" && !target.starts_with("/metrics?")) {
      return Reply(404, "metrics are at /metrics\n");
    }
    Reply(200, prometheus::TextSerializer().Serialize(metrics_->Collect()));
  }

  void Reply(int status, std::string body) {
    const auto reason = bhttp::obsolete_reason(static_cast<bhttp::status>(status));
    reply_ = absl::StrCat("HTTP/1.0 ", status, " ", absl::string_view(reason.data(), reason.size()),
                          "\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8"
                          "\r\nContent-Length: ",
                          body.size(), "\r\nConnection: close\r\n\r\n", body);
    asio::async_write(stream_, asio::buffer(reply_),
                      [self = shared_from_this()](boost::system::error_code ec, size_t) {
                        if (ec) return;
                        boost::system::error_code ignored;
                        self->stream_.socket().shutdown(tcp::socket::shutdown_send, ignored);
                        self->stream_.expires_after(kLingerTime);
                        self->Drain();
                      });
  }

  void Drain() {
    stream_.async_read_some(asio::buffer(drain_), [self = shared_from_this()](boost::system::error_code ec, size_t) {
      if (!ec) self->Drain();
    });
  }

  beast::tcp_stream stream_;
  const WorkerMetrics* const metrics_;
  beast::flat_buffer buffer_;
  bhttp::request_parser<bhttp::empty_body> parser_;
  std::string reply_;
  char drain_[4096];
};

}  // namespace

std::vector<prometheus::MetricFamily> WorkerMetricFamilies(const WorkerStatus& s) {
  const std::string rank = absl::StrCat(s.rank);
  std::vector<prometheus::MetricFamily> out;
#define JOULE_METRIC_FAMILY(name, type, help, value) \
  out.push_back(Family(#name, prometheus::MetricType::type, help, static_cast<double>(value), rank));
  JOULE_WORKER_METRICS(JOULE_METRIC_FAMILY)
#undef JOULE_METRIC_FAMILY
  prometheus::MetricFamily experts{.name = "joule_expert_tokens_total",
                                   .help = "Tokens this rank routed to each expert (per-expert load).",
                                   .type = prometheus::MetricType::Counter,
                                   .metric = {}};
  for (size_t l = 0; l < s.expert_tokens_total.size(); ++l) {
    for (size_t e = 0; e < s.expert_tokens_total[l].size(); ++e) {
      prometheus::ClientMetric m;
      m.label = {{"rank", rank}, {"layer", absl::StrCat(l)}, {"expert", absl::StrCat(e)}};
      m.counter.value = static_cast<double>(s.expert_tokens_total[l][e]);
      experts.metric.push_back(std::move(m));
    }
  }
  if (!experts.metric.empty()) out.push_back(std::move(experts));
  if (s.energy_source.empty()) return out;
#define JOULE_ENERGY_FAMILY(name, type, help, value)                                             \
  out.push_back(Family(#name, prometheus::MetricType::type, help, static_cast<double>(value), rank, \
                       s.energy_source));
  JOULE_WORKER_ENERGY_METRICS(JOULE_ENERGY_FAMILY)
  if (s.power_instant_watts >= 0) {
    JOULE_WORKER_METER_POWER_METRICS(JOULE_ENERGY_FAMILY)
  }
  if (s.energy_meter_joules >= 0) {
    JOULE_WORKER_METER_READING_METRICS(JOULE_ENERGY_FAMILY)
  }
#undef JOULE_ENERGY_FAMILY
  return out;
}

struct WorkerMetricsServer::Impl {
  explicit Impl(WorkerHandler* handler)
      : metrics([handler] {
          WorkerStatus s = handler->Status();
          if (const std::optional<double> j = handler->ReadEnergyMeter()) s.energy_meter_joules = *j;
          return s;
        }),
        acceptor(io) {}

  void Accept() {
    acceptor.async_accept([this](boost::system::error_code ec, tcp::socket socket) {
      if (ec == asio::error::operation_aborted) return;
      if (!ec) std::make_shared<Connection>(std::move(socket), &metrics)->Start();
      Accept();
    });
  }

  WorkerMetrics metrics;
  asio::io_context io;
  tcp::acceptor acceptor;
  std::thread thread;
};

WorkerMetricsServer::WorkerMetricsServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

absl::StatusOr<std::unique_ptr<WorkerMetricsServer>> WorkerMetricsServer::Start(
    const std::string& host, int port, WorkerHandler* handler) {
  const std::string listen = absl::StrCat(host, ":", port);
  auto impl = std::make_unique<Impl>(handler);
  boost::system::error_code ec;
  const asio::ip::address address = asio::ip::make_address(host, ec);
  if (ec) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot serve metrics on ", listen, ": '", host, "' is not an IP address"));
  }
  const tcp::endpoint endpoint(address, static_cast<uint16_t>(port));
  impl->acceptor.open(endpoint.protocol(), ec);
  if (!ec) impl->acceptor.set_option(tcp::acceptor::reuse_address(true), ec);
  if (!ec) impl->acceptor.bind(endpoint, ec);
  if (!ec) impl->acceptor.listen(asio::socket_base::max_listen_connections, ec);
  if (ec) {
    return absl::UnavailableError(
        absl::StrCat("cannot serve metrics on ", listen, ": ", ec.message()));
  }
  std::unique_ptr<WorkerMetricsServer> server(new WorkerMetricsServer(std::move(impl)));
  server->port_ = server->impl_->acceptor.local_endpoint().port();
  server->impl_->Accept();
  server->impl_->thread = std::thread([io = &server->impl_->io] { io->run(); });
  return server;
}

WorkerMetricsServer::~WorkerMetricsServer() {
  impl_->io.stop();
  impl_->thread.join();
}

}  // namespace joule::worker
