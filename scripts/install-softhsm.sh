#!/usr/bin/env bash
# Install SoftHSM2 (the PKCS#11 token the pkcs11 provider is tested on) when it is
# missing, and print the path of its PKCS#11 module.
#
# Usage: scripts/install-softhsm.sh
# Idempotent: apt is only touched when softhsm2-util or libsofthsm2.so is missing
# (apt-get update runs at most once). Needs root (or passwordless sudo) for apt; runs
# non-interactively (CI=true, no stdin). Installs no Python packages: python-pkcs11
# comes from the project's `pkcs11` extra (pip install 'anyhsm[pkcs11]').
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive

candidates=(
    /usr/lib/softhsm/libsofthsm2.so
    /usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so
    /usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so
    /usr/local/lib/softhsm/libsofthsm2.so
    /usr/lib64/pkcs11/libsofthsm2.so
    /usr/lib/pkcs11/libsofthsm2.so
)

find_module() {
    local p
    for p in "${candidates[@]}" /usr/lib/*/softhsm/libsofthsm2.so; do
        if [ -f "$p" ]; then
            echo "$p"
            return 0
        fi
    done
    if command -v dpkg-query >/dev/null 2>&1; then
        p="$(dpkg-query -L libsofthsm2 2>/dev/null | grep -m1 '/libsofthsm2\.so$' || true)"
        if [ -n "$p" ] && [ -f "$p" ]; then
            echo "$p"
            return 0
        fi
    fi
    return 1
}

sudo_cmd=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        sudo_cmd=(sudo -n)
    fi
fi

if command -v softhsm2-util >/dev/null 2>&1 && module="$(find_module)"; then
    echo "install-softhsm: SoftHSM2 already present"
else
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "install-softhsm: SoftHSM2 is missing and apt-get is not available;" \
             "install SoftHSM2 with your package manager" >&2
        exit 2
    fi
    echo "install-softhsm: installing the Debian package softhsm2"
    "${sudo_cmd[@]}" apt-get update -q </dev/null
    "${sudo_cmd[@]}" apt-get install -y -q --no-install-recommends softhsm2 </dev/null
    if ! command -v softhsm2-util >/dev/null 2>&1; then
        echo "install-softhsm: softhsm2-util is still missing after installing softhsm2" >&2
        exit 1
    fi
    if ! module="$(find_module)"; then
        echo "install-softhsm: libsofthsm2.so is still missing after installing softhsm2" >&2
        exit 1
    fi
fi

echo "install-softhsm: $(softhsm2-util --version 2>/dev/null | head -n1 | sed 's/^/softhsm2-util /')"
echo "install-softhsm: module $module"
