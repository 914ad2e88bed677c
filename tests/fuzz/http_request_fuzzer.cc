// The front door's HTTP request path: the bytes of one client connection go
// through the real HttpServer (Beast's parser with the server's limits,
// keep-alive, pipelining, Expect: 100-continue, 400/413/431) and OpenAiService
// (routes, API key, request decoding, ChatML, tokenization, admission, JSON
// and server-sent-event answers), with a backend that answers every
// generation at once by echoing prompt tokens.
//
// The server has no seam below its socket, so each input is one loopback
// connection: written, half-closed, and read until the server closes. Every
// connection must end within kAnswerDeadline (a server that keeps a
// half-closed connection open is a slowloris hole), and whatever comes back
// must be HTTP.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>

#include "absl/strings/match.h"
#include "coordinator/http/generation_backend.h"
#include "coordinator/http/http_server.h"
#include "coordinator/http/openai_service.h"
#include "coordinator/tokenizer/tokenizer.h"
#include "prometheus/registry.h"
#include "scheduler/fake_clock.h"
#include "tests/fuzz/fuzz_check.h"

namespace joule::fuzz {
namespace {

constexpr auto kAnswerDeadline = std::chrono::seconds(20);
constexpr int64_t kMaxContext = 256;

// Answers every request at once: up to 8 of its prompt tokens back, the last
// with finish_reason length, with the log probabilities asked for. Keeps
// nothing, so a long run does not grow.
class EchoBackend final : public http::GenerationBackend {
 public:
  absl::Status Validate(const v1::GenerateRequest& request) const override {
    if (request.prompt_token_ids().empty()) return absl::InvalidArgumentError("prompt_token_ids: must not be empty");
    if (request.sampling().max_tokens() <= 0 ||
        request.prompt_token_ids_size() + static_cast<int64_t>(request.sampling().max_tokens()) > kMaxContext) {
      return absl::InvalidArgumentError("sampling.max_tokens: the prompt plus max_tokens exceed the context");
    }
    return absl::OkStatus();
  }
  absl::Status Ready() const override { return absl::OkStatus(); }
  void GenerateAsync(const v1::GenerateRequest& request, absl::Time, std::shared_ptr<cluster::GenerateSink> sink,
                     std::function<void(absl::Status)> done) override {
    if (absl::Status s = Validate(request); !s.ok()) return done(s);
    const int n = std::min({request.prompt_token_ids_size(), request.sampling().max_tokens(), 8});
    for (int i = 0; i < n; ++i) {
      v1::GenerateResponse r;
      r.set_request_id(request.request_id());
      r.add_token_ids(request.prompt_token_ids(i));
      if (request.sampling().logprobs()) AddLogprob(request, request.prompt_token_ids(i), -1.0f, r.add_logprobs());
      if (i == 0 && request.sampling().prompt_logprobs()) {
        for (int32_t id : request.prompt_token_ids()) {
          AddLogprob(request, id, r.prompt_logprobs_size() == 0 ? NAN : -2.0f, r.add_prompt_logprobs());
        }
      }
      if (i + 1 == n) r.set_finish_reason(v1::FINISH_REASON_LENGTH);
      if (!sink->Write(r)) break;
    }
    done(absl::OkStatus());
  }
  void Cancel(const std::string&) override {}

 private:
  static void AddLogprob(const v1::GenerateRequest& request, int32_t id, float logprob, v1::TokenLogprob* out) {
    out->set_token_id(id);
    out->set_logprob(logprob);
    for (int t = 0; t < request.sampling().top_logprobs(); ++t) {
      v1::TopLogprob* top = out->add_top();
      top->set_token_id(t);
      top->set_logprob(logprob - static_cast<float>(t));
    }
  }
};

struct FrontDoor {
  FrontDoor() {
    auto t = tokenizer::ParseTokenizerJson(tokenizer::MakeByteLevelTokenizerJson(), "byte-level");
    FUZZ_CHECK(t.ok(), "%s", t.status().ToString().c_str());
    tokenizer = std::move(*t);
    service = std::make_unique<http::OpenAiService>(
        http::OpenAiServiceOptions{.model_name = "tiny", .max_context = kMaxContext, .api_keys = {"fuzz-key"}},
        tokenizer.get(), &backend, std::make_shared<prometheus::Registry>(), &clock);
    // A small body limit, so that 413 is within reach of small inputs.
    auto s = http::HttpServer::Start(
        {.host = "127.0.0.1", .port = 0, .threads = 2, .max_body_bytes = 4096}, service.get());
    FUZZ_CHECK(s.ok(), "%s", s.status().ToString().c_str());
    server = std::move(*s);
  }
  scheduler::FakeClock clock;
  EchoBackend backend;
  std::unique_ptr<tokenizer::Tokenizer> tokenizer;
  std::unique_ptr<http::OpenAiService> service;
  std::unique_ptr<http::HttpServer> server;
};

// Sends `request` on a new connection, half-closes it and returns everything
// the server sent until it closed.
std::string Exchange(int port, std::string_view request) {
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
  FUZZ_CHECK(fd >= 0, "socket: %s", strerror(errno));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  int rc = connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  FUZZ_CHECK(rc == 0 || errno == EINPROGRESS, "connect: %s", strerror(errno));
  const auto deadline = std::chrono::steady_clock::now() + kAnswerDeadline;
  std::string response;
  size_t sent = 0;
  bool write_closed = false;
  char buf[16384];
  for (;;) {
    if (!write_closed && sent == request.size()) {
      shutdown(fd, SHUT_WR);
      write_closed = true;
    }
    pollfd p{.fd = fd, .events = static_cast<short>(POLLIN | (write_closed ? 0 : POLLOUT)), .revents = 0};
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    FUZZ_CHECK(left.count() > 0, "the server neither answered nor closed the connection within %lld s",
               static_cast<long long>(kAnswerDeadline.count()));
    if (poll(&p, 1, static_cast<int>(left.count())) <= 0) continue;
    if (p.revents & POLLOUT) {
      const ssize_t n = send(fd, request.data() + sent, request.size() - sent, MSG_NOSIGNAL);
      if (n > 0) {
        sent += static_cast<size_t>(n);
      } else if (n < 0 && errno != EAGAIN && errno != EINTR) {
        write_closed = true;  // the server closed first (after an error response): fine
        shutdown(fd, SHUT_WR);
      }
    }
    if (p.revents & (POLLIN | POLLHUP | POLLERR)) {
      const ssize_t n = recv(fd, buf, sizeof(buf), 0);
      if (n > 0) {
        response.append(buf, static_cast<size_t>(n));
      } else if (n == 0 || (errno != EAGAIN && errno != EINTR)) {
        break;  // closed (or reset)
      }
    }
  }
  close(fd);
  return response;
}

}  // namespace
}  // namespace joule::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static joule::fuzz::FrontDoor* front_door = new joule::fuzz::FrontDoor();  // lives for the process
  const std::string response = joule::fuzz::Exchange(front_door->server->port(), joule::fuzz::Text(data, size));
  FUZZ_CHECK(response.empty() || absl::StartsWith(response, "HTTP/1."), "not an HTTP response: %.80s",
             response.c_str());
  return 0;
}
