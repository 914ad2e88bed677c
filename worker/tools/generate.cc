// joule-generate: runs the single-process engine on one prompt and prints the
// continuation and its speed.
//
//   joule-generate --model DIR (--prompt TEXT | --prompt-ids 1,2,3) [--max-tokens N]
//                  [--temperature T] [--top-p P] [--top-k K] [--seed S] [--threads N]
//                  [--device cpu|cuda:N]
#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/options.h"
#include "common/status.h"
#include "coordinator/tokenizer/tokenizer.h"
#include "worker/engine/engine.h"

namespace joule {
namespace {

// X(type, field, default, help); the flag is --field with '_' written '-'.
#define JOULE_GENERATE_FLAGS(X)                                                                   \
  X(std::string, model, "", "checkpoint directory (Hugging Face layout; required)")              \
  X(std::string, prompt, "", "prompt text (needs the model's tokenizer.json)")                   \
  X(std::string, prompt_ids, "", "prompt as comma-separated token ids")                          \
  X(int, max_tokens, 32, "tokens to generate at most")                                           \
  X(float, temperature, 0.0f, "0 is greedy")                                                     \
  X(float, top_p, 1.0f, "nucleus sampling mass in (0, 1]")                                       \
  X(int, top_k, 0, "sample from the k most likely tokens; 0 disables")                          \
  X(int64_t, seed, -1, "sampling seed; -1: random")                                              \
  X(int, threads, 0, "CPU threads; 0: every usable core")                                        \
  X(std::string, device, "cpu", "where the forward pass runs: cpu, cuda or cuda:N")             \
  X(bool, cuda_graphs, true, "GPU: replay decode steps from CUDA graphs captured at start-up")   \
  X(bool, ignore_eos, false, "keep generating past end-of-sequence tokens")

struct GenerateFlags {
  JOULE_GENERATE_FLAGS(JOULE_OPTION_FIELD)

  std::vector<Option> Options() { return {JOULE_GENERATE_FLAGS(JOULE_OPTION_BIND)}; }
  absl::Status Validate() const {
    if (model.empty() || prompt.empty() == prompt_ids.empty()) {
      return absl::InvalidArgumentError("give --model and exactly one of --prompt, --prompt-ids");
    }
    return absl::OkStatus();
  }
  SamplingParams Sampling() const {
    SamplingParams s;
    s.temperature = temperature;
    s.top_p = top_p;
    s.top_k = top_k;
    s.max_tokens = max_tokens;
    s.ignore_eos = ignore_eos;
    if (seed >= 0) s.seed = static_cast<uint64_t>(seed);
    return s;
  }
};

absl::StatusOr<std::vector<int32_t>> ParseIds(const std::string& text) {
  std::vector<int32_t> ids;
  for (absl::string_view part : absl::StrSplit(text, absl::ByAnyChar(", "), absl::SkipEmpty())) {
    int32_t id;
    if (!absl::SimpleAtoi(part, &id)) {
      return absl::InvalidArgumentError(absl::StrCat("--prompt-ids: '", part, "' is not an integer"));
    }
    ids.push_back(id);
  }
  if (ids.empty()) return absl::InvalidArgumentError("--prompt-ids: no ids given");
  return ids;
}

absl::Status Run(const GenerateFlags& args) {
  auto tok = tokenizer::LoadTokenizer(args.model);
  std::vector<int32_t> prompt;
  if (!args.prompt_ids.empty()) {
    ASSIGN_OR_RETURN(prompt, ParseIds(args.prompt_ids));
  } else {
    if (!tok.ok()) return Annotate(tok.status(), "--prompt needs the model's tokenizer (or use --prompt-ids)");
    // As Hugging Face's tokenizer(prompt): with the special tokens it adds (DeepSeek-V3: BOS).
    ASSIGN_OR_RETURN(prompt, (*tok)->EncodeWithSpecialTokens(args.prompt));
  }
  const auto t_load = std::chrono::steady_clock::now();
  ASSIGN_OR_RETURN(const device::DeviceSpec device, device::ParseDeviceSpec(args.device));
  ASSIGN_OR_RETURN(auto model, Model::Load(args.model, {.num_threads = args.threads,
                                                        .device = device,
                                                        .cuda_graphs = args.cuda_graphs}));
  // One request: a small batch; on a GPU the KV cache is sized from its memory.
  ASSIGN_OR_RETURN(auto engine, Engine::Create(model.get(), {.gpu_memory_utilization = 0.9,
                                                             .max_running = 8}));
  const double load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_load).count();
  RETURN_IF_ERROR(engine->Add({.id = 1, .prompt = prompt, .sampling = args.Sampling()}));

  std::vector<int32_t> out;
  std::unique_ptr<tokenizer::IncrementalDecoder> decoder;
  if (tok.ok()) decoder = std::make_unique<tokenizer::IncrementalDecoder>(**tok);
  const auto t0 = std::chrono::steady_clock::now();
  double first_token_s = 0;
  FinishReason finish = FinishReason::kNone;
  while (engine->HasWork()) {
    ASSIGN_OR_RETURN(StepResult step, engine->Step());
    for (const TokenOutput& t : step.tokens) {
      if (out.empty()) first_token_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      out.push_back(t.token);
      if (decoder) std::fputs(decoder->Push(t.token).c_str(), stdout);
      std::fflush(stdout);
      finish = t.finish;
    }
  }
  const double total_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (decoder) std::fputs(decoder->Flush().c_str(), stdout);
  std::printf("\n\ntoken ids: ");
  for (size_t i = 0; i < out.size(); ++i) std::printf("%s%d", i ? "," : "", out[i]);
  const double decode_s = total_s - first_token_s;
  std::printf("\nprompt %zu tokens, generated %zu tokens (finish: %s)\n", prompt.size(), out.size(),
              std::string(FinishReasonName(finish)).c_str());
  std::printf("load %.2f s, time to first token %.1f ms, decode %.1f tokens/s, overall %.1f tokens/s\n",
              load_s, first_token_s * 1e3,
              out.size() > 1 ? (out.size() - 1) / decode_s : 0.0, out.size() / total_s);
  return absl::OkStatus();
}

}  // namespace
}  // namespace joule

int main(int argc, char** argv) {
  auto args = joule::ParseConfig<joule::GenerateFlags>(
      "runs the single-process engine on one prompt.\n"
      "usage: joule-generate --model DIR (--prompt TEXT | --prompt-ids 1,2,3) [--max-tokens N] ...",
      "JOULE_GENERATE_", argc, argv);
  if (!args.ok()) return joule::ReportOptionsError("joule-generate", args.status());
  absl::Status s = joule::Run(*args);
  if (!s.ok()) {
    std::fprintf(stderr, "joule-generate: %s\n", std::string(s.message()).c_str());
    return 1;
  }
  return 0;
}
