#include "coordinator/http/openai_response.h"

#include "nlohmann/json.hpp"

namespace joule::http {
namespace {

using Json = nlohmann::json;

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

}  // namespace

std::string CompletionJson(const ResponseHeader& header, std::string_view text,
                           std::string_view finish_reason, const Usage& usage) {
  Json j = Base(header, IsChat(header) ? "chat.completion" : "text_completion");
  Json choice = {{"index", 0}, {"finish_reason", FinishReason(finish_reason)}, {"logprobs", nullptr}};
  if (IsChat(header)) {
    choice["message"] = {{"role", "assistant"}, {"content", std::string(text)}};
  } else {
    choice["text"] = std::string(text);
  }
  j["choices"] = Json::array({choice});
  j["usage"] = UsageJson(usage);
  return Dump(j);
}

std::string ChunkJson(const ResponseHeader& header, const ChunkFields& f) {
  Json j = Base(header, IsChat(header) ? "chat.completion.chunk" : "text_completion");
  Json choice = {{"index", 0}, {"finish_reason", FinishReason(f.finish_reason)}, {"logprobs", nullptr}};
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
