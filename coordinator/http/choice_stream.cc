#include "coordinator/http/choice_stream.h"

#include <cmath>
#include <optional>
#include <utility>

namespace joule::http {

ChoiceStream::ChoiceStream(const tokenizer::Tokenizer& tokenizer, Options options)
    : tokenizer_(tokenizer), options_(std::move(options)), text_(tokenizer, options_.stop) {}

TokenLogprobEntry ChoiceStream::Entry(int32_t id, const v1::TokenLogprob* logprob, int64_t text_offset) const {
  TokenLogprobEntry e;
  e.bytes = tokenizer_.TokenBytes(id);
  e.token = TokenDisplayText(e.bytes, options_.legacy);
  e.text_offset = text_offset;
  // NaN: nothing predicts the first prompt token.
  if (logprob == nullptr || std::isnan(logprob->logprob())) return e;
  e.logprob = logprob->logprob();
  e.top.reserve(logprob->top_size());
  for (const v1::TopLogprob& t : logprob->top()) {
    std::string bytes = tokenizer_.TokenBytes(t.token_id());
    std::string token = TokenDisplayText(bytes, options_.legacy);
    e.top.push_back({.token = std::move(token), .bytes = std::move(bytes), .logprob = t.logprob()});
  }
  return e;
}

void ChoiceStream::Echo(std::string_view text, const std::vector<int32_t>& ids,
                        const google::protobuf::RepeatedPtrField<v1::TokenLogprob>& prompt_logprobs,
                        Delta* out) {
  out->text.append(text);
  echo_code_points_ = CodePoints(text);
  if (!options_.logprobs) return;
  // Offsets into the prompt's text as written (special tokens included). A
  // token the tokenizer added (DeepSeek-V3's BOS) is not in that text: it sits
  // where the text goes on, with no width, so offsets stay within the text.
  tokenizer::IncrementalDecoder decoder(tokenizer_);
  int64_t offset = 0;
  size_t at = 0;  // bytes of `text` accounted for
  for (size_t i = 0; i < ids.size(); ++i) {
    const v1::TokenLogprob* lp = nullptr;
    if (i < static_cast<size_t>(prompt_logprobs.size()) && prompt_logprobs[i].token_id() == ids[i]) {
      lp = &prompt_logprobs[i];
    }
    out->logprobs.push_back(Entry(ids[i], lp, offset));
    const std::string piece = decoder.Push(ids[i]);
    if (text.substr(at).starts_with(piece)) {
      at += piece.size();
      offset += CodePoints(piece);
    }
  }
}

void ChoiceStream::Push(int32_t id, const v1::TokenLogprob* logprob, Delta* out) {
  if (logprob != nullptr) cumulative_logprob_ += logprob->logprob();
  const int64_t offset = echo_code_points_ + text_.code_points();
  out->text += text_.Push(id);
  if (options_.logprobs && !tokenizer_.IsSpecial(id)) out->logprobs.push_back(Entry(id, logprob, offset));
}

}  // namespace joule::http
