"""The handle's audited operations on the keystore's unlock paths, on a real swtpm and a
real SoftHSM2 token: enrol, keep through a passphrase change (the blob made again for
the new master key), unenrol (a rotation without the blob, so a saved copy opens
nothing). Each is one audited step: "started", then ok / error / noop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.conftest import PASSPHRASE
from tests.support.softhsm import SoftHsmToken
from tests.support.swtpm import Swtpm

from anyhsm import open_hsm, unlock_blobs
from anyhsm.errors import AuthenticationFailed, WrongPassphrase
from anyhsm.keystore import Keystore
from anyhsm.secret import SecretBytes

NEW = "another passphrase, also long enough for production use"


def outcomes(deployment: Path, op: str) -> list[object]:
    lines = (deployment.parent / "audit.log").read_text().splitlines()
    return [e["outcome"] for e in map(json.loads, lines) if e["op"] == op]


def with_tpm(deployment: Path, tpm: Swtpm) -> None:
    text = deployment.read_text().replace('chain = ["software"]', 'chain = ["tpm", "software"]')
    deployment.write_text(text + f'\n[providers.tpm]\ntcti = "{tpm.tcti}"\n')


def with_token_wrap(deployment: Path, token: SoftHsmToken, monkeypatch: pytest.MonkeyPatch) -> None:
    text = deployment.read_text().replace(
        'chain = ["software"]', 'chain = ["pkcs11-wrapped", "software"]'
    )
    deployment.write_text(
        text + f'\n[providers.pkcs11]\nmodule = "{token.module}"\ntoken_label = "{token.label}"\n'
        'wrap_key_label = "unlock-paths-wrap"\n'
    )
    monkeypatch.setenv("ANYHSM_PKCS11_PIN", token.pin)


def test_tpm_enrol_keep_and_unenrol(
    deployment: Path, tpm: Swtpm, monkeypatch: pytest.MonkeyPatch
) -> None:
    with_tpm(deployment, tpm)
    with open_hsm(deployment) as hsm:  # the TPM is not enrolled: the passphrase opens it
        assert hsm.active_provider == "software"
        summary = hsm.enrol_tpm()
        assert summary["enrolled"] is True and summary["anchor"]["counter"] == "defined"  # type: ignore[index]
        assert hsm.anchor.enrolled() == ["tpm"]
        assert hsm.anchor.generation_anchor_ref is not None
    assert outcomes(deployment, "tpm_enroll") == ["started", "ok"]

    monkeypatch.delenv("ANYHSM_PASSPHRASE")
    with open_hsm(deployment) as hsm:  # unattended now
        assert hsm.active_provider == "tpm" and hsm.anchor.unlocked_by == "tpm"
        hsm.generate_key("tpm-kept")
        status = hsm.tpm_status()
        assert status["opens_keystore"] is True and status["handle"] == "normal"
        # a passphrase change keeps the TPM path: the blob is sealed again for the new key
        hsm.change_passphrase(SecretBytes(PASSPHRASE.encode()), SecretBytes(NEW.encode()))
        saved = hsm.anchor.require().read_side_file(unlock_blobs.TPM_BLOB)
        assert saved is not None
    with open_hsm(deployment) as hsm:
        assert hsm.anchor.unlocked_by == "tpm" and hsm.get_key("tpm-kept")
        with pytest.raises(AuthenticationFailed):
            hsm.unenrol_tpm(None)  # enrolled: the passphrase is needed
        with pytest.raises(WrongPassphrase):
            hsm.unenrol_tpm(SecretBytes(PASSPHRASE.encode()))  # the old one
        assert hsm.anchor.enrolled() == ["tpm"]
        summary = hsm.unenrol_tpm(SecretBytes(NEW.encode()))
        assert summary["unenrolled"] is True
        assert hsm.anchor.enrolled() == [] and hsm.anchor.generation_anchor_ref is None
        assert hsm.get_key("tpm-kept")
        assert hsm.verify_audit().ok
    assert outcomes(deployment, "tpm_unenroll") == ["error", "started", "ok"]
    # the saved copy of the blob unseals a master key that opens nothing any more
    from anyhsm.tpm.sealing import TpmSealer
    from anyhsm.tpm.settings import TpmSettings

    sealer = TpmSealer(TpmSettings(tcti=tpm.tcti))
    ks = Keystore.load(deployment.parent / "keystore")
    with pytest.raises(AuthenticationFailed), sealer.unseal(saved) as old:
        ks.unlock_with_master_key(old)


def test_token_wrap_enrol_keep_and_unenrol(
    deployment: Path, token: SoftHsmToken, monkeypatch: pytest.MonkeyPatch
) -> None:
    with_token_wrap(deployment, token, monkeypatch)
    with open_hsm(deployment) as hsm:
        summary = hsm.enrol_token_wrap()
        assert summary["enrolled"] is True and summary["mechanism"] == "CKM_AES_GCM"
    assert outcomes(deployment, "pkcs11_wrap_enroll") == ["started", "ok"]
    monkeypatch.delenv("ANYHSM_PASSPHRASE")
    with open_hsm(deployment) as hsm:
        assert hsm.active_provider == "pkcs11-wrapped" and hsm.anchor.unlocked_by == "pkcs11"
        health = hsm.health()
        row = next(p for p in health.providers if p["active"])
        assert row["details"]["unseals"] == "yes"  # type: ignore[index]
        hsm.rotate_master_key(SecretBytes(PASSPHRASE.encode()))  # the wrap is made again
    with open_hsm(deployment) as hsm:
        assert hsm.anchor.unlocked_by == "pkcs11" and hsm.anchor.epoch == 2
        summary = hsm.unenrol_token_wrap(SecretBytes(PASSPHRASE.encode()))
        assert summary["unenrolled"] is True and hsm.anchor.enrolled() == []
    assert outcomes(deployment, "pkcs11_wrap_unenroll") == ["started", "ok"]
    with open_hsm(deployment, passphrase=PASSPHRASE) as hsm:  # only the passphrase is left
        assert hsm.active_provider == "software"
