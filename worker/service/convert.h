// Conversions between the joule.v1 messages and the worker's plain C++ types.
// Messages are plain data (no gRPC types); keeping the translation here lets the
// runtime and the engine stay free of protobuf, and bad fields get one clear
// error naming the field.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "common/placement_proto.h"
#include "proto/joule/v1/generate.pb.h"
#include "proto/joule/v1/model.pb.h"
#include "worker/engine/engine.h"
#include "worker/model/config.h"

namespace joule::worker {

// Output tokens when a request leaves max_tokens at 0 (unset in proto3).
inline constexpr int kDefaultMaxTokens = 16;

// Sampling fields proto3 leaves at 0 mean "unset": top_p 0 -> 1 (off),
// max_tokens 0 -> kDefaultMaxTokens. temperature 0 is greedy, as in the API.
// InvalidArgument naming the field (request_id, prompt_token_ids, sampling.*).
absl::StatusOr<GenerationRequest> ToGenerationRequest(const v1::GenerateRequest& request);

v1::FinishReason ToProto(FinishReason reason);
void ToProto(const TokenLogprob& logprob, v1::TokenLogprob* out);

// common/placement_proto.h's PlacementFromProto, checked against this model's
// experts and MoE layers.
absl::StatusOr<Placement> PlacementFromProto(const v1::Placement& placement, const ModelConfig& config);

// What a worker reports about its model at registration.
v1::ModelInfo ToModelInfo(const ModelConfig& config, const std::string& name);

}  // namespace joule::worker
