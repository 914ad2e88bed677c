#include "coordinator/cluster/coordinator_server.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/file.h"
#include "common/host_port.h"
#include "common/grpc_security.h"
#include "common/logging.h"
#include "common/model_fingerprint.h"
#include "common/secrets.h"
#include "common/status.h"
#include "coordinator/cluster/grpc_util.h"
#include "coordinator/cluster/grpc_worker_client.h"
#include "coordinator/cluster/model_summary.h"
#include "coordinator/http/cluster_metrics.h"
#include "coordinator/http/scheduler_metrics.h"
#include "coordinator/tokenizer/chat_template.h"

namespace joule::cluster {
namespace {

v1::TransportKind ParseTransport(const std::string& name) {
  if (name == "nccl") return v1::TRANSPORT_KIND_NCCL;
  if (name == "inproc") return v1::TRANSPORT_KIND_INPROC;
  return v1::TRANSPORT_KIND_UCX;
}

// The control loop's period: fine enough to notice a cancelled client or a
// silent rank promptly, coarse enough to cost nothing.
constexpr absl::Duration kControlPeriod = absl::Milliseconds(50);

// --scheduler-config (if any), then --policy and --tier-queue-cap on top.
absl::StatusOr<scheduler::SchedulerConfig> LoadSchedulerConfig(const CoordinatorOptions& options,
                                                              const TierCaps& caps) {
  scheduler::SchedulerConfig config;
  if (!options.scheduler_config.empty()) {
    absl::StatusOr<std::string> text = ReadFile(options.scheduler_config);
    if (!text.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("--scheduler-config: ", text.status().message()));
    }
    auto parsed = scheduler::ParseSchedulerConfig(*text);
    if (!parsed.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("--scheduler-config ", options.scheduler_config,
                                                     ": ", parsed.status().message()));
    }
    config = *std::move(parsed);
  }
  auto policy = scheduler::ParsePolicyKind(options.policy, "--policy");
  if (!policy.ok()) return policy.status();
  config.policy = *policy;
  for (scheduler::Tier t : scheduler::kAllTiers) config.slo(t).queue_cap = caps[static_cast<int>(t)];
  RETURN_IF_ERROR(config.Validate());
  return config;
}

}  // namespace

absl::StatusOr<std::unique_ptr<CoordinatorServer>> CoordinatorServer::Start(
    const CoordinatorOptions& options, std::unique_ptr<WorkerClientFactory> clients) {
  std::unique_ptr<CoordinatorServer> s(new CoordinatorServer());
  s->options_ = options;
  // Before the model: a bad TLS or token flag fails at once.
  ASSIGN_OR_RETURN(GrpcSecurity security, LoadGrpcSecurity(GrpcSecurityFlagsFrom(options)));
  if (std::string warning = GrpcSecurityWarning(security); !warning.empty()) {
    JOULE_LOG(Warning) << warning;
  }
  ASSIGN_OR_RETURN(ModelSummary model, ReadModelSummary(options.model));
  ASSIGN_OR_RETURN(s->fingerprint_, ModelFingerprint(options.model));
  JOULE_LOG(Info) << "model " << model.name << " (" << model.architecture << "): "
                  << model.num_layers << " layers, " << model.num_moe_layers() << " MoE, "
                  << model.num_experts << " experts, top-" << model.top_k << "; fingerprint "
                  << s->fingerprint_;
  MembershipOptions m{.world_size = options.workers,
                      .model_dir = options.model,
                      .model_fingerprint = s->fingerprint_,
                      .transport = ParseTransport(options.transport),
                      .heartbeat_interval = absl::Milliseconds(options.heartbeat_ms),
                      .heartbeat_misses = 3,
                      .startup_timeout = absl::Seconds(options.startup_timeout_s),
                      .redundant_experts = options.redundant_experts,
                      .step_timeout = absl::Milliseconds(options.step_timeout_ms),
                      .elastic = options.elastic};
  ASSIGN_OR_RETURN(s->membership_, Membership::Create(std::move(m), std::move(model), &s->clock_));
  s->clients_ = clients ? std::move(clients) : std::make_unique<GrpcWorkerClientFactory>(security);
  s->router_ = std::make_unique<Router>(
      s->membership_.get(), s->clients_.get(),
      RouterOptions{.request_timeout = absl::Seconds(options.request_timeout_s),
                    .max_resumes = options.max_resumes,
                    .resume_wait = absl::Seconds(options.resume_wait_s)});
  s->coordinator_service_ =
      std::make_unique<CoordinatorServiceImpl>(s->membership_.get(), security.token);
  s->frontend_service_ =
      std::make_unique<FrontendServiceImpl>(s->membership_.get(), s->router_.get(), security.token);

  grpc::ServerBuilder builder;
  AddServerKeepalive(&builder);
  builder.AddListeningPort(HostPort(options.grpc_host, options.port),
                           MakeServerCredentials(security), &s->port_);
  builder.RegisterService(s->coordinator_service_.get());
  builder.RegisterService(s->frontend_service_.get());
  s->server_ = builder.BuildAndStart();
  if (!s->server_ || s->port_ == 0) {
    return absl::UnavailableError(
        absl::StrCat("cannot listen on ", HostPort(options.grpc_host, options.port),
                     " (--grpc-host, --port: port in use?)"));
  }
  s->keep_awake_ = std::make_unique<GrpcKeepAwake>(s->server_->InProcessChannel(grpc::ChannelArguments()));
  if (options.http_port >= 0) RETURN_IF_ERROR(s->StartHttp());
  s->control_loop_ = std::thread([srv = s.get()] { srv->ControlLoop(); });
  return s;
}

