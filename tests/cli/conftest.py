"""Helpers of the end-to-end tests of this folder. Their devices are the session's
(tests/conftest.py): ``token``, a fresh SoftHSM2 token per test module, and ``tpm``, the
shared swtpm."""

from __future__ import annotations

from pathlib import Path

from tests.support.swtpm import Swtpm


def use_tpm_chain(deployment: Path, tpm: Swtpm) -> list[str]:
    """Point a test deployment's chain at ``["tpm", "software"]`` on ``tpm`` (a running
    swtpm); returns the CLI's ``--config`` arguments."""
    text = deployment.read_text().replace('chain = ["software"]', 'chain = ["tpm", "software"]')
    deployment.write_text(text + f'\n[providers.tpm]\ntcti = "{tpm.tcti}"\n')
    return ["--config", str(deployment)]
