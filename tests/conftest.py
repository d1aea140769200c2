"""Fixtures shared by every test directory: fresh deployments on the real software
keystore (with a cheap KDF, so tests stay fast), helpers to build configs, and the real
devices: ONE SoftHSM2 configuration and ONE swtpm process per test session.

Devices (skipped, with the reason, only where SoftHSM2 / swtpm or their Python bindings
are not installed; scripts/test.sh installs them, so nothing is skipped in CI):

- ``softhsm``: the session's SoftHSM2 configuration and its main token; ``new_token``
  makes another fresh token in it; ``token`` is a fresh token for the test module
  (labelled after it), for tests that must not see other modules' keys.
- ``session_swtpm``: the session's swtpm; ``swtpm`` (alias ``tpm``) hands it to one test
  and afterwards asserts that nothing was left loaded in it (swtpm has no resource
  manager: a leaked transient object or session would break later clients);
  ``private_swtpm`` is a test's own, free to be wiped or paused.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tests.support.softhsm import SoftHsmToken, add_token, init_softhsm, softhsm_available
from tests.support.swtpm import Swtpm, start_swtpm, swtpm_available

from anyhsm.deploy import FAST_DEV_KDF, init_deployment
from anyhsm.secret import SecretBytes

PASSPHRASE = "correct horse battery staple, long enough for production"


@pytest.fixture(autouse=True)
def _clean_anyhsm_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees the developer's ANYHSM_* variables."""
    for name in list(os.environ):
        if name.startswith("ANYHSM_"):
            monkeypatch.delenv(name)


@pytest.fixture
def passphrase_env(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("ANYHSM_PASSPHRASE", PASSPHRASE)
    return PASSPHRASE


@pytest.fixture
def deployment(tmp_path: Path, passphrase_env: str) -> Path:
    """A fresh development deployment (keystore, config, audit log); returns the config path."""
    return init_deployment(tmp_path / "dep", SecretBytes(PASSPHRASE.encode()), kdf=FAST_DEV_KDF)


def write_config(directory: Path, body: str) -> Path:
    """A config file next to an existing keystore directory ``directory/keystore``."""
    path = directory / "anyhsm.toml"
    path.write_text(body)
    return path


@pytest.fixture
def make_config(deployment: Path) -> Iterator[object]:
    """Write another config in the deployment's directory (same keystore, same audit log)."""
    created: list[Path] = []

    def make(body: str, name: str = "alt.toml") -> Path:
        p = deployment.parent / name
        p.write_text(body)
        created.append(p)
        return p

    yield make


# --- real devices -------------------------------------------------------------------------


def require_softhsm() -> None:
    """Skip the calling test unless SoftHSM2 and python-pkcs11 are installed."""
    if not softhsm_available():
        pytest.skip("SoftHSM2 is not installed (scripts/install-softhsm.sh installs it)")
    if importlib.util.find_spec("pkcs11") is None:
        pytest.skip("python-pkcs11 is not installed (pip install 'anyhsm[pkcs11]')")


def require_swtpm() -> None:
    """Skip the calling test unless swtpm and tpm2-pytss are installed."""
    if not swtpm_available():
        pytest.skip("swtpm or tpm2-pytss is not installed (run scripts/install-tpm.sh)")


def module_tag(request: pytest.FixtureRequest) -> str:
    """A short name for the requesting test module (``test_pkcs11_e2e`` -> ``pkcs11-e2e``)."""
    return request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_").replace("_", "-")


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> SoftHsmToken:
    """The SoftHSM2 configuration of this session and its main token (keys made by tests
    stay on it: give them unique labels)."""
    require_softhsm()
    return init_softhsm(tmp_path_factory.mktemp("softhsm"), label="anyhsm-pkcs11")


@pytest.fixture(scope="session")
def new_token(softhsm: SoftHsmToken) -> Callable[[str], SoftHsmToken]:
    """Make a fresh token (an older one with the same label is deleted) in the session's
    SoftHSM2 configuration."""

    def make(label: str) -> SoftHsmToken:
        return add_token(softhsm, label[:32])

    return make


@pytest.fixture(scope="module")
def token(request: pytest.FixtureRequest, new_token: Callable[[str], SoftHsmToken]) -> SoftHsmToken:
    """A fresh token for this test module, labelled after it."""
    return new_token(module_tag(request))


@pytest.fixture(scope="session")
def session_swtpm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swtpm]:
    """The swtpm process of this session (use ``swtpm``, which checks for leaks)."""
    require_swtpm()
    tpm = start_swtpm(tmp_path_factory.mktemp("swtpm") / "state")
    yield tpm
    tpm.stop()


@pytest.fixture
def swtpm(session_swtpm: Swtpm) -> Iterator[Swtpm]:
    """The shared swtpm; asserts afterwards that nothing was left loaded in it. A test
    may stop it (to see the TPM vanish): it is started again, same state, PCRs reset."""
    from tests.providers.tpm.tpmtools import loaded_handles

    session_swtpm.start()  # in case an earlier test left it stopped
    yield session_swtpm
    session_swtpm.resume()
    session_swtpm.start()
    assert loaded_handles(session_swtpm.tcti) == [], "transient objects or sessions leaked"


@pytest.fixture
def tpm(swtpm: Swtpm) -> Swtpm:
    """The shared swtpm under the name the end-to-end tests use."""
    return swtpm


@pytest.fixture
def private_swtpm(tmp_path: Path) -> Iterator[Swtpm]:
    """A swtpm of this test's own, free to be stopped, paused or wiped."""
    require_swtpm()
    tpm = start_swtpm(tmp_path / "tpmstate")
    yield tpm
    tpm.stop()
