"""One contract suite, parametrised over every provider available here and over the
interfaces a program reaches the handle through (tests/conformance/interfaces.py).

Each backend is a fresh deployment whose active provider is that backend, on real
components: the software keystore on disk, the simulator, PKCS#11 on a real SoftHSM2
token, and the TPM path on a real swtpm. A backend whose component is not installed is
skipped with the reason (CI installs them all, so nothing is skipped there).

The library runs every backend. The CLI (a child process per operation, ~0.3 s each)
runs the software keystore and PKCS#11, about 17 s each: the simulator keeps its keys
in one process's memory, so a CLI deployment on it would forget each key as soon as it
is made; the TPM through the CLI passes too (add it here to run it: +17 s) and
tests/cli covers its operator path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tests.conformance.interfaces import OPENERS, Handle
from tests.conftest import PASSPHRASE
from tests.support.softhsm import SoftHsmToken

from anyhsm.deploy import FAST_DEV_KDF, init_deployment
from anyhsm.secret import SecretBytes

BACKENDS = ["software", "simulator", "pkcs11", "tpm"]
INTERFACE_BACKENDS: dict[str, list[str]] = {
    "library": BACKENDS,
    "cli": ["software", "pkcs11"],
    "http": ["software", "pkcs11"],
}
PARAMS = [
    pytest.param((interface, backend), id=f"{interface}-{backend}")
    for interface, backends in INTERFACE_BACKENDS.items()
    for backend in backends
]


def _config(directory: Path, chain: str, extra: str = "") -> Path:
    path = directory / f"{chain}.toml"
    path.write_text(
        f"""
environment = "development"
network = "regtest"
[fallback]
chain = ["{chain}"]
[providers.software]
path = "keystore"
[audit]
path = "audit.log"
{extra}
"""
    )
    return path


@pytest.fixture(scope="session")
def softhsm_token(new_token: Callable[[str], SoftHsmToken]) -> SoftHsmToken:
    """The token of the contract suites (in the session's SoftHSM2)."""
    return new_token("conformance")


def make_deployment(
    name: str, directory: Path, request: pytest.FixtureRequest
) -> tuple[Path, dict[str, str]]:
    """A fresh deployment whose chain is just ``name``; returns its config and the
    environment that opens it (the TPM path needs no passphrase)."""
    init_deployment(directory, SecretBytes(PASSPHRASE.encode()), kdf=FAST_DEV_KDF)
    env = {"ANYHSM_PASSPHRASE": PASSPHRASE}
    if name == "pkcs11":
        token: SoftHsmToken = request.getfixturevalue("softhsm_token")
        env["ANYHSM_PKCS11_PIN"] = token.pin
        extra = f'[providers.pkcs11]\nmodule = "{token.module}"\ntoken_label = "{token.label}"\n'
        return _config(directory, "pkcs11", extra), env
    if name == "tpm":
        from anyhsm.keystore import Keystore
        from anyhsm.tpm.enrollment import enroll
        from anyhsm.tpm.settings import TpmSettings

        tcti = request.getfixturevalue("swtpm").tcti
        cfg = _config(directory, "tpm", f'[providers.tpm]\ntcti = "{tcti}"\n')
        ks = Keystore.load(directory / "keystore")
        ks.unlock_with_passphrase(SecretBytes(PASSPHRASE.encode()))
        enroll(ks, TpmSettings.from_mapping({"tcti": tcti}))
        ks.close()
        return cfg, {}
    return _config(directory, name), env


@pytest.fixture(params=PARAMS)
def hsm(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Handle]:
    """The deployment of one backend, reached through one interface."""
    interface, name = request.param
    cfg, env = make_deployment(name, tmp_path / "dep", request)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    with OPENERS[interface](cfg, env) as handle:
        assert handle.active_provider == name
        yield handle
