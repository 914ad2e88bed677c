// An HTTP/1.1 server on Boost.Beast: asynchronous, keep-alive, a fixed pool of
// I/O threads running one io_context (no thread per connection). It knows
// nothing about the API: each request goes to an HttpHandler with an Exchange
// through which the handler answers, at once or later, from any thread, with
// a whole response or a chunked stream (server-sent events).
//
// Each connection is served on its own strand; while a handler has not
// finished its response the server watches the socket, so a client that
// disconnects is noticed at once (Exchange::OnClientGone), not at the next write.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/beast/http/message.hpp>
#include <boost/beast/http/string_body.hpp>
#include <boost/beast/http/empty_body.hpp>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace joule::http {

using HttpRequest = boost::beast::http::request<boost::beast::http::string_body>;
using HttpResponse = boost::beast::http::response<boost::beast::http::string_body>;
using HttpStreamHeader = boost::beast::http::response<boost::beast::http::empty_body>;

class Session;

// The answer to one request. Every method may be called from any thread and
// returns at once; the work happens on the connection's strand. A handler
// calls either Respond once, or StartStream, Send..., EndStream. Calls after
// the answer is complete, or after the client went away, are ignored.
class Exchange {
 public:
  Exchange(std::shared_ptr<Session> session, uint64_t seq) : session_(std::move(session)), seq_(seq) {}

  // Sends a whole response (Content-Length set here; version and keep-alive
  // follow the request unless the response says Connection: close).
  void Respond(HttpResponse response);

  // Sends the header of a chunked response, then each Send as one chunk (data
  // queued while a write is in flight goes out together), then the last chunk.
  void StartStream(HttpStreamHeader header);
  void Send(std::string data);
  void EndStream();

  // `callback` runs once, on the connection's strand, if the client
  // disconnects (or a write to it fails) before the answer is complete; at
  // once if it already has. It must not block.
  void OnClientGone(std::function<void()> callback);

 private:
  std::shared_ptr<Session> session_;
  const uint64_t seq_;
};

class HttpHandler {
 public:
  virtual ~HttpHandler() = default;
  // Called on an I/O thread for every request read; must not block.
  virtual void Handle(HttpRequest request, std::shared_ptr<Exchange> exchange) = 0;
  // The body of the server's own errors (413 body too large, 400 unparsable
  // HTTP), so they share the API's error shape.
  virtual HttpResponse ErrorResponse(int http_status, const std::string& message) = 0;
};

struct HttpServerOptions {
  std::string host = "127.0.0.1";
  int port = 0;  // 0: any free port (see HttpServer::port)
  int threads = 2;
  int64_t max_body_bytes = 1 << 20;
  // An idle keep-alive connection is closed after this long.
  absl::Duration idle_timeout = absl::Seconds(60);
  // A single write that makes no progress for this long means the client is gone.
  absl::Duration write_timeout = absl::Seconds(60);
};

class HttpServer {
 public:
  // Binds and starts the I/O threads. `handler` must outlive the server.
  static absl::StatusOr<std::unique_ptr<HttpServer>> Start(const HttpServerOptions& options,
                                                           HttpHandler* handler);
  ~HttpServer();  // Stop()s

  int port() const { return port_; }
  int open_connections() const { return open_connections_.load(); }

  // Stops accepting, closes every connection (their handlers see
  // OnClientGone) and joins the I/O threads. The io_context itself lives until
  // the server is destroyed, so answers that arrive late are dropped safely;
  // destroy the server only after every Exchange is gone. Idempotent.
  void Stop();

 private:
  friend class Session;
  HttpServer(const HttpServerOptions& options, HttpHandler* handler);
  void Accept();
  void Track(const std::shared_ptr<Session>& session);

  const HttpServerOptions options_;
  HttpHandler* const handler_;
  // Declared before ioc_: sessions the io_context still holds at destruction
  // update it as they go.
  std::atomic<int> open_connections_{0};
  boost::asio::io_context ioc_;
  boost::asio::ip::tcp::acceptor acceptor_;
  int port_ = 0;
  std::vector<std::thread> threads_;
  absl::Mutex mu_;
  std::vector<std::weak_ptr<Session>> sessions_ ABSL_GUARDED_BY(mu_);
  bool stopped_ = false;
};

}  // namespace joule::http
