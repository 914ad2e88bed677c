#include "coordinator/http/http_server.h"

#include <algorithm>
#include <chrono>
#include <optional>
#include <utility>

#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/core/string.hpp>
#include <boost/beast/core/tcp_stream.hpp>
#include <boost/beast/http/chunk_encode.hpp>
#include <boost/beast/http/error.hpp>
#include <boost/beast/http/read.hpp>
#include <boost/beast/http/write.hpp>

#include "absl/strings/str_cat.h"
#include "common/http_framing.h"
#include "common/logging.h"

namespace joule::http {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace bhttp = boost::beast::http;
using tcp = net::ip::tcp;

namespace {

std::chrono::steady_clock::duration ToChrono(absl::Duration d) { return absl::ToChronoNanoseconds(d); }

// After the last response on a connection, the client may still be sending (a
// body we refused with 413): read and drop it for a while before closing, so
// the client gets our response rather than a connection reset.
constexpr absl::Duration kLingerTime = absl::Seconds(2);

}  // namespace

// One connection. Every member below is touched only on the connection's
// strand (the executor of stream_); the public entry points post onto it.
class Session : public std::enable_shared_from_this<Session> {
 public:
  Session(tcp::socket socket, HttpServer* server) : server_(server), stream_(std::move(socket)) {
    server_->open_connections_.fetch_add(1);
  }
  ~Session() { server_->open_connections_.fetch_sub(1); }

  void Run() {
    net::dispatch(stream_.get_executor(), [self = shared_from_this()] { self->DoRead(); });
  }
  // From any thread: the server is stopping.
  void Close() {
    net::post(stream_.get_executor(), [self = shared_from_this()] { self->ClientGone(); });
  }

  template <typename F>
  void OnStrand(F&& f) {
    net::post(stream_.get_executor(), std::forward<F>(f));
  }

  void DoRespond(uint64_t seq, HttpResponse response) {
    if (!Current(seq) || streaming_) return;
    answered_ = true;
    response.version(version_);
    response.keep_alive(keep_alive_);
    response.prepare_payload();
    response_ = std::make_shared<HttpResponse>(std::move(response));
    stream_.expires_after(ToChrono(server_->options_.write_timeout));
    bhttp::async_write(stream_, *response_,
                       [self = shared_from_this()](beast::error_code ec, size_t) {
                         self->response_.reset();
                         if (ec) return self->ClientGone();
                         self->FinishExchange();
                       });
  }

  void DoStartStream(uint64_t seq, HttpStreamHeader header) {
    if (!Current(seq) || streaming_) return;
    streaming_ = true;
    header.version(version_);
    header.keep_alive(keep_alive_);
    header.chunked(true);
    stream_header_ = std::make_unique<HttpStreamHeader>(std::move(header));
    header_serializer_ = std::make_unique<bhttp::response_serializer<bhttp::empty_body>>(*stream_header_);
    writing_ = true;
    stream_.expires_after(ToChrono(server_->options_.write_timeout));
    bhttp::async_write_header(stream_, *header_serializer_,
                              [self = shared_from_this()](beast::error_code ec, size_t) {
                                self->OnStreamWritten(ec);
                              });
  }

  void DoSend(uint64_t seq, std::string data) {
    if (!Current(seq) || !streaming_ || end_requested_) return;
    pending_ += data;
    Pump();
  }

  void DoEndStream(uint64_t seq) {
    if (!Current(seq) || !streaming_) return;
    end_requested_ = true;
    Pump();
  }

  void DoOnClientGone(uint64_t seq, std::function<void()> callback) {
    if (seq != seq_) return;  // that exchange is complete
    if (gone_) {
      callback();
      return;
    }
    if (in_exchange_ && !answered_) on_gone_ = std::move(callback);
  }

 private:
  bool Current(uint64_t seq) const { return seq == seq_ && in_exchange_ && !answered_ && !closed_; }

  void DoRead() {
    if (closed_) return;
    parser_.emplace();
    parser_->body_limit(static_cast<uint64_t>(server_->options_.max_body_bytes));
    parser_->header_limit(kMaxHttpHeaderBytes);
    stream_.expires_after(ToChrono(server_->options_.idle_timeout));
    bhttp::async_read_header(stream_, buffer_, *parser_,
                             [self = shared_from_this()](beast::error_code ec, size_t) { self->OnHeader(ec); });
  }

  // Clients that send "Expect: 100-continue" (curl does for larger bodies) wait
  // for our go-ahead before the body; a body over the limit was refused above.
  void OnHeader(beast::error_code ec) {
    if (ec || closed_) return OnRead(ec);
    if (beast::iequals(parser_->get()[bhttp::field::expect], "100-continue")) {
      static const std::string kContinue = "HTTP/1.1 100 Continue\r\n\r\n";
      net::async_write(stream_, net::buffer(kContinue), [self = shared_from_this()](beast::error_code ec, size_t) {
        if (ec) return self->OnRead(ec);
        self->ReadBody();
      });
      return;
    }
    ReadBody();
  }

  void ReadBody() {
    bhttp::async_read(stream_, buffer_, *parser_,
                      [self = shared_from_this()](beast::error_code ec, size_t) { self->OnRead(ec); });
  }

