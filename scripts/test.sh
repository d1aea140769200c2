#!/usr/bin/env bash
# Install everything the tests need (Python deps, SoftHSM2, swtpm + tpm2-pytss) and run
# lint, type checks and the whole test suite. This is what CI runs (.ci/run).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
export DEBIAN_FRONTEND=noninteractive
"$repo/scripts/bootstrap.sh" dev,pkcs11,server
py="$repo/.venv/bin/python"
if [ -x "$repo/scripts/install-softhsm.sh" ] || [ -f "$repo/scripts/install-softhsm.sh" ]; then
    bash "$repo/scripts/install-softhsm.sh"
fi
bash "$repo/scripts/install-tpm.sh" "$py"

echo "== ruff"
"$repo/.venv/bin/ruff" check src/ tests/ benchmarks/
"$repo/.venv/bin/ruff" format --check src/
echo "== mypy --strict src/"
"$repo/.venv/bin/mypy" src/
echo "== pytest"
"$repo/.venv/bin/pytest" -q -p no:cacheprovider "$@"
