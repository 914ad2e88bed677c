// joule-coordinator: the control plane of a Joule cluster. Workers register
// with it, rendezvous, heartbeat and receive expert placement; token-id clients
// (joule-cli) send requests through its Frontend service.
//
//   joule-coordinator --model DIR --workers N [--port 0] [--port-file FILE]
//                     [--transport ucx|nccl|inproc] [--redundant-experts N]
//                     [--step-timeout-ms 10000] [--heartbeat-ms 500]
//                     [--http-port P] [--http-port-file FILE] [--api-key KEY]
//                     [--host 127.0.0.1] [--grpc-host 127.0.0.1]
//
// Logs go to stderr; "grpc listening on HOST:PORT" (--grpc-host) and, with
// --http-port, "http listening on HOST:PORT" (--host; the OpenAI-compatible
// API) are printed to stdout once serving. Both hosts default to 127.0.0.1.
// SIGTERM or SIGINT shut it down cleanly (exit status 0).
#include <signal.h>

#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "common/host_port.h"
#include "common/logging.h"
#include "coordinator/cluster/coordinator_options.h"
#include "coordinator/cluster/coordinator_server.h"

namespace {

// Written to a temporary name and renamed, so a script polling for the file
// never reads a partial port.
bool WritePortFile(const std::string& path, int port) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    if (!(out << port << "\n")) return false;
  }
  return std::rename(tmp.c_str(), path.c_str()) == 0;
}

}  // namespace

int main(int argc, char** argv) {
  // Block the shutdown signals before any thread starts so every thread
  // inherits the mask and only sigwait below sees them.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  signal(SIGPIPE, SIG_IGN);

  auto options = joule::cluster::ParseCoordinatorOptions(argc, argv);
  if (!options.ok()) return joule::ReportOptionsError("joule-coordinator", options.status());
  JOULE_LOG(Info) << "joule-coordinator starting with\n" << options->ToString();
  auto server = joule::cluster::CoordinatorServer::Start(*options);
  if (!server.ok()) {
    std::fprintf(stderr, "joule-coordinator: %s\n", std::string(server.status().message()).c_str());
    return 1;
  }
  const int port = (*server)->port();
  // The HTTP port file first: a script that sees the gRPC one may read both.
  const int http_port = (*server)->http_port();
  if (http_port >= 0 && !options->http_port_file.empty() &&
      !WritePortFile(options->http_port_file, http_port)) {
    std::fprintf(stderr, "joule-coordinator: cannot write --http-port-file %s\n", options->http_port_file.c_str());
    (*server)->Stop();
    return 1;
  }
  if (!options->port_file.empty() && !WritePortFile(options->port_file, port)) {
    std::fprintf(stderr, "joule-coordinator: cannot write --port-file %s\n", options->port_file.c_str());
    (*server)->Stop();
    return 1;
  }
  // Exactly what listens where: 0.0.0.0 is every interface, 127.0.0.1 this host only.
  std::printf("grpc listening on %s\n", joule::HostPort(options->grpc_host, port).c_str());
  if (http_port >= 0) std::printf("http listening on %s\n", joule::HostPort(options->host, http_port).c_str());
  std::fflush(stdout);
  JOULE_LOG(Info) << "waiting for " << options->workers << " worker(s) on port " << port;

  int sig = 0;
  sigwait(&signals, &sig);
  JOULE_LOG(Info) << "received " << (sig == SIGTERM ? "SIGTERM" : "SIGINT");
  (*server)->Stop();
  return 0;
}
