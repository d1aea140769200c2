#!/usr/bin/env bash
# The main job on the embedded default (software keystore), from a fresh machine:
# install anyhsm, create a keystore, create a key, sign, verify, show health and
# verify the audit log, printing each step. Work happens in ./demo (or $1).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$repo/scripts/bootstrap.sh"
anyhsm="$repo/.venv/bin/anyhsm"
dir="${1:-$repo/demo}"
if [ -e "$dir" ]; then
    echo "demo: $dir exists; remove it or pass another directory" >&2
    exit 2
fi
# A demo passphrase in a 0600 file (never on the command line). Real deployments
# use ANYHSM_PASSPHRASE from a secret store, a passphrase file, or a TPM.
umask 077
mkdir -p "$dir"
pwfile="$dir/.passphrase"
head -c 32 /dev/urandom | base64 > "$pwfile"
step() { printf '\n== %s\n$ %s\n' "$1" "${*:2}"; "${@:2}"; }
step "create a software keystore, config and audit log" \
    "$anyhsm" --passphrase-file "$pwfile" init --dir "$dir/deployment" --network regtest
export ANYHSM_CONFIG="$dir/deployment/anyhsm.toml"
step "create a secp256k1 key" "$anyhsm" --passphrase-file "$pwfile" key create --label demo-key
digest="$(printf 'anyhsm demo' | sha256sum | cut -d' ' -f1)"
sig="$("$anyhsm" --passphrase-file "$pwfile" sign --key demo-key --digest "$digest")"
printf '\n== sign sha256("anyhsm demo") = %s\n%s\n' "$digest" "$sig"
step "verify the signature" "$anyhsm" --passphrase-file "$pwfile" verify --key demo-key \
    --digest "$digest" --signature "$sig"
step "show health (active provider, security level, each provider's status)" \
    "$anyhsm" --passphrase-file "$pwfile" health
step "verify the tamper-evident audit log" "$anyhsm" --passphrase-file "$pwfile" audit verify
printf '\ndemo: done; everything is in %s\n' "$dir"