  void OnRead(beast::error_code ec) {
    if (closed_) return;
    if (std::optional<HttpFramingError> bad = RequestFramingError(ec, server_->options_.max_body_bytes)) {
      if (bad->status == 413) bad->message += " (--max-body-bytes)";
      return ServerError(bad->status, bad->message);
    }
    if (ec) return CloseNow();  // the client closed, went idle too long, or reset

    HttpRequest request = parser_->release();
    ++seq_;
    in_exchange_ = true;
    answered_ = false;
    keep_alive_ = request.keep_alive();
    version_ = request.version();
    stream_.expires_never();
    Watch();
    server_->handler_->Handle(std::move(request), std::make_shared<Exchange>(shared_from_this(), seq_));
  }

  // The server's own error response; the connection closes after it.
  void ServerError(int status, const std::string& message) {
    ++seq_;
    in_exchange_ = true;
    answered_ = false;
    keep_alive_ = false;
    version_ = 11;
    stream_.expires_never();
    DoRespond(seq_, server_->handler_->ErrorResponse(status, message));
  }

  // While an answer is pending, a readable socket with nothing to read means
  // the client closed the connection: tell the handler now, so it can cancel.
  void Watch() {
    stream_.socket().async_wait(tcp::socket::wait_read,
                                [self = shared_from_this(), seq = seq_](beast::error_code ec) {
                                  if (ec || self->closed_ || seq != self->seq_ || !self->in_exchange_) return;
                                  self->CheckPeer();
                                });
  }

  // Readiness can be stale (edge-triggered epoll may report the bytes of the
  // request we already read), so look before concluding: a peek that reads 0
  // bytes is the peer's FIN, would_block is nothing yet, bytes are a
  // pipelined request to read after this answer.
  void CheckPeer() {
    tcp::socket& socket = stream_.socket();
    beast::error_code ec;
    socket.non_blocking(true, ec);
    char byte;
    const size_t n = socket.receive(net::buffer(&byte, 1), tcp::socket::message_peek, ec);
    if (ec == net::error::would_block || ec == net::error::try_again) return Watch();
    if (ec || n == 0) ClientGone();
  }

  void Pump() {
    if (writing_ || closed_) return;
    if (!pending_.empty()) {
      writing_buf_.swap(pending_);
      pending_.clear();
      writing_ = true;
      stream_.expires_after(ToChrono(server_->options_.write_timeout));
      net::async_write(stream_, bhttp::make_chunk(net::buffer(writing_buf_)),
                       [self = shared_from_this()](beast::error_code ec, size_t) { self->OnStreamWritten(ec); });
      return;
    }
    if (end_requested_) {
      answered_ = true;
      writing_ = true;
      stream_.expires_after(ToChrono(server_->options_.write_timeout));
      net::async_write(stream_, bhttp::make_chunk_last(),
                       [self = shared_from_this()](beast::error_code ec, size_t) {
                         self->writing_ = false;
                         if (ec) return self->ClientGone();
                         self->FinishExchange();
                       });
    }
  }

  void OnStreamWritten(beast::error_code ec) {
    writing_ = false;
    if (closed_) return;
    if (ec) return ClientGone();
    // No timeout while waiting for the next token, however long it takes.
    stream_.expires_never();
    Pump();
  }

  // The answer is complete: next request, or close.
  void FinishExchange() {
    in_exchange_ = false;
    on_gone_ = nullptr;
    streaming_ = false;
    end_requested_ = false;
    stream_header_.reset();
    header_serializer_.reset();
    pending_.clear();
    writing_buf_.clear();
    if (closed_) return;
    beast::error_code ignored;
    stream_.socket().cancel(ignored);  // the Watch
    if (keep_alive_) return DoRead();
    stream_.socket().shutdown(tcp::socket::shutdown_send, ignored);
    stream_.expires_after(ToChrono(kLingerTime));
    Drain();
  }

  void Drain() {
    drain_buf_.resize(16384);
    stream_.async_read_some(net::buffer(drain_buf_), [self = shared_from_this()](beast::error_code ec, size_t) {
      if (ec) return self->CloseNow();
      self->Drain();
    });
  }

  void ClientGone() {
    if (gone_) return;
    gone_ = true;
    std::function<void()> callback = std::move(on_gone_);
    on_gone_ = nullptr;
    CloseNow();
    if (callback) callback();
  }

  void CloseNow() {
    if (closed_) return;
    closed_ = true;
    beast::error_code ignored;
    stream_.socket().shutdown(tcp::socket::shutdown_both, ignored);
    stream_.close();
  }

  HttpServer* const server_;
  beast::tcp_stream stream_;
  beast::flat_buffer buffer_;
  std::optional<bhttp::request_parser<bhttp::string_body>> parser_;

  uint64_t seq_ = 0;          // the current request's number on this connection
  bool in_exchange_ = false;  // a request is being answered
  bool answered_ = false;     // its answer is complete or being written out
  bool keep_alive_ = true;
  unsigned version_ = 11;
  bool gone_ = false;
  bool closed_ = false;
  std::function<void()> on_gone_;

