#!/usr/bin/env bash
# Install what the TPM provider and its tests need on a fresh Debian 12 machine:
# the swtpm emulator, tpm2-tools, the TSS2 libraries and headers, a C toolchain,
# and tpm2-pytss (built from source against libtss2) into the given Python.
#
# Usage: scripts/install-tpm.sh [PYTHON]
#   PYTHON defaults to $PYTHON, else <repo>/.venv/bin/python.
# Idempotent: apt is only touched when a package is missing (apt-get update runs
# at most once), pip only when tpm2_pytss does not import. Needs root (or sudo)
# for apt; runs non-interactively (CI=true, no stdin).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
PYTHON="${1:-${PYTHON:-$repo/.venv/bin/python}}"

export DEBIAN_FRONTEND=noninteractive

# swtpm + swtpm-tools: the emulator; tpm2-tools: handy for operators and debugging;
# libtss2-dev + pkg-config + gcc: tpm2-pytss compiles a cffi module against libtss2
# (it links the ESYS, MU, RC, TCTI loader and the swtpm/device TCTIs at run time).
# libffi-dev: cffi may need to build if no wheel fits; python3-dev is not needed when
# PYTHON has its own headers (pyenv, venv of a Debian python with python3-dev).
packages=(swtpm swtpm-tools tpm2-tools libtss2-dev libtss2-tcti-swtpm0 libtss2-tcti-device0
          libtss2-tctildr0 pkg-config gcc libffi-dev)

sudo_cmd=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        sudo_cmd=(sudo -n)
    fi
fi

missing=()
for p in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done

# The Python headers: pip builds a C extension, so Python.h must exist for PYTHON.
if [ -x "$PYTHON" ] || command -v "$PYTHON" >/dev/null 2>&1; then
    inc="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
    if [ ! -f "$inc/Python.h" ]; then
        case "$inc" in
            /usr/include/*) missing+=(python3-dev) ;;
            *) echo "install-tpm: $inc/Python.h is missing and is not a Debian path; install the headers of $PYTHON" >&2 ;;
        esac
    fi
else
    echo "install-tpm: python interpreter '$PYTHON' not found; pass it as the first argument" >&2
    exit 2
fi

if [ "${#missing[@]}" -gt 0 ]; then
    echo "install-tpm: installing missing Debian packages: ${missing[*]}"
    "${sudo_cmd[@]}" apt-get update -q </dev/null
    "${sudo_cmd[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null
else
    echo "install-tpm: Debian packages already present"
fi

if "$PYTHON" -c 'import tpm2_pytss' >/dev/null 2>&1; then
    echo "install-tpm: tpm2-pytss already importable"
else
    echo "install-tpm: installing tpm2-pytss into $PYTHON"
    "$PYTHON" -m pip install --disable-pip-version-check -q 'tpm2-pytss>=2.3' </dev/null
fi

"$PYTHON" - <<'PY'
import importlib.metadata
import tpm2_pytss  # noqa: F401
from tpm2_pytss import ESAPI, TCTILdr  # noqa: F401

print("install-tpm: tpm2-pytss", importlib.metadata.version("tpm2-pytss"), "imports")
PY
command -v swtpm >/dev/null
echo "install-tpm: swtpm $(swtpm --version 2>&1 | head -n1)"
