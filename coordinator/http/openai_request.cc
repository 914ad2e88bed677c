#include "coordinator/http/openai_request.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "coordinator/http/api_error.h"
#include "nlohmann/json.hpp"

namespace joule::http {
namespace {

using Json = nlohmann::json;

// The JSON type name a client would recognise, for "expected X, got Y" messages.
std::string TypeName(const Json& v) {
  if (v.is_number_integer() || v.is_number_unsigned()) return "integer";
  if (v.is_number_float()) return "number";
  return v.type_name();
}

absl::Status WrongType(const std::string& param, const char* expected, const Json& got) {
  return InvalidField(param, absl::StrCat("expected ", expected, ", got ", TypeName(got)));
}

// The field's value, or nullptr when absent or null (OpenAI treats both the same).
const Json* Field(const Json& body, const char* name) {
  auto it = body.find(name);
  if (it == body.end() || it->is_null()) return nullptr;
  return &*it;
}

absl::StatusOr<std::string> GetString(const Json& v, const std::string& param) {
  if (!v.is_string()) return WrongType(param, "a string", v);
  return v.get<std::string>();
}

absl::StatusOr<int64_t> GetInteger(const Json& v, const std::string& param) {
  if (v.is_number_unsigned()) {
    const uint64_t u = v.get<uint64_t>();
    if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      return InvalidField(param, "integer out of range");
    }
    return static_cast<int64_t>(u);
  }
  if (v.is_number_integer()) return v.get<int64_t>();
  // 16.0 is an integer to a JSON client; 16.5 is not.
  if (v.is_number_float()) {
    const double d = v.get<double>();
    if (std::isfinite(d) && d == std::floor(d) && std::fabs(d) < 9.0e15) return static_cast<int64_t>(d);
  }
  return WrongType(param, "an integer", v);
}

absl::StatusOr<double> GetNumber(const Json& v, const std::string& param) {
  if (!v.is_number()) return WrongType(param, "a number", v);
  return v.get<double>();
}

absl::StatusOr<bool> GetBool(const Json& v, const std::string& param) {
  if (!v.is_boolean()) return WrongType(param, "a boolean", v);
  return v.get<bool>();
}

absl::StatusOr<std::vector<int32_t>> GetTokenIds(const Json& array, const std::string& param) {
  std::vector<int32_t> ids;
  ids.reserve(array.size());
  for (size_t i = 0; i < array.size(); ++i) {
    const std::string p = absl::StrCat(param, "[", i, "]");
    ASSIGN_OR_RETURN(int64_t id, GetInteger(array[i], p));
    if (id < 0 || id > std::numeric_limits<int32_t>::max()) {
      return InvalidField(p, absl::StrCat("token id ", id, " is out of range"));
    }
    ids.push_back(static_cast<int32_t>(id));
  }
  return ids;
}

// "prompt": "text" | ["text", ...] | [1, 2, 3] | [[1, 2, 3], ...]: one prompt,
// or several (OpenAI's batch form), each answered with its own choices.
absl::Status ParsePrompt(const Json& body, const RequestLimits& limits, CompletionRequest* out) {
  const Json* p = Field(body, "prompt");
  if (p == nullptr) return InvalidField("prompt", "required");
  if (p->is_string()) {
    out->prompts.push_back({.text = p->get<std::string>()});
    return absl::OkStatus();
  }
  if (!p->is_array()) {
    return WrongType("prompt", "a string, an array of strings, an array of token ids or an array of those", *p);
  }
  if (p->empty()) return InvalidField("prompt", "must not be empty");
  const Json& first = (*p)[0];
  if (!first.is_string() && !first.is_array()) {
    Prompt one{.is_tokens = true};
    ASSIGN_OR_RETURN(one.token_ids, GetTokenIds(*p, "prompt"));
    out->prompts.push_back(std::move(one));
    return absl::OkStatus();
  }
  if (p->size() > static_cast<size_t>(limits.max_prompts)) {
    return InvalidField("prompt", absl::StrCat("at most ", limits.max_prompts, " prompts in one request, got ",
                                               p->size()));
  }
  for (size_t i = 0; i < p->size(); ++i) {
    const Json& item = (*p)[i];
    const std::string param = absl::StrCat("prompt[", i, "]");
    if (first.is_string()) {
      if (!item.is_string()) return WrongType(param, "a string (as prompt[0])", item);
      out->prompts.push_back({.text = item.get<std::string>()});
      continue;
    }
    if (!item.is_array()) return WrongType(param, "an array of token ids (as prompt[0])", item);
    Prompt one{.is_tokens = true};
    ASSIGN_OR_RETURN(one.token_ids, GetTokenIds(item, param));
    out->prompts.push_back(std::move(one));
  }
  return absl::OkStatus();
}

// content: "text" | [{"type": "text", "text": "..."}, ...] (parts concatenated).
absl::StatusOr<std::string> ParseContent(const Json& message, const std::string& param,
                                         const std::string& role) {
  const Json* c = Field(message, "content");
  if (c == nullptr) {
    // An assistant turn that only called tools has no content; we have no tools.
    if (role == "assistant") return std::string();
    return InvalidField(param, "required");
  }
  if (c->is_string()) return c->get<std::string>();
  if (!c->is_array()) return WrongType(param, "a string or an array of content parts", *c);
  std::string text;
  for (size_t j = 0; j < c->size(); ++j) {
    const Json& part = (*c)[j];
    const std::string pp = absl::StrCat(param, "[", j, "]");
    if (!part.is_object()) return WrongType(pp, "an object", part);
    const Json* type = Field(part, "type");
    if (type == nullptr) return InvalidField(pp + ".type", "required");
    ASSIGN_OR_RETURN(std::string t, GetString(*type, pp + ".type"));
    if (t != "text") {
      return InvalidField(pp + ".type",
                          absl::StrCat("content parts of type '", t, "' are not supported; only 'text'"));
    }
    const Json* part_text = Field(part, "text");
    if (part_text == nullptr) return InvalidField(pp + ".text", "required");
    ASSIGN_OR_RETURN(std::string s, GetString(*part_text, pp + ".text"));
    text += s;
  }
  return text;
}

absl::Status ParseMessages(const Json& body, CompletionRequest* out) {
  const Json* m = Field(body, "messages");
  if (m == nullptr) return InvalidField("messages", "required");
  if (!m->is_array()) return WrongType("messages", "an array", *m);
  if (m->empty()) return InvalidField("messages", "must not be empty");
  for (size_t i = 0; i < m->size(); ++i) {
    const Json& msg = (*m)[i];
    const std::string param = absl::StrCat("messages[", i, "]");
    if (!msg.is_object()) return WrongType(param, "an object", msg);
    const Json* role_json = Field(msg, "role");
    if (role_json == nullptr) return InvalidField(param + ".role", "required");
    ASSIGN_OR_RETURN(std::string role, GetString(*role_json, param + ".role"));
    // OpenAI renamed the system role "developer" for newer models; same meaning.
    if (role == "developer") role = "system";
    if (role != "system" && role != "user" && role != "assistant") {
      return InvalidField(param + ".role",
                          absl::StrCat("'", role, "' is not supported; use system, user or assistant"));
    }
    ASSIGN_OR_RETURN(std::string content, ParseContent(msg, param + ".content", role));
    out->messages.push_back({std::move(role), std::move(content)});
  }
  return absl::OkStatus();
}

absl::Status ParseStop(const Json& body, CompletionRequest* out) {
  const Json* s = Field(body, "stop");
  if (s == nullptr) return absl::OkStatus();
  std::vector<std::string> stop;
  if (s->is_string()) {
    stop.push_back(s->get<std::string>());
  } else if (s->is_array()) {
    for (size_t i = 0; i < s->size(); ++i) {
      ASSIGN_OR_RETURN(std::string one, GetString((*s)[i], absl::StrCat("stop[", i, "]")));
      stop.push_back(std::move(one));
    }
  } else {
    return WrongType("stop", "a string or an array of strings", *s);
  }
  if (static_cast<int>(stop.size()) > kMaxStopStrings) {
    return InvalidField("stop", absl::StrCat("at most ", kMaxStopStrings, " stop strings, got ", stop.size()));
  }
  for (const std::string& one : stop) {
    if (one.empty()) return InvalidField("stop", "stop strings must not be empty");
  }
  out->stop = std::move(stop);
  return absl::OkStatus();
}

absl::StatusOr<double> GetNumberIn(const Json& v, const std::string& param, double lo, double hi) {
  ASSIGN_OR_RETURN(double d, GetNumber(v, param));
  if (!(d >= lo && d <= hi)) return InvalidField(param, absl::StrCat("must be in [", lo, ", ", hi, "], got ", d));
  return d;
}

// n, best_of (completions), and the log probabilities asked for.
absl::Status ParseChoices(const Json& body, const RequestLimits& limits, CompletionRequest* out) {
  const bool chat = out->endpoint == Endpoint::kChatCompletions;
  if (const Json* v = Field(body, "n")) {
    ASSIGN_OR_RETURN(int64_t n, GetInteger(*v, "n"));
    if (n < 1 || n > limits.max_n) {
      return InvalidField("n", absl::StrCat("must be in [1, ", limits.max_n, "], got ", n));
    }
    out->n = static_cast<int>(n);
  }
  out->best_of = out->n;
  if (const Json* v = chat ? nullptr : Field(body, "best_of")) {
    ASSIGN_OR_RETURN(int64_t best_of, GetInteger(*v, "best_of"));
    if (best_of < out->n) {
      return InvalidField("best_of", absl::StrCat("must be at least n (", out->n, "), got ", best_of));
    }
    if (best_of > limits.max_best_of) {
      return InvalidField("best_of", absl::StrCat("must be at most ", limits.max_best_of, ", got ", best_of));
    }
    out->best_of = static_cast<int>(best_of);
  }
  if (chat) {
    if (const Json* v = Field(body, "logprobs")) {
      ASSIGN_OR_RETURN(out->logprobs, GetBool(*v, "logprobs"));
    }
    if (const Json* v = Field(body, "top_logprobs")) {
      ASSIGN_OR_RETURN(int64_t top, GetInteger(*v, "top_logprobs"));
      if (top < 0 || top > limits.max_logprobs) {
        return InvalidField("top_logprobs", absl::StrCat("must be in [0, ", limits.max_logprobs, "], got ", top));
      }
      if (!out->logprobs) return InvalidField("top_logprobs", "requires logprobs: true");
      out->top_logprobs = static_cast<int>(top);
    }
    return absl::OkStatus();
  }
  // Completions: "logprobs": N asks for the tokens' log probabilities and N alternatives.
  if (const Json* v = Field(body, "logprobs")) {
    ASSIGN_OR_RETURN(int64_t top, GetInteger(*v, "logprobs"));
    if (top < 0 || top > limits.max_logprobs) {
      return InvalidField("logprobs", absl::StrCat("must be in [0, ", limits.max_logprobs, "], got ", top));
    }
    out->logprobs = true;
    out->top_logprobs = static_cast<int>(top);
  }
  if (const Json* v = Field(body, "echo")) {
    ASSIGN_OR_RETURN(out->echo, GetBool(*v, "echo"));
  }
  return absl::OkStatus();
}

absl::Status ParseLogitBias(const Json& body, const RequestLimits& limits, CompletionRequest* out) {
  const Json* v = Field(body, "logit_bias");
  if (v == nullptr) return absl::OkStatus();
  if (!v->is_object()) return WrongType("logit_bias", "an object of token id -> bias", *v);
  if (v->size() > static_cast<size_t>(limits.max_logit_bias)) {
    return InvalidField("logit_bias", absl::StrCat("at most ", limits.max_logit_bias, " entries, got ", v->size()));
  }
  for (const auto& [key, value] : v->items()) {
    int64_t id = -1;
    const bool digits = !key.empty() && key.size() <= 10 &&
                        std::all_of(key.begin(), key.end(), [](char c) { return c >= '0' && c <= '9'; });
    if (!digits || !absl::SimpleAtoi(key, &id) || id > std::numeric_limits<int32_t>::max()) {
      return InvalidField("logit_bias", absl::StrCat("key '", key, "' is not a token id"));
    }
    if (!value.is_number()) {
      return InvalidField("logit_bias",
                          absl::StrCat("bias of token ", key, ": expected a number, got ", TypeName(value)));
    }
    const double bias = value.get<double>();
    if (!(bias >= -100 && bias <= 100)) {
      return InvalidField("logit_bias", absl::StrCat("bias of token ", key, ": must be in [-100, 100], got ", bias));
    }
    out->logit_bias.emplace_back(static_cast<int32_t>(id), bias);
  }
  std::sort(out->logit_bias.begin(), out->logit_bias.end());
  return absl::OkStatus();
}

absl::Status ParsePenalties(const Json& body, CompletionRequest* out) {
  if (const Json* v = Field(body, "presence_penalty")) {
    ASSIGN_OR_RETURN(out->presence_penalty, GetNumberIn(*v, "presence_penalty", -2, 2));
  }
  if (const Json* v = Field(body, "frequency_penalty")) {
    ASSIGN_OR_RETURN(out->frequency_penalty, GetNumberIn(*v, "frequency_penalty", -2, 2));
  }
  if (const Json* v = Field(body, "repetition_penalty")) {
    ASSIGN_OR_RETURN(out->repetition_penalty, GetNumber(*v, "repetition_penalty"));
    if (!(out->repetition_penalty > 0 && out->repetition_penalty <= std::numeric_limits<float>::max())) {
      return InvalidField("repetition_penalty",
                          absl::StrCat("must be > 0 (1: off), got ", out->repetition_penalty));
    }
  }
  return absl::OkStatus();
}

absl::Status ParseSampling(const Json& body, CompletionRequest* out) {
  // Chat: max_completion_tokens replaced max_tokens; when both are given it wins.
  for (const char* name : {"max_tokens", "max_completion_tokens"}) {
    if (std::string_view(name) == "max_completion_tokens" && out->endpoint != Endpoint::kChatCompletions) {
      continue;
    }
    const Json* v = Field(body, name);
    if (v == nullptr) continue;
    ASSIGN_OR_RETURN(int64_t n, GetInteger(*v, name));
    if (n < 1) return InvalidField(name, absl::StrCat("must be at least 1, got ", n));
    out->max_tokens = n;
  }
  if (const Json* v = Field(body, "temperature")) {
    ASSIGN_OR_RETURN(out->temperature, GetNumber(*v, "temperature"));
    if (out->temperature < 0 || out->temperature > 2) {
      return InvalidField("temperature", absl::StrCat("must be in [0, 2], got ", out->temperature));
    }
  }
  if (const Json* v = Field(body, "top_p")) {
    ASSIGN_OR_RETURN(out->top_p, GetNumber(*v, "top_p"));
    if (!(out->top_p > 0 && out->top_p <= 1)) {
      return InvalidField("top_p", absl::StrCat("must be in (0, 1], got ", out->top_p));
    }
  }
  if (const Json* v = Field(body, "top_k")) {
    ASSIGN_OR_RETURN(int64_t k, GetInteger(*v, "top_k"));
    // vLLM's clients send -1 for "disabled"; we say 0.
    if (k < -1 || k > std::numeric_limits<int32_t>::max()) {
      return InvalidField("top_k", absl::StrCat("must be >= 0 (0 or -1 disable it), got ", k));
    }
    out->top_k = k < 0 ? 0 : static_cast<int32_t>(k);
  }
  if (const Json* v = Field(body, "seed")) {
    ASSIGN_OR_RETURN(int64_t seed, GetInteger(*v, "seed"));
    out->seed = static_cast<uint64_t>(seed);
  }
  return ParseStop(body, out);
}

}  // namespace