  std::shared_ptr<HttpResponse> response_;
  bool streaming_ = false;
  bool writing_ = false;
  bool end_requested_ = false;
  std::unique_ptr<HttpStreamHeader> stream_header_;
  std::unique_ptr<bhttp::response_serializer<bhttp::empty_body>> header_serializer_;
  std::string pending_;      // stream data queued while a write is in flight
  std::string writing_buf_;  // the chunk being written
  std::vector<char> drain_buf_;
};

void Exchange::Respond(HttpResponse response) {
  session_->OnStrand([s = session_, seq = seq_, r = std::move(response)]() mutable {
    s->DoRespond(seq, std::move(r));
  });
}

void Exchange::StartStream(HttpStreamHeader header) {
  session_->OnStrand([s = session_, seq = seq_, h = std::move(header)]() mutable {
    s->DoStartStream(seq, std::move(h));
  });
}

void Exchange::Send(std::string data) {
  session_->OnStrand([s = session_, seq = seq_, d = std::move(data)]() mutable { s->DoSend(seq, std::move(d)); });
}

void Exchange::EndStream() {
  session_->OnStrand([s = session_, seq = seq_] { s->DoEndStream(seq); });
}

void Exchange::OnClientGone(std::function<void()> callback) {
  session_->OnStrand([s = session_, seq = seq_, cb = std::move(callback)]() mutable {
    s->DoOnClientGone(seq, std::move(cb));
  });
}

HttpServer::HttpServer(const HttpServerOptions& options, HttpHandler* handler)
    : options_(options), handler_(handler), acceptor_(net::make_strand(ioc_)) {}

absl::StatusOr<std::unique_ptr<HttpServer>> HttpServer::Start(const HttpServerOptions& options,
                                                              HttpHandler* handler) {
  if (options.threads < 1) return absl::InvalidArgumentError("http threads: must be at least 1");
  std::unique_ptr<HttpServer> s(new HttpServer(options, handler));
  beast::error_code ec;
  const net::ip::address address = net::ip::make_address(options.host, ec);
  if (ec) {
    return absl::InvalidArgumentError(absl::StrCat("http host '", options.host, "': ", ec.message()));
  }
  const tcp::endpoint endpoint(address, static_cast<unsigned short>(options.port));
  auto fail = [&](const char* what) {
    return absl::UnavailableError(
        absl::StrCat("cannot listen for HTTP on ", options.host, ":", options.port, " (", what, "): ", ec.message()));
  };
  if (s->acceptor_.open(endpoint.protocol(), ec); ec) return fail("open");
  if (s->acceptor_.set_option(net::socket_base::reuse_address(true), ec); ec) return fail("reuse_address");
  if (s->acceptor_.bind(endpoint, ec); ec) return fail("bind");
  if (s->acceptor_.listen(net::socket_base::max_listen_connections, ec); ec) return fail("listen");
  s->port_ = s->acceptor_.local_endpoint().port();
  s->Accept();
  for (int i = 0; i < options.threads; ++i) {
    s->threads_.emplace_back([srv = s.get()] {
      auto guard = net::make_work_guard(srv->ioc_);
      srv->ioc_.run();
    });
  }
  return s;
}

void HttpServer::Accept() {
  acceptor_.async_accept(net::make_strand(ioc_), [this](beast::error_code ec, tcp::socket socket) {
    if (!acceptor_.is_open()) return;
    if (ec) {
      // Out of descriptors, typically: try again shortly rather than spin.
      JOULE_LOG(Warning) << "http accept failed: " << ec.message();
      auto timer = std::make_shared<net::steady_timer>(acceptor_.get_executor(), std::chrono::milliseconds(100));
      timer->async_wait([this, timer](beast::error_code) { Accept(); });
      return;
    }
    beast::error_code ignored;
    socket.set_option(tcp::no_delay(true), ignored);  // SSE chunks are small and latency-bound
    auto session = std::make_shared<Session>(std::move(socket), this);
    Track(session);
    session->Run();
    Accept();
  });
}

void HttpServer::Track(const std::shared_ptr<Session>& session) {
  absl::MutexLock lock(&mu_);
  if (sessions_.size() >= 64 && sessions_.size() == sessions_.capacity()) {
    sessions_.erase(std::remove_if(sessions_.begin(), sessions_.end(),
                                   [](const std::weak_ptr<Session>& w) { return w.expired(); }),
                    sessions_.end());
  }
  sessions_.push_back(session);
}

void HttpServer::Stop() {
  if (stopped_) return;
  stopped_ = true;
  net::post(acceptor_.get_executor(), [this] {
    beast::error_code ignored;
    acceptor_.close(ignored);
  });
  {
    absl::MutexLock lock(&mu_);
    for (const auto& w : sessions_) {
      if (auto s = w.lock()) s->Close();
    }
  }
  // Let the closes run (handlers hear OnClientGone and cancel their work).
  for (int i = 0; i < 200 && open_connections_.load() > 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ioc_.stop();
  for (std::thread& t : threads_) t.join();
  threads_.clear();
}

HttpServer::~HttpServer() { Stop(); }

}  // namespace joule::http
