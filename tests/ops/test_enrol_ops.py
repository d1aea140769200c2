"""anyhsm.ops.enrol and the keystore operations of anyhsm.ops.admin: a TPM seal on a real
swtpm, a token wrap on a real SoftHSM2 token (its PIN given as an argument only), the
passphrase change and the master-key rotation on a real software keystore."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.cli.conftest import use_tpm_chain
from tests.conftest import PASSPHRASE

from anyhsm.config import Config
from anyhsm.credentials import PIN_ENV
from anyhsm.errors import AuthenticationFailed, ConfigError, WrongPassphrase
from anyhsm.hsm import open_hsm
from anyhsm.ops import admin, enrol
from anyhsm.ops.keys import create_key
from anyhsm.secret import SecretBytes

NEW = "another passphrase, long enough for any environment"


def _pw(text: str = PASSPHRASE) -> SecretBytes:
    return SecretBytes(text.encode())


def test_refusals_before_anything_is_opened(deployment: Path) -> None:
    cfg = Config.load(deployment)
    with pytest.raises(ConfigError, match=r"\[providers.tpm\] tcti"):
        enrol.check_configured(cfg, enrol.TPM)
    with pytest.raises(ConfigError, match="wrap_key_label"):
        enrol.check_configured(cfg, enrol.TOKEN_WRAP)


def test_change_passphrase_and_rotate(deployment: Path) -> None:
    with open_hsm(deployment) as hsm:
        create_key(hsm, "k")
        with pytest.raises(AuthenticationFailed):
            admin.change_passphrase(hsm, None, _pw(NEW))
        with pytest.raises(WrongPassphrase):
            admin.change_passphrase(hsm, _pw("not the passphrase, but long enough"), _pw(NEW))
        notes: list[str] = []
        res = admin.change_passphrase(hsm, _pw(), _pw(NEW), on_slow=notes.append)
        d = res.to_dict()
        assert d["changed"] is True and d["keys"] == 1 and isinstance(d["epoch"], int)
        assert notes == []  # the test KDF is fast
    with open_hsm(deployment, passphrase=NEW) as hsm:
        rot = admin.rotate_master_key(hsm, _pw(NEW))
        assert "changed" not in rot.to_dict() and rot.summary["epoch"] == d["epoch"] + 1  # type: ignore[operator]
        with pytest.raises(AuthenticationFailed):
            admin.rotate_master_key(hsm, None)
    with pytest.raises(WrongPassphrase):
        open_hsm(deployment, passphrase=PASSPHRASE)


@pytest.mark.tpm
def test_tpm_enrol_status_unenrol(deployment: Path, tpm: object) -> None:
    use_tpm_chain(deployment, tpm)
    cfg = Config.load(deployment)
    enrol.check_configured(cfg, enrol.TPM)
    with open_hsm(cfg) as hsm:
        assert not enrol.tpm_status(hsm).ok
        assert not enrol.needs_passphrase(hsm, enrol.TPM)
        res = enrol.enrol_tpm(hsm)
        assert res.get("pcr_bank") and res.to_dict()["tcti"] == tpm.tcti  # type: ignore[attr-defined]
        assert enrol.tpm_status(hsm).ok
    with open_hsm(cfg, passphrase=None) as hsm:  # the TPM opens it
        assert hsm.active_provider == "tpm" and enrol.needs_passphrase(hsm, enrol.TPM)
        with pytest.raises(AuthenticationFailed):
            enrol.unenrol_tpm(hsm, None)
        gone = enrol.unenrol_tpm(hsm, _pw())
        assert gone.unenrolled and gone.to_dict()["unenrolled"] is True
        again = enrol.unenrol_tpm(hsm, None)
        assert not again.unenrolled and again.to_dict() == {"unenrolled": False}


@pytest.mark.pkcs11
def test_token_wrap_with_the_pin_as_an_argument(
    deployment: Path, token: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = deployment.read_text().replace(
        'chain = ["software"]', 'chain = ["pkcs11-wrapped", "software"]'
    )
    text += (
        f'\n[providers.pkcs11]\nmodule = "{token.module}"\n'  # type: ignore[attr-defined]
        f'token_label = "{token.label}"\nwrap_key_label = "ops-wrap"\n'  # type: ignore[attr-defined]
    )
    deployment.write_text(text)
    monkeypatch.delenv(PIN_ENV, raising=False)
    pin = token.pin  # type: ignore[attr-defined]
    cfg = Config.load(deployment)
    with open_hsm(cfg, pin=pin) as hsm:
        res = enrol.enrol_token_wrap(hsm)
        assert res.get("wrap_key_label") == "ops-wrap"
    monkeypatch.delenv("ANYHSM_PASSPHRASE")
    with open_hsm(cfg, pin=pin) as hsm:  # no passphrase: the token opens the keystore
        assert hsm.active_provider == "pkcs11-wrapped"
        assert enrol.needs_passphrase(hsm, enrol.TOKEN_WRAP)
        gone = enrol.unenrol_token_wrap(hsm, _pw())
        assert gone.unenrolled
