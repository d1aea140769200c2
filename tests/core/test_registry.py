"""One provider registry (issue 10): every table that names providers derives from it,
and reading it imports no backend."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

from anyhsm import config, factory, registry
from anyhsm.types import SecurityLevel


def test_tables_derive_from_the_specs() -> None:
    assert set(factory.PROVIDERS) == set(registry.NAMES) == set(config.KNOWN_PROVIDERS)
    for spec in registry.SPECS:
        assert factory.PROVIDERS[spec.name] == spec.target
        assert factory.PROVIDER_LEVELS[spec.name] is spec.level
        assert config._PROVIDER_KEYS[spec.name] is spec.settings
        module, _, attr = spec.target.partition(":")
        assert importlib.util.find_spec(module) is not None, spec.target
        assert attr


def test_roles() -> None:
    assert registry.KEYSTORE_OPEN_ORDER == ("tpm", "pkcs11-wrapped", "software")
    assert registry.uses_token(["pkcs11-wrapped"]) and registry.uses_token(["tpm", "pkcs11"])
    assert not registry.uses_token(["tpm", "software"])
    assert registry.unattended("tpm") and not registry.unattended("software")
    assert registry.opens_keystore(["pkcs11", "software"]) and not registry.opens_keystore(
        ["pkcs11", "simulator"]
    )
    assert registry.spec("hsm") is None and registry.BY_NAME["pkcs11"].level is SecurityLevel.HSM


def test_reading_the_registry_imports_no_backend() -> None:
    code = (
        "import sys, anyhsm.registry; "
        "print(sorted(m for m in sys.modules if m.startswith('anyhsm.providers') "
        "or m in ('pkcs11', 'tpm2_pytss', 'cryptography')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
