"""Falling back from an absent PKCS#11 module is cheap (issue 10: < 10 ms in a fresh CLI
process, measured by benchmarks/bench_cli.py): the provider checks that the module file
exists before it imports its connection modules or python-pkcs11."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

_PROBE = """
import json, sys
from pathlib import Path
from anyhsm.errors import ProviderUnavailable
from anyhsm.provider import ProviderContext
from anyhsm.providers.pkcs11.provider import Pkcs11Provider
from anyhsm.types import Environment, Network

ctx = ProviderContext(
    environment=Environment.DEVELOPMENT,
    network=Network.REGTEST,
    config_dir=Path(sys.argv[1]),
    settings={"module": sys.argv[1] + "/no-such-module.so", "token_label": "t"},
    timeout_s=2.0,
)
provider = Pkcs11Provider(ctx)
try:
    provider.open()
except ProviderUnavailable as e:
    message = e.message
provider.close()
loaded = sorted(m for m in sys.modules if m == "pkcs11" or m.startswith("anyhsm.providers.pkcs11."))
print(json.dumps({"message": message, "loaded": loaded}))
"""


def test_an_absent_module_is_refused_before_anything_is_imported(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, str(tmp_path)], capture_output=True, text=True, check=True
    )
    result = json.loads(out.stdout)
    assert result["message"] == f"PKCS#11 module not found: {tmp_path}/no-such-module.so"
    assert result["loaded"] == [
        "anyhsm.providers.pkcs11.provider",
        "anyhsm.providers.pkcs11.settings",
    ]
