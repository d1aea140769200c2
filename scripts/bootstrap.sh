#!/usr/bin/env bash
# Create the project's virtual environment (.venv) and install anyhsm into it.
# Usage: scripts/bootstrap.sh [EXTRAS]   e.g. scripts/bootstrap.sh dev,pkcs11
# Idempotent; needs python3 >= 3.11 with venv and pip.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
extras="${1:-}"
PY="${ANYHSM_BOOTSTRAP_PYTHON:-python3}"
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "bootstrap: $PY is older than Python 3.11" >&2
    exit 2
fi
if [ ! -x "$repo/.venv/bin/python" ]; then
    "$PY" -m venv "$repo/.venv"
fi
"$repo/.venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip </dev/null
target="$repo"
[ -n "$extras" ] && target="$repo[$extras]"
"$repo/.venv/bin/python" -m pip install -q --disable-pip-version-check -e "$target" </dev/null
echo "bootstrap: anyhsm installed in $repo/.venv${extras:+ with extras [$extras]}"
