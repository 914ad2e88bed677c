#include "common/secrets.h"

#include <openssl/crypto.h>
#include <openssl/rand.h>
#include <openssl/sha.h>

#include <cstdio>
#include <cstdlib>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/file.h"

namespace joule {

std::string RandomHex(int bytes) {
  std::string raw(static_cast<size_t>(bytes), '\0');
  if (RAND_bytes(reinterpret_cast<unsigned char*>(raw.data()), bytes) != 1) {
    std::fprintf(stderr, "fatal: OpenSSL RAND_bytes failed; cannot make an unguessable id\n");
    std::abort();
  }
  return absl::BytesToHexString(raw);
}

std::string NewRequestId(std::string_view prefix) {
  return absl::StrCat(absl::string_view(prefix.data(), prefix.size()), "-", RandomHex(16));
}

namespace {

using Digest = unsigned char[SHA256_DIGEST_LENGTH];

void Sha256(std::string_view s, Digest out) {
  SHA256(reinterpret_cast<const unsigned char*>(s.data()), s.size(), out);
}

}  // namespace

bool SecretEquals(std::string_view a, std::string_view b) {
  // Digests have one length, so neither length nor content shortens the compare.
  Digest da, db;
  Sha256(a, da);
  Sha256(b, db);
  return CRYPTO_memcmp(da, db, SHA256_DIGEST_LENGTH) == 0;
}

bool MatchesAnySecret(std::string_view candidate, const std::vector<std::string>& secrets) {
  bool match = false;
  for (const std::string& secret : secrets) match |= SecretEquals(candidate, secret);
  return match;
}

absl::StatusOr<std::vector<std::string>> ReadSecretsFile(const std::string& path, std::string_view flag) {
  const absl::string_view name(flag.data(), flag.size());
  absl::StatusOr<std::string> text = ReadFile(path);
  if (!text.ok()) return absl::InvalidArgumentError(absl::StrCat(name, ": ", text.status().message()));
  std::vector<std::string> secrets;
  for (absl::string_view line : absl::StrSplit(*text, '\n')) {
    line = absl::StripAsciiWhitespace(line);
    if (line.empty() || line.front() == '#') continue;
    secrets.emplace_back(line);
  }
  if (secrets.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(name, ": ", path, " holds no key (one per line; # comments)"));
  }
  return secrets;
}

}  // namespace joule
