#!/usr/bin/env bash
# Throwaway secrets for a local or test cluster: a CA, one certificate that
# every process (coordinator, workers, joule-cli) presents as server and as
# client, and a random cluster token. Valid for 7 days; never for production.
#   make_secrets.sh DIR [SAN...]
# writes DIR/ca.pem, DIR/node.pem, DIR/node.key and DIR/cluster-token (the CA's
# key is deleted: nothing more can be signed). The certificate names
# IP:127.0.0.1 and DNS:localhost, and every SAN given (e.g. IP:10.0.0.2).
set -euo pipefail
dir="$1"
shift
sans="IP:127.0.0.1,DNS:localhost"
for san in "$@"; do sans+=",$san"; done
mkdir -p "$dir"
umask 077
ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
openssl req -x509 "${ec[@]}" -days 7 -subj "/CN=joule throwaway CA" \
  -keyout "$dir/ca.key" -out "$dir/ca.pem" 2>/dev/null
openssl req "${ec[@]}" -subj "/CN=joule node" -keyout "$dir/node.key" -out "$dir/node.csr" 2>/dev/null
openssl x509 -req -in "$dir/node.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" -CAcreateserial \
  -days 7 -out "$dir/node.pem" -extfile <(printf '%s\n' \
    "subjectAltName=$sans" "extendedKeyUsage=serverAuth,clientAuth" "basicConstraints=CA:FALSE" \
    "keyUsage=digitalSignature") 2>/dev/null
openssl rand -hex 32 >"$dir/cluster-token"
rm -f "$dir/ca.key" "$dir/ca.srl" "$dir/node.csr"
