#include "common/options.h"

#include <cstdio>
#include <cstdlib>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace joule {
namespace {

template <class... F>
struct Overloaded : F... {
  using F::operator()...;
};
template <class... F>
Overloaded(F...) -> Overloaded<F...>;

std::string FlagName(absl::string_view name) {
  std::string out(name);
  for (char& c : out) {
    if (c == '_') c = '-';
  }
  return out;
}

std::string EnvName(const std::string& prefix, absl::string_view name) {
  std::string out = absl::StrCat(prefix, absl::AsciiStrToUpper(name));
  for (char& c : out) {
    if (c == '-') c = '_';
  }
  return out;
}

const char* TypeName(const Option::Field& field) {
  return std::visit(Overloaded{[](std::string*) { return "string"; }, [](int*) { return "int"; },
                               [](int64_t*) { return "int64"; }, [](uint64_t*) { return "uint64"; },
                               [](float*) { return "float"; }, [](double*) { return "double"; },
                               [](bool*) { return "bool"; }},
                    field);
}

std::string Value(const Option::Field& field) {
  return std::visit(Overloaded{[](std::string* v) { return *v; },
                               [](bool* v) { return std::string(*v ? "true" : "false"); },
                               [](auto* v) { return absl::StrCat(*v); }},
                    field);
}

// Empty when `text` was stored, else what is wrong with it ("is not an integer").
std::string Assign(const Option::Field& field, const std::string& text) {
  return std::visit(
      Overloaded{[&](std::string* v) -> std::string {
                   *v = text;
                   return "";
                 },
                 [&](uint64_t* v) -> std::string {
                   return absl::SimpleAtoi(text, v) ? "" : "is not a non-negative integer";
                 },
                 [&](float* v) -> std::string { return absl::SimpleAtof(text, v) ? "" : "is not a number"; },
                 [&](double* v) -> std::string { return absl::SimpleAtod(text, v) ? "" : "is not a number"; },
                 [&](bool* v) -> std::string { return absl::SimpleAtob(text, v) ? "" : "is not true or false"; },
                 [&](auto* v) -> std::string { return absl::SimpleAtoi(text, v) ? "" : "is not an integer"; }},
      field);
}

const Option* Find(const std::vector<Option>& options, const std::string& flag) {
  for (const Option& o : options) {
    if (FlagName(o.name) == flag) return &o;
  }
  return nullptr;
}

}  // namespace

std::string OptionsUsage(const OptionsSpec& spec) {
  std::string out = absl::StrCat(spec.usage, "\n");
  if (!spec.env_prefix.empty()) {
    absl::StrAppend(&out, "Each flag can also be set in the environment as ", spec.env_prefix,
                    "<NAME> (dashes as underscores); flags win.\n");
  }
  for (const Option& o : spec.options) {
    absl::StrAppend(&out, "  --", FlagName(o.name), " (", TypeName(o.field), ", default '", Value(o.field),
                    "')\n      ", o.help, "\n");
  }
  return out;
}

std::string DescribeOptions(const std::vector<Option>& options) {
  std::string out;
  for (const Option& o : options) absl::StrAppend(&out, "  --", FlagName(o.name), "=", Value(o.field), "\n");
  return out;
}

absl::Status ParseOptions(const OptionsSpec& spec, int argc, const char* const* argv) {
  const std::string usage = OptionsUsage(spec);  // before anything is set: the defaults
  if (!spec.env_prefix.empty()) {
    for (const Option& o : spec.options) {
      const std::string env = EnvName(spec.env_prefix, o.name);
      const char* value = std::getenv(env.c_str());
      if (value == nullptr) continue;
      if (std::string error = Assign(o.field, value); !error.empty()) {
        return absl::InvalidArgumentError(
            absl::StrCat(env, " (--", FlagName(o.name), "): '", value, "' ", error));
      }
    }
  }
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") return absl::CancelledError(usage);
    if (arg.size() <= 2 || arg.rfind("--", 0) != 0) {
      return absl::InvalidArgumentError(absl::StrCat("unexpected argument '", arg, "'"));
    }
    std::string name = arg.substr(2);
    std::string value;
    const size_t eq = name.find('=');
    if (eq != std::string::npos) {
      value = name.substr(eq + 1);
      name.resize(eq);
    }
    name = FlagName(name);
    const Option* option = Find(spec.options, name);
    if (option == nullptr) return absl::InvalidArgumentError(absl::StrCat("unknown flag --", name));
    if (eq == std::string::npos) {
      if (std::holds_alternative<bool*>(option->field)) {
        value = "true";  // a bool flag alone turns it on
      } else if (i + 1 < argc) {
        value = argv[++i];
      } else {
        return absl::InvalidArgumentError(absl::StrCat("--", name, ": missing value"));
      }
    }
    if (std::string error = Assign(option->field, value); !error.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("--", name, ": '", value, "' ", error));
    }
  }
  return absl::OkStatus();
}

bool IsHelpRequest(const absl::Status& status) { return status.code() == absl::StatusCode::kCancelled; }

int ReportOptionsError(absl::string_view program, const absl::Status& status) {
  if (IsHelpRequest(status)) {
    std::fputs(std::string(status.message()).c_str(), stdout);
    return 0;
  }
  std::fprintf(stderr, "%s: %s\n(%s --help lists the flags)\n", std::string(program).c_str(),
               std::string(status.message()).c_str(), std::string(program).c_str());
  return 2;
}

}  // namespace joule
