// joule-worker: one expert-parallel rank of a Joule cluster.
//
//   joule-worker --coordinator HOST:PORT --model DIR [--rank R] [--port 0] [--threads N]
//                [--grpc-host 127.0.0.1] [--metrics-host 127.0.0.1]
//                [--kv-cache-mb M] [--block-size 16] [--transport ucx|nccl]
//                [--payload bf16|f32] [--step-timeout-ms 10000] ...   (--help lists all)
//
// Exit status: 0 after SIGTERM/SIGINT or a shutdown from the coordinator,
// 1 when the worker could not start or stopped serving (peer lost, step
// timeout, coordinator unreachable), 2 for bad flags.
#include <pthread.h>
#include <signal.h>

#include <cstdio>
#include <thread>

#include "common/host_port.h"
#include "common/grpc_security.h"
#include "common/logging.h"
#include "worker/service/grpc_coordinator_client.h"
#include "worker/service/worker_config.h"
#include "worker/service/worker_process.h"
#ifdef JOULE_WORKER_FAKE_DEVICE
#include "worker/device/fake_device_backend.h"
#endif

int main(int argc, char** argv) {
#ifdef JOULE_WORKER_FAKE_DEVICE
  // joule-worker-fake-device (tests only): --device fake is the asynchronous
  // fake GPU, so the GPU worker's process path runs on a CPU-only host.
  joule::device::SetFakeBackendFactory(
      [](const joule::device::BackendOptions& o) -> std::unique_ptr<joule::device::Backend> {
        return std::make_unique<joule::device::FakeDeviceBackend>(o.num_threads, /*asynchronous=*/true);
      });
#endif
  absl::StatusOr<joule::worker::WorkerConfig> config = joule::worker::ParseWorkerConfig(argc, argv);
  if (!config.ok()) return joule::ReportOptionsError("joule-worker", config.status());

  // Signals are taken by one owned thread (sigwait), never by a handler:
  // block them before any other thread starts so every thread inherits it.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  absl::StatusOr<joule::GrpcSecurity> security =
      joule::LoadGrpcSecurity(joule::GrpcSecurityFlagsFrom(*config));
  if (!security.ok()) return joule::ReportOptionsError("joule-worker", security.status());
  if (std::string warning = joule::GrpcSecurityWarning(*security); !warning.empty()) {
    JOULE_LOG(Warning) << warning;
  }
  auto coordinator = joule::worker::MakeGrpcCoordinatorClient(
      config->coordinator, absl::Milliseconds(config->rpc_timeout_ms), *security);
  joule::worker::WorkerProcess process(*config, coordinator.get(), *security);

  std::atomic<bool> exiting{false};
  std::thread signal_thread([&] {
    while (true) {
      int sig = 0;
      if (sigwait(&signals, &sig) != 0) continue;
      if (exiting.load()) return;
      JOULE_LOG(Info) << "received " << (sig == SIGTERM ? "SIGTERM" : "SIGINT") << "; shutting down";
      process.Stop(sig == SIGTERM ? "SIGTERM" : "SIGINT");
    }
  });
  auto join_signal_thread = [&] {
    exiting.store(true);
    pthread_kill(signal_thread.native_handle(), SIGTERM);
    signal_thread.join();
  };

  int code = 0;
  if (absl::Status s = process.Start(); !s.ok()) {
    JOULE_LOG(Error) << "joule-worker failed to start: " << s.message();
    process.Fail(s);
    (void)process.Wait();
    code = 1;
  } else {
    // Exactly what listens where (the real bound host and port); scripts wait for these.
    std::printf("joule-worker rank %d grpc listening on %s\n", process.rank(),
                joule::HostPort(config->GrpcHost(), process.port()).c_str());
    if (process.metrics_port() > 0) {
      std::printf("joule-worker rank %d metrics listening on %s\n", process.rank(),
                  joule::HostPort(config->metrics_host, process.metrics_port()).c_str());
    }
    std::fflush(stdout);
    absl::Status s2 = process.Wait();
    if (!s2.ok()) {
      JOULE_LOG(Error) << "joule-worker stopped: " << s2.message();
      code = 1;
    } else {
      JOULE_LOG(Info) << "joule-worker stopped cleanly";
    }
  }
  join_signal_thread();
  return code;
}
