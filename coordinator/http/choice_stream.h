// One choice of a completion as its generation's tokens arrive: the text
// (TextStream: UTF-8-safe, stop strings) and, with logprobs, one entry per
// output token with its place in the choice's text. Special tokens, which the
// text leaves out, have no entry; an echoed prompt comes first. Not
// thread-safe: its owner serializes the calls.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "coordinator/http/openai_response.h"
#include "coordinator/http/text_stream.h"
#include "coordinator/tokenizer/tokenizer.h"
#include "proto/joule/v1/generate.pb.h"

namespace joule::http {

class ChoiceStream {
 public:
  struct Options {
    std::vector<std::string> stop;
    bool logprobs = false;  // entries for the client
    bool legacy = false;    // completions' spelling of partial tokens ("bytes:\xe2")
  };
  // `tokenizer` must outlive the stream.
  ChoiceStream(const tokenizer::Tokenizer& tokenizer, Options options);

  // What one call adds to the choice.
  struct Delta {
    std::string text;
    std::vector<TokenLogprobEntry> logprobs;  // only with Options::logprobs
  };

  // echo: the prompt goes first. With logprobs, an entry per prompt token
  // whose log probability comes from the worker's prompt_logprobs (the first
  // token has none, nor has any the worker left out).
  void Echo(std::string_view text, const std::vector<int32_t>& ids,
            const google::protobuf::RepeatedPtrField<v1::TokenLogprob>& prompt_logprobs, Delta* out);

  // One generated token; `logprob` is null when the worker was not asked for
  // log probabilities. Counts toward cumulative_logprob() whether or not the
  // token has an entry.
  void Push(int32_t id, const v1::TokenLogprob* logprob, Delta* out);

  // End of generation: the text still held back.
  std::string Flush() { return text_.Flush(); }
  bool stopped() const { return text_.stopped(); }

  // Sum of the generated tokens' log probabilities (best_of ranks by it).
  double cumulative_logprob() const { return cumulative_logprob_; }

 private:
  TokenLogprobEntry Entry(int32_t id, const v1::TokenLogprob* logprob, int64_t text_offset) const;

  const tokenizer::Tokenizer& tokenizer_;
  const Options options_;
  TextStream text_;
  int64_t echo_code_points_ = 0;
  double cumulative_logprob_ = 0;
};

}  // namespace joule::http
