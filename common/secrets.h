// Unguessable identifiers and constant-time secret comparison, from OpenSSL's
// CSPRNG and digests: request ids, caller identities and API keys.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace joule {

// `bytes` random bytes from OpenSSL's CSPRNG as lowercase hex (2 * bytes
// characters). Aborts if the CSPRNG fails: a predictable id is worse than none.
std::string RandomHex(int bytes);

// "PREFIX-" and 128 random bits in hex: "chatcmpl-3f1c...". Nobody can guess
// another request's id from their own.
std::string NewRequestId(std::string_view prefix);

// Whether a == b, in time independent of where they differ and of their
// lengths: compares SHA-256 digests with CRYPTO_memcmp.
bool SecretEquals(std::string_view a, std::string_view b);

// Whether `candidate` equals any of `secrets`; compares with every one (no
// early exit), so the time does not tell which key matched or how many exist.
bool MatchesAnySecret(std::string_view candidate, const std::vector<std::string>& secrets);

// Secrets from a file, one per line; blank lines and lines starting with '#'
// are skipped, surrounding whitespace is trimmed. InvalidArgument naming
// `flag` when the file cannot be read or holds none.
absl::StatusOr<std::vector<std::string>> ReadSecretsFile(const std::string& path, std::string_view flag);

}  // namespace joule
