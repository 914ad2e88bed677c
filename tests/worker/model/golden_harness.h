// Runs the engine on the golden prompts (tests/data/golden) and compares with
// the PyTorch reference's numbers; shared by the CPU golden tests and the GPU
// ones (gpu_model_test), which differ in device and tolerance only.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "worker/engine/engine.h"
#include "worker/model/model.h"

namespace joule::testing {

struct Prompt {
  std::vector<int32_t> ids;
  std::vector<int> logit_positions;        // prompt positions with reference logits
  std::vector<std::vector<float>> logits;  // [positions][vocab]
  std::vector<int32_t> greedy;
  std::vector<float> greedy_margins;
};

// tests/data/golden/<file>.json, e.g. "qwen3_moe-tiny" or "qwen3_moe-tiny.bf16act".
std::vector<Prompt> LoadFixture(const std::string& file);

// Runs sequences through Model::Forward in chunks of `chunk` tokens per
// sequence per step (all sequences advance together), with KV blocks handed
// out in a scrambled order. Returns logits for every prompt position.
std::vector<std::vector<std::vector<float>>> RunPrompts(Model& model,
                                                        const std::vector<Prompt>& prompts,
                                                        int block_size, int chunk,
                                                        uint32_t block_shuffle_seed);

// The largest error a logit may have given the reference's value and the
// largest |logit| at its position.
using LogitTolerance = std::function<float(float want, float max_abs_at_position)>;

// Fails on the first logit out of tolerance; prints and records the worst error.
void ExpectLogitsNear(const std::vector<Prompt>& prompts,
                      const std::vector<std::vector<std::vector<float>>>& got,
                      const std::string& what, const LogitTolerance& tolerance);

// Greedy continuations through the engine loop (chunked prefill interleaved
// with decodes); ids per prompt.
std::vector<std::vector<int32_t>> RunGreedy(Model& model, const std::vector<Prompt>& prompts,
                                            EngineOptions options);

// The engine's greedy ids equal the reference's up to the first step where
// they differ, which must be a near tie in the reference (margin below
// `tie_margin`): past it the sequences legitimately diverge.
void ExpectGreedyMatches(const std::vector<Prompt>& prompts,
                         const std::vector<std::vector<int32_t>>& got, float tie_margin);

// Through the engine with prompt_logprobs and logprobs (`top` alternatives):
// each prompt's entries and its first greedy token's.
struct ReportedLogprobs {
  std::vector<TokenLogprob> prompt;
  TokenLogprob first;
};
std::vector<ReportedLogprobs> RunLogprobs(Model& model, const std::vector<Prompt>& prompts,
                                          EngineOptions options, int top);

// Every reported logprob against log_softmax of the reference's logits at the
// position before it (absolute `tolerance`); the alternatives must be the
// reference's most likely tokens, in order, up to near ties.
void ExpectLogprobsNear(const std::vector<Prompt>& prompts, const std::vector<ReportedLogprobs>& got,
                        float tolerance);

}  // namespace joule::testing
