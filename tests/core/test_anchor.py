"""The keystore as the deployment's anchor (anyhsm/anchor.py) and the handle's audited
operations on it: the handle finds the anchor through a declared property of the
provider (never its class), every change to the anchor (passphrase, rotation, unlock
paths) is one audited step, and the sealed-master-key path refuses a device that does
not give back the key it sealed."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.conftest import PASSPHRASE

from anyhsm import hsm as hsm_module
from anyhsm import open_hsm, unlock_blobs
from anyhsm.errors import (
    AuthenticationFailed,
    HsmError,
    KeystoreError,
    ProviderError,
    WrongPassphrase,
)
from anyhsm.keystore import Keystore
from anyhsm.provider import served_keystore
from anyhsm.secret import SecretBytes
from anyhsm.types import SecurityLevel

NEW = "another passphrase, also long enough for production use"


def entries(deployment: Path) -> list[dict[str, object]]:
    lines = (deployment.parent / "audit.log").read_text().splitlines()
    return [json.loads(line) for line in lines]


def ops(deployment: Path, op: str) -> list[tuple[object, object]]:
    return [(e["outcome"], e.get("error")) for e in entries(deployment) if e["op"] == op]


def opens_with(deployment: Path, passphrase: str) -> bool:
    ks = Keystore.load(deployment.parent / "keystore")
    try:
        ks.unlock_with_passphrase(SecretBytes(passphrase.encode()))
    except WrongPassphrase:
        return False
    ks.close()
    return True


# --- the anchor, found by a declared property ---------------------------------------------


def test_the_handle_names_no_provider_class() -> None:
    """Routing by what a provider declares, not what it is: hsm.py never mentions a
    concrete provider class, nor asks hasattr."""
    source = Path(hsm_module.__file__).read_text()
    assert "SoftwareProvider" not in source
    assert "hasattr(" not in source


def test_the_software_provider_is_the_anchor_of_a_software_chain(deployment: Path) -> None:
    with open_hsm(deployment) as hsm:
        anchor = hsm.anchor
        assert anchor.present and anchor.unlocked_by == "passphrase"
        assert anchor.owned_provider is None  # the active provider serves it
        assert anchor.provider is not None and anchor.provider.name == "software"
        assert served_keystore(anchor.provider) is anchor.keystore
        facts = anchor.describe()
        assert facts["unlocked_by"] == "passphrase" and facts["enrolled"] == []
        assert facts["epoch"] == anchor.epoch == 1


def test_a_keystore_is_opened_beside_a_provider_that_serves_none(
    deployment: Path, make_config: object
) -> None:
    """The simulator holds keys of its own: the anchor is the keystore opened beside it
    (its provider owned by the anchor), and it is the key directory."""
    cfg = deployment.read_text().replace('chain = ["software"]', 'chain = ["simulator"]')
    alt = make_config(cfg)  # type: ignore[operator]
    with open_hsm(alt) as hsm:
        assert hsm.active_provider == "simulator"
        assert served_keystore(hsm._active) is None
        owned = hsm.anchor.owned_provider
        assert owned is not None and owned.name == "software"
        assert hsm.anchor.keystore is served_keystore(owned)
        info = hsm.generate_key("in-the-simulator")
        assert info.provider == "simulator"
        assert hsm.verify_audit().ok


def test_a_declared_keystore_provider_that_serves_none_is_an_error() -> None:
    """Fault injection: a provider whose registry spec says it opens the keystore but that
    implements no served_keystore() is refused plainly, not skipped."""

    class Liar:
        name = "software"  # the registry's spec: opens_keystore

    with pytest.raises(ProviderError, match="declared to open the keystore"):
        served_keystore(Liar())  # type: ignore[arg-type]


# --- passphrase and rotation: one audited step each ------------------------------------------


def test_change_passphrase_is_one_audited_step(deployment: Path) -> None:
    with open_hsm(deployment) as hsm:
        hsm.generate_key("kept")
        with pytest.raises(WrongPassphrase):
            hsm.change_passphrase(SecretBytes(b"not the passphrase"), SecretBytes(NEW.encode()))
        assert hsm.anchor.epoch == 1  # nothing rotated
        summary = hsm.change_passphrase(SecretBytes(PASSPHRASE.encode()), SecretBytes(NEW.encode()))
        assert summary["rotated"] is True and summary["epoch"] == 2
        assert hsm.get_key("kept").label == "kept"
        assert hsm.verify_audit().ok
    assert ops(deployment, "keystore_passwd") == [
        ("error", "wrong_passphrase"),
        ("started", None),
        ("ok", None),
    ]
    assert opens_with(deployment, NEW) and not opens_with(deployment, PASSPHRASE)


def test_rotate_master_key_checks_the_current_passphrase(deployment: Path) -> None:
    with open_hsm(deployment) as hsm:
        with pytest.raises(WrongPassphrase):
            hsm.rotate_master_key(SecretBytes(b"not the passphrase"))
        summary = hsm.rotate_master_key(SecretBytes(PASSPHRASE.encode()))
        assert summary["epoch"] == 2 and summary["audit_key"] == 2
    log = entries(deployment)
    rotation = [(e["outcome"], e.get("kid", 1)) for e in log if e["op"] == "rotate_master_key"]
    # the failed check under the old key; "started" the last entry under it, "ok" the
    # first under the new one
    assert rotation == [("error", 1), ("started", 1), ("ok", 2)]
    assert opens_with(deployment, PASSPHRASE)


def test_unenrolling_what_is_not_enrolled_is_a_noop(deployment: Path) -> None:
    with open_hsm(deployment) as hsm:
        assert hsm.unenrol_token_wrap(None) == {"unenrolled": False}
        assert hsm.unenrol_tpm(None) == {"unenrolled": False}
        assert hsm.anchor.epoch == 1
    assert ops(deployment, "pkcs11_wrap_unenroll") == [("started", None), ("noop", None)]
    assert ops(deployment, "tpm_unenroll") == [("started", None), ("noop", None)]


def test_a_rotation_needs_the_current_passphrase(deployment: Path) -> None:
    with open_hsm(deployment) as hsm, pytest.raises(AuthenticationFailed):
        hsm.change_passphrase(None, SecretBytes(NEW.encode()))  # type: ignore[arg-type]


def test_a_rotation_keeping_an_unlock_path_whose_device_is_gone_changes_nothing(
    deployment: Path,
) -> None:
    """A keystore enrolled with a TPM whose [providers.tpm] is not configured here: the
    rotation refuses before anything is written (one error entry), so no unlock path is
    lost by accident."""
    ks = Keystore.load(deployment.parent / "keystore")
    ks.unlock_with_passphrase(SecretBytes(PASSPHRASE.encode()))
    ks.write_side_file(unlock_blobs.TPM_BLOB, b"{}")  # an enrolled blob (never opened here)
    ks.close()
    with open_hsm(deployment) as hsm:
        assert hsm.anchor.enrolled() == ["tpm"]
        with pytest.raises(HsmError, match="not configured here"):
            hsm.rotate_master_key(SecretBytes(PASSPHRASE.encode()))
        assert hsm.anchor.epoch == 1
    assert ops(deployment, "rotate_master_key") == [("error", "config_error")]


# --- the sealed-master-key path ---------------------------------------------------------------


class _Sealer:
    """A sealer for fault injection: its device gives back ``answer`` (the real key when
    None); the blob is the key itself (test only)."""

    name = "test"
    device = "the test device"
    blob_file = "test-sealed.json"
    level = SecurityLevel.TPM

    def __init__(self, answer: bytes | None = None) -> None:
        self.answer = answer

    def seal(self, master: SecretBytes) -> bytes:
        return bytes(master.buffer)

    def unseal(self, blob: bytes) -> SecretBytes:
        return SecretBytes(self.answer if self.answer is not None else blob)

    def not_enrolled(self, keystore: Keystore) -> HsmError:
        return HsmError("not enrolled")

    def blob_facts(self, blob: bytes) -> dict[str, object]:
        return {"size": len(blob)}

    def device_health(self) -> tuple[dict[str, object], str]:
        return {"device": "test"}, ""

    def failure_facts(self, error: HsmError) -> dict[str, object]:
        return {}


@pytest.fixture
def keystore(deployment: Path) -> Iterator[Keystore]:
    ks = Keystore.load(deployment.parent / "keystore")
    ks.unlock_with_passphrase(SecretBytes(PASSPHRASE.encode()))
    yield ks
    ks.close()


def test_a_device_that_gives_back_another_key_is_refused(keystore: Keystore) -> None:
    with pytest.raises(KeystoreError, match="another key than the one it sealed"):
        unlock_blobs.enrol(keystore, _Sealer(answer=bytes(32)))
    assert keystore.read_side_file("test-sealed.json") is None  # nothing was written


def test_enrol_unlock_health_and_unenrol_through_one_sealer(
    keystore: Keystore, deployment: Path
) -> None:
    sealer = _Sealer()
    summary = unlock_blobs.enrol(keystore, sealer)
    assert summary["enrolled"] is True and summary["replaced"] is False
    assert summary["size"] == 32
    details, problem = unlock_blobs.health(keystore, sealer)
    assert problem == "" and details["unlock_blob"] == "present" and details["unseals"] == "yes"
    fresh = Keystore.load(deployment.parent / "keystore")
    unlock_blobs.unlock(fresh, sealer)
    assert fresh.unlocked_by == "test"
    fresh.close()
    assert unlock_blobs.unenrol(keystore, sealer)
    details, problem = unlock_blobs.health(keystore, sealer)
    assert details["unlock_blob"] == "absent" and "unenrolled" in problem


def test_a_rotation_builds_no_sealer_for_a_path_that_is_not_enrolled(deployment: Path) -> None:
    """A token wrap named in the configuration but never enrolled (here: no module even
    configured) plays no part in a rotation: only the enrolled paths' sealers are built."""
    deployment.write_text(
        deployment.read_text() + '\n[providers.pkcs11]\nwrap_key_label = "never-enrolled"\n'
    )
    with open_hsm(deployment) as hsm:
        assert hsm.anchor.enrolled() == []
        assert hsm.rotate_master_key(SecretBytes(PASSPHRASE.encode()))["epoch"] == 2
