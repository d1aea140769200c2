"""Issue 9, item 8: unenrolling a TPM or a PKCS#11 wrap revokes it.

Before, ``pkcs11 wrap-unenroll`` and ``tpm unenroll`` only deleted the side file: a saved
copy of ``pkcs11-wrapped.json`` (or ``tpm-sealed.json``) put back opened the store with no
passphrase. Now unenrolment re-encrypts every key under a fresh master key, so the saved
blob unwraps a retired key that opens nothing. Real SoftHSM2 token, real swtpm."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tests.cli.conftest import use_tpm_chain
from tests.conftest import PASSPHRASE

from anyhsm.cli.main import main


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, object]]:
    code = main(list(args))
    out = capsys.readouterr().out
    return code, (json.loads(out) if out.strip().startswith("{") else {})


def put_back(keystore: Path, name: str, saved: bytes) -> None:
    """Restore the saved blob wherever a keystore of any epoch would look for it."""
    (keystore / name).write_bytes(saved)
    for epoch_dir in keystore.glob("keys*"):
        if epoch_dir.is_dir():
            (epoch_dir / name).write_bytes(saved)


def test_saved_wrapped_blob_opens_nothing_after_wrap_unenroll(
    deployment: Path,
    token: object,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    text = deployment.read_text().replace(
        'chain = ["software"]', 'chain = ["pkcs11-wrapped", "software"]'
    )
    text += (
        f'\n[providers.pkcs11]\nmodule = "{token.module}"\n'  # type: ignore[attr-defined]
        f'token_label = "{token.label}"\nwrap_key_label = "revoke-wrap"\n'  # type: ignore[attr-defined]
    )
    deployment.write_text(text)
    monkeypatch.setenv("ANYHSM_PKCS11_PIN", token.pin)  # type: ignore[attr-defined]
    c = ["--config", str(deployment)]
    ks = deployment.parent / "keystore"
    assert run(capsys, *c, "pkcs11", "wrap-enroll", "--json")[0] == 0
    assert run(capsys, *c, "key", "create", "--label", "k", "--json")[0] == 0
    saved = (ks / "pkcs11-wrapped.json").read_bytes()
    monkeypatch.delenv("ANYHSM_PASSPHRASE")
    code, out = run(capsys, *c, "health", "--json")
    assert code == 0 and out["active_provider"] == "pkcs11-wrapped"  # the blob works

    monkeypatch.setenv("ANYHSM_PASSPHRASE", PASSPHRASE)
    code, out = run(capsys, *c, "pkcs11", "wrap-unenroll", "--json")
    assert code == 0 and out["unenrolled"] is True and out["epoch"] == 2
    monkeypatch.delenv("ANYHSM_PASSPHRASE")
    put_back(ks, "pkcs11-wrapped.json", saved)  # the attacker's saved copy
    code, out = run(capsys, *c, "key", "list", "--json")
    assert code != 0, "a saved wrapped blob must not open the store after unenrolment"
    assert "does not open the keystore" in json.dumps(out) or out.get("error")
    # The recovery passphrase still opens every key.
    monkeypatch.setenv("ANYHSM_PASSPHRASE", PASSPHRASE)
    code, out = run(capsys, *c, "sign", "--key", "k", "--digest", "ab" * 32, "--json")
    assert code == 0 and out["signature"]
    assert run(capsys, *c, "audit", "verify", "--json")[0] == 0


def test_saved_sealed_blob_opens_nothing_after_tpm_unenroll(
    deployment: Path,
    tpm: object,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    c = use_tpm_chain(deployment, tpm)
    ks = deployment.parent / "keystore"
    assert run(capsys, *c, "tpm", "enroll", "--json")[0] == 0
    assert run(capsys, *c, "key", "create", "--label", "k", "--json")[0] == 0
    saved = (ks / "tpm-sealed.json").read_bytes()
    backup = deployment.parent / "ks-backup"
    shutil.copytree(ks, backup)

    code, out = run(capsys, *c, "tpm", "unenroll", "--json")
    assert code == 0 and out["unenrolled"] is True and out["epoch"] == 2
    monkeypatch.delenv("ANYHSM_PASSPHRASE")
    put_back(ks, "tpm-sealed.json", saved)
    code, out = run(capsys, *c, "key", "list", "--json")
    assert code != 0, "a saved sealed blob must not open the store after unenrolment"
    monkeypatch.setenv("ANYHSM_PASSPHRASE", PASSPHRASE)
    code, out = run(capsys, *c, "key", "show", "k", "--json")
    assert code == 0 and out["label"] == "k"


def test_rotation_reseals_the_tpm_blob_and_revokes_the_old_one(
    deployment: Path,
    tpm: object,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A rotation while enrolled keeps the TPM path working (the blob is made again for
    the new master key, checked before the switch) and revokes the old blob."""
    c = use_tpm_chain(deployment, tpm)
    ks = deployment.parent / "keystore"
    assert run(capsys, *c, "tpm", "enroll", "--json")[0] == 0
    assert run(capsys, *c, "key", "create", "--label", "k", "--json")[0] == 0
    saved = (ks / "tpm-sealed.json").read_bytes()
    code, out = run(capsys, *c, "keystore", "rotate", "--json")
    assert code == 0 and out["epoch"] == 2, out
    assert not (ks / "tpm-sealed.json").exists() and (ks / "keys.2" / "tpm-sealed.json").exists()

    monkeypatch.delenv("ANYHSM_PASSPHRASE")
    code, out = run(capsys, *c, "health", "--json")
    assert code == 0 and out["active_provider"] == "tpm"  # the new blob opens the store
    (ks / "keys.2" / "tpm-sealed.json").write_bytes(saved)  # the old blob put back
    code, out = run(capsys, *c, "key", "list", "--json")
    assert code != 0
