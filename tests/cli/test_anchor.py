"""The keystore anchors every deployment (audit key, key directory). With a PKCS#11
token active, the keystore is opened the way it can be: through the TPM when enrolled
(no passphrase needed), else with the passphrase; without any, opening fails closed."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.conftest import PASSPHRASE

from anyhsm import open_hsm
from anyhsm.errors import AuditError
from anyhsm.keystore import Keystore
from anyhsm.secret import SecretBytes


def test_token_active_keystore_anchored_by_tpm(
    deployment: Path, token: object, tpm: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    from anyhsm.tpm.enrollment import enroll
    from anyhsm.tpm.settings import TpmSettings

    tcti = tpm.tcti  # type: ignore[attr-defined]
    ks = Keystore.load(deployment.parent / "keystore")
    ks.unlock_with_passphrase(SecretBytes(PASSPHRASE.encode()))
    enroll(ks, TpmSettings.from_mapping({"tcti": tcti}))
    ks.close()
    text = deployment.read_text().replace('chain = ["software"]', 'chain = ["pkcs11"]')
    text += (
        f'\n[providers.pkcs11]\nmodule = "{token.module}"\ntoken_label = "{token.label}"\n'  # type: ignore[attr-defined]
        f'[providers.tpm]\ntcti = "{tcti}"\n'
    )
    deployment.write_text(text)
    monkeypatch.setenv("ANYHSM_PKCS11_PIN", token.pin)  # type: ignore[attr-defined]
    monkeypatch.delenv("ANYHSM_PASSPHRASE")
    with open_hsm(deployment) as hsm:
        assert hsm.active_provider == "pkcs11"
        assert hsm.keystore.unlocked_by == "tpm"
        assert hsm.verify_audit().ok

    tpm.stop()  # type: ignore[attr-defined]
    try:
        with pytest.raises(AuditError) as e:  # no TPM, no passphrase: fail closed
            open_hsm(deployment)
        assert "tpm" in str(e.value) and "passphrase" in str(e.value)
        monkeypatch.setenv("ANYHSM_PASSPHRASE", PASSPHRASE)
        with open_hsm(deployment) as hsm:
            assert hsm.keystore.unlocked_by == "passphrase"
    finally:
        tpm.start()  # type: ignore[attr-defined]