absl::Status CoordinatorServer::StartHttp() {
  auto tokenizer = tokenizer::LoadTokenizer(options_.model);
  if (!tokenizer.ok()) return Annotate(tokenizer.status(), "--http-port needs the model's tokenizer");
  tokenizer_ = std::move(*tokenizer);
  metrics_registry_ = std::make_shared<prometheus::Registry>();
  const ModelSummary& model = membership_->model();
  const tokenizer::ChatFormat chat_format =
      model.is_deepseek_v3 ? tokenizer::ChatFormat::kDeepseekV3 : tokenizer::ChatFormat::kChatMl;
  if (absl::Status s = tokenizer::CheckChatTokens(chat_format, *tokenizer_); !s.ok()) {
    return Annotate(s, absl::StrCat(options_.model, "/tokenizer.json"));
  }
  auto caps = ParseTierQueueCaps(options_.tier_queue_cap);
  if (!caps.ok()) return caps.status();
  http::GenerationBackend* backend = nullptr;
  std::vector<std::shared_ptr<prometheus::Collectable>> collectables{
      std::make_shared<http::ClusterMetrics>(membership_.get(), router_.get())};
  if (options_.policy == "none") {
    http_backend_ = std::make_unique<http::RouterBackend>(router_.get());
    backend = http_backend_.get();
  } else {
    ASSIGN_OR_RETURN(scheduler::SchedulerConfig config, LoadSchedulerConfig(options_, *caps));
    JOULE_LOG(Info) << "scheduler:\n" << scheduler::DescribeSchedulerConfig(config);
    ASSIGN_OR_RETURN(scheduler_, scheduler::Scheduler::Create(std::move(config), &clock_));
    scheduled_backend_ = std::make_unique<http::ScheduledBackend>(
        router_.get(), membership_.get(), scheduler_.get(), metrics_registry_.get());
    backend = scheduled_backend_.get();
    collectables.push_back(std::make_shared<http::SchedulerMetrics>(scheduler_.get()));
  }
  std::vector<std::string> api_keys;
  if (!options_.api_key.empty()) api_keys.push_back(options_.api_key);
  if (!options_.api_key_file.empty()) {
    ASSIGN_OR_RETURN(std::vector<std::string> more, ReadSecretsFile(options_.api_key_file, "--api-key-file"));
    api_keys.insert(api_keys.end(), more.begin(), more.end());
  }
  openai_service_ = std::make_unique<http::OpenAiService>(
      http::OpenAiServiceOptions{
          .model_name = options_.served_model_name.empty() ? model.name : options_.served_model_name,
          .max_context = model.max_context,
          .api_keys = std::move(api_keys),
          .metrics_require_key = options_.metrics_require_key,
          .tier_caps = *caps,
          .limits = {.max_n = options_.max_n,
                     .max_best_of = options_.max_best_of,
                     .max_logprobs = options_.max_logprobs,
                     .max_prompts = options_.max_prompts_per_request,
                     .max_logit_bias = options_.max_logit_bias_entries,
                     .max_generations = options_.max_generations_per_request},
          .vocab_size = model.vocab_size,
          .chat_format = chat_format,
          .collectables = std::move(collectables)},
      tokenizer_.get(), backend, metrics_registry_, &clock_);
  auto server = http::HttpServer::Start(http::HttpServerOptions{.host = options_.host,
                                                                .port = options_.http_port,
                                                                .threads = options_.http_threads,
                                                                .max_body_bytes = options_.max_body_bytes},
                                        openai_service_.get());
  if (!server.ok()) return server.status();
  http_server_ = std::move(*server);
  return absl::OkStatus();
}

void CoordinatorServer::ControlLoop() {
  const absl::Duration rebalance_every = absl::Seconds(options_.rebalance_interval_s);
  absl::Time next_rebalance = absl::Now() + rebalance_every;
  absl::Time last_poll = absl::Now();
  const absl::Duration heartbeat = absl::Milliseconds(options_.heartbeat_ms);
  while (!stop_.WaitForNotificationWithTimeout(kControlPeriod)) {
    // After a stall of this process (an overloaded host) the workers'
    // heartbeats may still wait in its queues: judging silence now would
    // declare live workers dead, so the next round does.
    const absl::Duration since = absl::Now() - last_poll;
    last_poll = absl::Now();
    const bool stalled = since > heartbeat;
    if (stalled) {
      JOULE_LOG(Warning) << "control loop delayed by " << absl::FormatDuration(since)
                         << " (coordinator starved of CPU?): heartbeats are judged next round";
    }
    router_->Poll(/*expire_heartbeats=*/!stalled);
    if (rebalance_every > absl::ZeroDuration() && absl::Now() >= next_rebalance) {
      next_rebalance = absl::Now() + rebalance_every;
      auto epoch = membership_->Rebalance(std::nullopt);
      if (!epoch.ok()) {
        JOULE_LOG(Warning) << "periodic rebalance failed: " << epoch.status();
      }
    }
  }
}

void CoordinatorServer::Stop() {
  if (stopped_) return;
  stopped_ = true;
  JOULE_LOG(Info) << "coordinator shutting down";
  // Queued requests and then those in flight get their error before the
  // connections close.
  if (scheduled_backend_) scheduled_backend_->Shutdown();
  router_->Shutdown();
  if (http_server_) http_server_->Stop();
  membership_->Shutdown();
  keep_awake_.reset();
  server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  stop_.Notify();
  if (control_loop_.joinable()) control_loop_.join();
}

CoordinatorServer::~CoordinatorServer() {
  if (server_) Stop();
}

}  // namespace joule::cluster
