#include "worker/service/convert.h"

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace joule::worker {

namespace {

// Fields proto3 leaves at 0 mean "unset" where 0 is not a value (see convert.h).
absl::StatusOr<SamplingParams> SamplingFromProto(const v1::SamplingParams& s) {
  SamplingParams out;
  out.temperature = s.temperature();
  out.top_p = s.top_p() == 0.0f ? 1.0f : s.top_p();
  out.top_k = s.top_k();
  if (s.has_seed()) out.seed = s.seed();
  if (s.max_tokens() < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("sampling.max_tokens: must be positive, got ", s.max_tokens()));
  }
  out.max_tokens = s.max_tokens() == 0 ? kDefaultMaxTokens : s.max_tokens();
  out.stop_token_ids.assign(s.stop_token_ids().begin(), s.stop_token_ids().end());
  out.ignore_eos = s.ignore_eos();
  out.presence_penalty = s.presence_penalty();
  out.frequency_penalty = s.frequency_penalty();
  out.repetition_penalty = s.repetition_penalty() == 0.0f ? 1.0f : s.repetition_penalty();
  out.logit_bias.insert(s.logit_bias().begin(), s.logit_bias().end());
  out.logprobs = s.logprobs();
  out.top_logprobs = s.top_logprobs();
  out.prompt_logprobs = s.prompt_logprobs();
  // The vocabulary is the engine's to check (Engine::Add).
  if (absl::Status st = out.Validate(); !st.ok()) {
    // SamplingParams names the bare field; say where it sits in the request.
    return absl::InvalidArgumentError(absl::StrCat("sampling.", st.message()));
  }
  return out;
}

}  // namespace

absl::StatusOr<GenerationRequest> ToGenerationRequest(const v1::GenerateRequest& request) {
  if (request.request_id().empty()) {
    return absl::InvalidArgumentError("request_id: must not be empty");
  }
  if (request.prompt_token_ids().empty()) {
    return absl::InvalidArgumentError("prompt_token_ids: must not be empty");
  }
  GenerationRequest out;
  out.prompt.assign(request.prompt_token_ids().begin(), request.prompt_token_ids().end());
  out.resumed.assign(request.resumed_token_ids().begin(), request.resumed_token_ids().end());
  ASSIGN_OR_RETURN(out.sampling, SamplingFromProto(request.sampling()));
  if (request.priority() < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("priority: must be >= 0 (0 is most urgent), got ", request.priority()));
  }
  if (request.step_token_cap() < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("step_token_cap: must be >= 0 (0: no cap), got ", request.step_token_cap()));
  }
  if (request.token_interval_us() < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "token_interval_us: must be >= 0 (0: a token every step), got ", request.token_interval_us()));
  }
  out.token_interval = absl::Microseconds(request.token_interval_us());
  out.priority = request.priority();
  out.step_token_cap = request.step_token_cap();
  return out;
}

v1::FinishReason ToProto(FinishReason reason) {
  switch (reason) {
    case FinishReason::kStop: return v1::FINISH_REASON_STOP;
    case FinishReason::kLength: return v1::FINISH_REASON_LENGTH;
    case FinishReason::kCancelled: return v1::FINISH_REASON_CANCELLED;
    case FinishReason::kNone: break;
  }
  return v1::FINISH_REASON_UNSPECIFIED;
}

void ToProto(const TokenLogprob& logprob, v1::TokenLogprob* out) {
  out->set_token_id(logprob.token);
  out->set_logprob(logprob.logprob);
  for (const TopLogprob& alt : logprob.top) {
    v1::TopLogprob* top = out->add_top();
    top->set_token_id(alt.token);
    top->set_logprob(alt.logprob);
  }
}

absl::StatusOr<Placement> PlacementFromProto(const v1::Placement& placement, const ModelConfig& config) {
  std::vector<bool> moe_layer(config.num_layers);
  for (int l = 0; l < config.num_layers; ++l) moe_layer[l] = config.IsMoeLayer(l);
  return joule::PlacementFromProto(placement, config.num_experts, moe_layer);
}

v1::ModelInfo ToModelInfo(const ModelConfig& config, const std::string& name) {
  v1::ModelInfo info;
  info.set_name(name);
  info.set_architecture(config.architecture);
  info.set_vocab_size(static_cast<int32_t>(config.vocab_size));
  info.set_hidden_size(static_cast<int32_t>(config.hidden_size));
  info.set_num_layers(config.num_layers);
  info.set_num_experts(config.num_experts);
  info.set_top_k(config.num_experts_per_tok);
  info.set_max_context(config.max_position_embeddings);
  return info;
}

}  // namespace joule::worker