absl::StatusOr<CompletionRequest> ParseCompletionRequest(std::string_view body, Endpoint endpoint,
                                                         const RequestLimits& limits) {
  const Json j = Json::parse(body.begin(), body.end(), /*cb=*/nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) {
    return absl::InvalidArgumentError(
        "the request body is not valid JSON; send a JSON object with Content-Type: application/json");
  }
  if (!j.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat("the request body must be a JSON object, got ", TypeName(j)));
  }
  CompletionRequest out;
  out.endpoint = endpoint;
  const Json* model = Field(j, "model");
  if (model == nullptr) return InvalidField("model", "required");
  ASSIGN_OR_RETURN(out.model, GetString(*model, "model"));

  if (endpoint == Endpoint::kCompletions) {
    RETURN_IF_ERROR(ParsePrompt(j, limits, &out));
  } else {
    RETURN_IF_ERROR(ParseMessages(j, &out));
  }
  RETURN_IF_ERROR(ParseSampling(j, &out));
  RETURN_IF_ERROR(ParseChoices(j, limits, &out));
  RETURN_IF_ERROR(ParsePenalties(j, &out));
  RETURN_IF_ERROR(ParseLogitBias(j, limits, &out));

  if (const Json* v = Field(j, "stream")) {
    ASSIGN_OR_RETURN(out.stream, GetBool(*v, "stream"));
  }
  if (const Json* v = Field(j, "stream_options")) {
    if (!v->is_object()) return WrongType("stream_options", "an object", *v);
    if (!out.stream) return InvalidField("stream_options", "only allowed when stream is true");
    if (const Json* u = Field(*v, "include_usage")) {
      ASSIGN_OR_RETURN(out.include_usage, GetBool(*u, "stream_options.include_usage"));
    }
  }
  // best_of picks its choices once all are done: nothing to stream before that
  // (OpenAI refuses the combination too).
  if (out.stream && out.best_of > 1 && Field(j, "best_of") != nullptr) {
    return InvalidField("best_of", "cannot be used with stream: the best choices are known only at the end");
  }
  const int64_t prompts = endpoint == Endpoint::kCompletions ? static_cast<int64_t>(out.prompts.size()) : 1;
  if (prompts * out.best_of > limits.max_generations) {
    const char* param = out.best_of > out.n ? "best_of" : "n";
    return InvalidField(param, absl::StrCat("this request asks for ", prompts * out.best_of, " generations (",
                                            prompts, " prompts x ", out.best_of, "); at most ",
                                            limits.max_generations, " per request"));
  }
  if (const Json* v = Field(j, "ignore_eos")) {
    ASSIGN_OR_RETURN(out.ignore_eos, GetBool(*v, "ignore_eos"));
  }
  if (const Json* v = Field(j, "service_tier")) {
    ASSIGN_OR_RETURN(std::string tier, GetString(*v, "service_tier"));
    auto parsed = scheduler::ParseServiceTier(tier);
    if (!parsed.ok()) return WithParam(parsed.status(), "service_tier");
    out.tier = *parsed;
  }
  if (const Json* v = Field(j, "user")) {
    ASSIGN_OR_RETURN(out.user, GetString(*v, "user"));
  }
  return out;
}

}  // namespace joule::http
