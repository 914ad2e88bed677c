// A small synchronous HTTP/1.1 client on Boost.Beast for tests: one
// connection, several requests (keep-alive), whole responses or the first
// bytes of a stream.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include <boost/asio/connect.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

namespace joule::http::testing {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace bhttp = boost::beast::http;

using ClientResponse = bhttp::response<bhttp::string_body>;

class TestClient {
 public:
  explicit TestClient(int port) : socket_(ioc_) {
    socket_.connect(net::ip::tcp::endpoint(net::ip::make_address("127.0.0.1"), static_cast<unsigned short>(port)));
  }

  void Send(bhttp::verb method, const std::string& target, const std::string& body = "",
            std::vector<std::pair<std::string, std::string>> headers = {}) {
    bhttp::request<bhttp::string_body> req(method, target, 11);
    req.set(bhttp::field::host, "127.0.0.1");
    for (auto& [k, v] : headers) req.set(k, v);
    if (!body.empty() || method == bhttp::verb::post) {
      req.set(bhttp::field::content_type, "application/json");
      req.body() = body;
      req.prepare_payload();
    }
    bhttp::write(socket_, req);
  }

  // Reads one whole response (chunked bodies are joined). Throws on a broken connection.
  ClientResponse Read() {
    bhttp::response_parser<bhttp::string_body> parser;
    parser.body_limit(64 << 20);
    bhttp::read(socket_, buffer_, parser);
    return parser.release();
  }

  ClientResponse Request(bhttp::verb method, const std::string& target, const std::string& body = "",
                         std::vector<std::pair<std::string, std::string>> headers = {}) {
    Send(method, target, body, std::move(headers));
    return Read();
  }

  // Reads raw bytes until `needle` has arrived (or the peer closes); returns them.
  std::string ReadUntil(const std::string& needle) {
    std::string got;
    char buf[4096];
    while (got.find(needle) == std::string::npos) {
      beast::error_code ec;
      const size_t n = socket_.read_some(net::buffer(buf), ec);
      if (ec) break;
      got.append(buf, n);
    }
    return got;
  }

  // True when the server closed the connection (a read returns EOF).
  bool ServerClosed() {
    char c;
    beast::error_code ec;
    socket_.read_some(net::buffer(&c, 1), ec);
    return ec == net::error::eof || ec == net::error::connection_reset;
  }

  void Close() {
    beast::error_code ec;
    socket_.shutdown(net::ip::tcp::socket::shutdown_both, ec);
    socket_.close(ec);
  }

  net::ip::tcp::socket& socket() { return socket_; }

 private:
  net::io_context ioc_;
  net::ip::tcp::socket socket_;
  beast::flat_buffer buffer_;
};

// The JSON payloads of a server-sent event stream, in order ("[DONE]" as is).
inline std::vector<std::string> SseData(const std::string& body) {
  std::vector<std::string> out;
  size_t pos = 0;
  while (true) {
    const size_t start = body.find("data: ", pos);
    if (start == std::string::npos) break;
    const size_t end = body.find("\n\n", start);
    if (end == std::string::npos) break;
    out.push_back(body.substr(start + 6, end - start - 6));
    pos = end + 2;
  }
  return out;
}

}  // namespace joule::http::testing
