// joule-generate: runs the single-process engine on one prompt and prints the
// continuation and its speed.
//
//   joule-generate --model DIR (--prompt TEXT | --prompt-ids 1,2,3) [--max-tokens N]
//                  [--temperature T] [--top-p P] [--top-k K] [--seed S] [--threads N]
#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/status.h"
#include "coordinator/tokenizer/tokenizer.h"
#include "worker/engine/engine.h"

namespace joule {
namespace {

struct Args {
  std::string model;
  std::string prompt;
  std::string prompt_ids;
  SamplingParams sampling;
  int threads = 0;
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

absl::Status Run(const Args& args) {
  auto tok = tokenizer::LoadTokenizer(args.model);
  std::vector<int32_t> prompt;
  if (!args.prompt_ids.empty()) {
    ASSIGN_OR_RETURN(prompt, ParseIds(args.prompt_ids));
  } else {
    if (!tok.ok()) return Annotate(tok.status(), "--prompt needs the model's tokenizer (or use --prompt-ids)");
    ASSIGN_OR_RETURN(prompt, (*tok)->Encode(args.prompt));
  }
  const auto t_load = std::chrono::steady_clock::now();
  ASSIGN_OR_RETURN(auto model, Model::Load(args.model, {.num_threads = args.threads}));
  ASSIGN_OR_RETURN(auto engine, Engine::Create(model.get(), EngineOptions{}));
  const double load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_load).count();
  RETURN_IF_ERROR(engine->Add({.id = 1, .prompt = prompt, .sampling = args.sampling}));

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

void Usage() {
  std::fprintf(stderr,
               "usage: joule-generate --model DIR (--prompt TEXT | --prompt-ids 1,2,3)\n"
               "                      [--max-tokens N] [--temperature T] [--top-p P] [--top-k K]\n"
               "                      [--seed S] [--threads N] [--ignore-eos]\n"
               "temperature defaults to 0 (greedy).\n");
}

}  // namespace
}  // namespace joule

int main(int argc, char** argv) {
  joule::Args args;
  args.sampling.temperature = 0.0f;
  args.sampling.max_tokens = 32;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "missing value for %s\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    auto number = [&](auto* out) {
      std::string v = value();
      bool ok;
      if constexpr (std::is_floating_point_v<std::remove_pointer_t<decltype(out)>>) ok = absl::SimpleAtof(v, out);
      else ok = absl::SimpleAtoi(v, out);
      if (!ok) {
        std::fprintf(stderr, "%s: '%s' is not a number\n", a.c_str(), v.c_str());
        std::exit(2);
      }
    };
    if (a == "--model") args.model = value();
    else if (a == "--prompt") args.prompt = value();
    else if (a == "--prompt-ids") args.prompt_ids = value();
    else if (a == "--max-tokens") number(&args.sampling.max_tokens);
    else if (a == "--temperature") number(&args.sampling.temperature);
    else if (a == "--top-p") number(&args.sampling.top_p);
    else if (a == "--top-k") number(&args.sampling.top_k);
    else if (a == "--threads") number(&args.threads);
    else if (a == "--ignore-eos") args.sampling.ignore_eos = true;
    else if (a == "--seed") {
      uint64_t s;
      number(&s);
      args.sampling.seed = s;
    } else if (a == "--help" || a == "-h") {
      joule::Usage();
      return 0;
    } else {
      std::fprintf(stderr, "unknown argument '%s'\n", a.c_str());
      joule::Usage();
      return 2;
    }
  }
  if (args.model.empty() || (args.prompt.empty() == args.prompt_ids.empty())) {
    joule::Usage();
    return 2;
  }
  absl::Status s = joule::Run(args);
  if (!s.ok()) {
    std::fprintf(stderr, "joule-generate: %s\n", std::string(s.message()).c_str());
    return 1;
  }
  return 0;
}
