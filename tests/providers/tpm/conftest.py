"""Fixtures for the TPM tests: a real swtpm per test session (and per destructive test).

The session swtpm is shared; tests that stop, pause or wipe a TPM get their own
(``private_swtpm``, ~20 ms to start). After every test that used the shared one,
no transient object or session may be left loaded in it: anyhsm must flush all
it creates (swtpm has no resource manager; a leak would break later clients).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.providers.tpm.tpmtools import loaded_handles
from tests.support.swtpm import Swtpm, start_swtpm, swtpm_available

from anyhsm.tpm import TpmSettings


def _require_swtpm() -> None:
    if not swtpm_available():
        pytest.skip("swtpm or tpm2-pytss is not installed (run scripts/install-tpm.sh)")


@pytest.fixture(scope="session")
def session_swtpm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swtpm]:
    _require_swtpm()
    tpm = start_swtpm(tmp_path_factory.mktemp("swtpm") / "state")
    yield tpm
    tpm.stop()


@pytest.fixture
def swtpm(session_swtpm: Swtpm) -> Iterator[Swtpm]:
    """The shared swtpm; asserts afterwards that nothing was left loaded in it."""
    session_swtpm.start()  # in case an earlier test stopped it by mistake
    yield session_swtpm
    assert loaded_handles(session_swtpm.tcti) == [], "transient objects or sessions leaked"


@pytest.fixture
def private_swtpm(tmp_path: Path) -> Iterator[Swtpm]:
    """A swtpm of this test's own, free to be stopped, paused or wiped."""
    _require_swtpm()
    tpm = start_swtpm(tmp_path / "tpmstate")
    yield tpm
    tpm.stop()


@pytest.fixture
def settings(swtpm: Swtpm) -> TpmSettings:
    return TpmSettings(tcti=swtpm.tcti)
