"""The package's promises: `import anyhsm` loads no optional backend, the public names
exist, and a chain naming a missing backend says which extra to install."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def test_import_loads_no_optional_backend() -> None:
    code = (
        "import sys, anyhsm, anyhsm.bitcoin, anyhsm.cli.main;"
        "bad = [m for m in ('pkcs11', 'tpm2_pytss', 'embit') if m in sys.modules];"
        "assert not bad, bad"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_public_contract_names() -> None:
    import anyhsm
    from anyhsm.bitcoin import ExtendedKey, Psbt, PsbtError, finalize_psbt, sign_psbt

    for name in ("open_hsm", "Config", "Hsm", "KeyInfo", "SigScheme", "SecurityLevel", "HsmError"):
        assert hasattr(anyhsm, name), name
    for method in (
        "generate_key",
        "import_key",
        "list_keys",
        "public_key",
        "sign",
        "verify",
        "health",
        "reload",
        "close",
    ):
        assert callable(getattr(anyhsm.Hsm, method)), method
    assert isinstance(anyhsm.Hsm.active_provider, property)
    assert isinstance(anyhsm.Hsm.security_level, property)
    assert {"id", "label", "provider", "public_key"} <= set(anyhsm.KeyInfo.__dataclass_fields__)
    assert callable(Psbt.parse) and callable(ExtendedKey.parse)
    assert issubclass(PsbtError, anyhsm.HsmError)
    assert callable(sign_psbt) and callable(finalize_psbt)


def test_missing_backend_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """python-pkcs11 absent: opening the provider says which extra to install."""
    from anyhsm.errors import ProviderNotInstalled
    from anyhsm.factory import load_provider_class
    from anyhsm.provider import ProviderContext
    from anyhsm.types import Environment, Network

    monkeypatch.setitem(sys.modules, "pkcs11", None)
    cls = load_provider_class("pkcs11")
    settings: dict[str, object] = {"module": sys.executable, "token_label": "x"}
    provider = cls(ProviderContext(Environment.DEVELOPMENT, Network.REGTEST, tmp_path, settings))
    monkeypatch.setenv("ANYHSM_PKCS11_PIN", "1234")
    with pytest.raises(ProviderNotInstalled) as e:
        provider.open()
    assert "pip install 'anyhsm[pkcs11]'" in str(e.value)
