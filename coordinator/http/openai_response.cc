#include "coordinator/http/openai_response.h"

#include <cmath>

#include "nlohmann/json.hpp"

namespace joule::http {
namespace {

// Insertion order: fields read as OpenAI writes them, and completions' top_logprobs
// objects most likely first, as a Python client's dict keeps them.
using Json = nlohmann::ordered_json;

// Text is valid UTF-8 by construction (the detokenizer replaces bad bytes), but
// echoed client strings might not be: never let dump() throw.
std::string Dump(const Json& j) { return j.dump(-1, ' ', false, Json::error_handler_t::replace); }

Json Base(const ResponseHeader& h, const char* object) {
  return Json{{"id", h.id},
              {"object", object},
              {"created", h.created},
              {"model", h.model},
              {"service_tier", std::string(scheduler::OpenAiServiceTier(h.tier))},
              {"system_fingerprint", nullptr}};
}

Json UsageJson(const Usage& u) {
  Json j{{"prompt_tokens", u.prompt_tokens},
         {"completion_tokens", u.completion_tokens},
         {"total_tokens", u.prompt_tokens + u.completion_tokens},
         {"prompt_tokens_details", Json{{"cached_tokens", u.cached_tokens}}}};
  if (u.energy_joules.has_value()) {
    j["energy_joules"] = *u.energy_joules;
    j["energy_source"] = u.energy_source;
  }
  if (u.resumed_tokens > 0) j["resumed_tokens"] = u.resumed_tokens;
  return j;
}

Json FinishReason(std::string_view r) { return r.empty() ? Json() : Json(std::string(r)); }

bool IsChat(const ResponseHeader& h) { return h.endpoint == Endpoint::kChatCompletions; }

// JSON has no infinities: a token the sampler ruled out (top-k, top-p) shows
// OpenAI's "very unlikely", -9999.
double Finite(double logprob) { return std::isfinite(logprob) ? logprob : -9999.0; }

// null for an id the tokenizer does not know (a model's padded vocabulary):
// "no bytes representation" in OpenAI's words.
Json ByteArray(const std::string& bytes) {
  if (bytes.empty()) return nullptr;
  Json a = Json::array();
  for (char c : bytes) a.push_back(static_cast<int>(static_cast<uint8_t>(c)));
  return a;
}

// Chat: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}], "refusal": null}.
Json ChatLogprobs(const std::vector<TokenLogprobEntry>& entries) {
  Json content = Json::array();
  for (const TokenLogprobEntry& e : entries) {
    Json top = Json::array();
    for (const TopLogprob& t : e.top) {
      top.push_back({{"token", t.token}, {"logprob", Finite(t.logprob)}, {"bytes", ByteArray(t.bytes)}});
    }
    content.push_back({{"token", e.token},
                       {"logprob", Finite(e.logprob.value_or(-9999.0))},
                       {"bytes", ByteArray(e.bytes)},
                       {"top_logprobs", std::move(top)}});
  }
  return Json{{"content", std::move(content)}, {"refusal", nullptr}};
}

// Completions: {"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}.
Json CompletionLogprobs(const std::vector<TokenLogprobEntry>& entries) {
  Json tokens = Json::array(), token_logprobs = Json::array(), top_logprobs = Json::array(),
       offsets = Json::array();
  for (const TokenLogprobEntry& e : entries) {
    tokens.push_back(e.token);
    offsets.push_back(e.text_offset);
    if (!e.logprob.has_value()) {
      token_logprobs.push_back(nullptr);
      top_logprobs.push_back(nullptr);
      continue;
    }
    token_logprobs.push_back(Finite(*e.logprob));
    Json top = Json::object();
    for (const TopLogprob& t : e.top) {
      if (!top.contains(t.token)) top[t.token] = Finite(t.logprob);  // two ids may show the same text
    }
    top_logprobs.push_back(std::move(top));
  }
  return Json{{"tokens", std::move(tokens)},
              {"token_logprobs", std::move(token_logprobs)},
              {"top_logprobs", std::move(top_logprobs)},
              {"text_offset", std::move(offsets)}};
}

Json LogprobsJson(const ResponseHeader& h, const std::vector<TokenLogprobEntry>* entries) {
  if (entries == nullptr) return nullptr;
  return IsChat(h) ? ChatLogprobs(*entries) : CompletionLogprobs(*entries);
}

}  // namespace

std::string CompletionJson(const ResponseHeader& header, const std::vector<ChoiceResult>& choices,
                           const Usage& usage) {
  Json j = Base(header, IsChat(header) ? "chat.completion" : "text_completion");
  Json out = Json::array();
  for (const ChoiceResult& c : choices) {
    Json choice = {{"index", c.index}};
    if (IsChat(header)) {
      choice["message"] = {{"role", "assistant"}, {"content", c.text}};
    } else {
      choice["text"] = c.text;
    }
    choice["logprobs"] = LogprobsJson(header, c.has_logprobs ? &c.logprobs : nullptr);
    choice["finish_reason"] = FinishReason(c.finish_reason);
    out.push_back(std::move(choice));
  }
  j["choices"] = std::move(out);
  j["usage"] = UsageJson(usage);
  return Dump(j);
}

std::string ChunkJson(const ResponseHeader& header, const ChunkFields& f) {
  Json j = Base(header, IsChat(header) ? "chat.completion.chunk" : "text_completion");
  Json choice = {{"index", f.index}};
  if (IsChat(header)) {
    Json delta = Json::object();
    if (f.role_only) {
      delta = {{"role", "assistant"}, {"content", ""}};
    } else if (!f.text.empty() || f.finish_reason.empty()) {
      delta["content"] = std::string(f.text);
    }
    choice["delta"] = delta;
  } else {
    choice["text"] = std::string(f.text);
  }
  choice["logprobs"] = LogprobsJson(header, f.logprobs);
  choice["finish_reason"] = FinishReason(f.finish_reason);
  j["choices"] = Json::array({choice});
  if (f.usage_null) j["usage"] = nullptr;
  return Dump(j);
}

std::string UsageChunkJson(const ResponseHeader& header, const Usage& usage) {
  Json j = Base(header, IsChat(header) ? "chat.completion.chunk" : "text_completion");
  j["choices"] = Json::array();
  j["usage"] = UsageJson(usage);
  return Dump(j);
}

std::string SseEvent(std::string_view json) {
  std::string out;
  out.reserve(json.size() + 8);
  out.append("data: ").append(json).append("\n\n");
  return out;
}

std::string ModelJson(std::string_view name, int64_t created, int64_t max_context) {
  return Dump(Json{{"id", std::string(name)},
                   {"object", "model"},
                   {"created", created},
                   {"owned_by", "joule"},
                   {"max_model_len", max_context}});
}

std::string ModelListJson(std::string_view name, int64_t created, int64_t max_context) {
  return Dump(Json{{"object", "list"}, {"data", Json::array({Json::parse(ModelJson(name, created, max_context))})}});
}

}  // namespace joule::http
