"""Fixtures for the TPM tests. The swtpm fixtures are the session's (tests/conftest.py):
``swtpm`` is the shared process, checked for leaked objects after every test;
``private_swtpm`` is a test's own, for tests that stop, pause or wipe a TPM."""

from __future__ import annotations

import pytest
from tests.support.swtpm import Swtpm

from anyhsm.tpm import TpmSettings


@pytest.fixture
def settings(swtpm: Swtpm) -> TpmSettings:
    return TpmSettings(tcti=swtpm.tcti)
