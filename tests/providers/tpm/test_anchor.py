"""The keystore's generation anchored in a TPM NV counter, end to end: enrolment defines
the counter, the TPM provider checks the store against it on every open, unenrolment
removes it. The attack: the whole keystore directory put back from an earlier copy
(which no file inside it can reveal) is refused."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from tests.providers.tpm.tpmtools import nv_attributes, undefine_nv
from tests.support.swtpm import Swtpm

from anyhsm.config import Config
from anyhsm.errors import AnchorMissing, HsmError, KeystoreRolledBack
from anyhsm.factory import walk_chain
from anyhsm.keystore import KdfParams, Keystore
from anyhsm.provider import ProviderContext
from anyhsm.providers.tpm import TpmProvider
from anyhsm.secret import SecretBytes
from anyhsm.tpm import SIDE_FILE, TpmCounter, TpmSettings, enroll, unenroll
from anyhsm.types import Environment, KeySpec, Network

pytestmark = pytest.mark.tpm

PASSPHRASE = b"correct horse battery staple, recovery only"
FAST_KDF = KdfParams(name="argon2id", memory_kib=256, iterations=1, lanes=1)


def _context(store: Path, tcti: str) -> ProviderContext:
    return ProviderContext(
        environment=Environment.DEVELOPMENT,
        network=Network.REGTEST,
        config_dir=store.parent,
        settings={"tcti": tcti},
        software_settings={"path": str(store)},
        passphrase=None,
        timeout_s=2.0,
    )


def _open_tpm(store: Path, tcti: str) -> TpmProvider:
    p = TpmProvider(_context(store, tcti))
    p.open()
    return p


def _passphrase_store(store: Path) -> Keystore:
    ks = Keystore.load(store)
    ks.unlock_with_passphrase(SecretBytes(PASSPHRASE))
    return ks


def _enrolled(store: Path, settings: TpmSettings) -> dict[str, object]:
    ks = Keystore.create(store, SecretBytes(PASSPHRASE), kdf=FAST_KDF)
    try:
        return enroll(ks, settings)
    finally:
        ks.close()


def _anchor_ref(store: Path) -> tuple[str, str] | None:
    ks = _passphrase_store(store)
    try:
        return ks.generation_anchor_ref()
    finally:
        ks.close()


def _restore(copy: Path, store: Path) -> None:
    shutil.rmtree(store)
    shutil.copytree(copy, store)


def test_enroll_defines_and_records_a_counter(tmp_path: Path, private_swtpm: Swtpm) -> None:
    store = tmp_path / "ks"
    s = TpmSettings(tcti=private_swtpm.tcti)
    summary = _enrolled(store, s)
    anchor = summary["anchor"]
    assert isinstance(anchor, dict)
    assert anchor["kind"] == "tpm-nv-counter" and anchor["counter"] == "defined"
    ref = str(anchor["ref"])
    assert _anchor_ref(store) == ("tpm-nv-counter", ref)
    assert nv_attributes(private_swtpm.tcti, int(ref, 16)) is not None

    p = _open_tpm(store, private_swtpm.tcti)
    try:
        status = p.keystore.anchor_status()
        assert status["kind"] == "tpm-nv-counter"
        assert status["ref"] == ref
        assert status["checked"] is True
        before = TpmCounter.at(s, ref).read()
        p.generate_key(KeySpec("k1"))  # a change of the key set moves the counter
        assert TpmCounter.at(s, ref).read() > before
    finally:
        p.close()


def test_rollback_of_the_whole_directory_is_refused(tmp_path: Path, private_swtpm: Swtpm) -> None:
    """The attack: copy the keystore directory, delete a key (and create one), put the
    old copy back. Every file is authentic; the TPM counter says it is old."""
    store = tmp_path / "ks"
    _enrolled(store, TpmSettings(tcti=private_swtpm.tcti))
    p = _open_tpm(store, private_swtpm.tcti)
    try:
        p.generate_key(KeySpec("compromised"))
    finally:
        p.close()
    copy = tmp_path / "copy"
    shutil.copytree(store, copy)

    p = _open_tpm(store, private_swtpm.tcti)
    try:
        p.delete_key("compromised")
        p.generate_key(KeySpec("replacement"))
    finally:
        p.close()

    _restore(copy, store)  # the deleted key is back, its replacement gone
    with pytest.raises(KeystoreRolledBack) as info:
        _open_tpm(store, private_swtpm.tcti)
    assert info.value.exit_code == 8

    # Re-enrolling with the passphrase does not paper over it either.
    ks = _passphrase_store(store)
    try:
        with pytest.raises(KeystoreRolledBack):
            enroll(ks, TpmSettings(tcti=private_swtpm.tcti))
    finally:
        ks.close()


def test_reenroll_keeps_the_counter(tmp_path: Path, private_swtpm: Swtpm) -> None:
    store = tmp_path / "ks"
    s = TpmSettings(tcti=private_swtpm.tcti)
    first = _enrolled(store, s)
    ks = _passphrase_store(store)
    try:
        again = enroll(ks, s)
    finally:
        ks.close()
    assert isinstance(first["anchor"], dict) and isinstance(again["anchor"], dict)
    assert again["anchor"]["counter"] == "kept"
    assert again["anchor"]["ref"] == first["anchor"]["ref"]
    p = _open_tpm(store, private_swtpm.tcti)
    p.close()


def test_removed_counter_fails_closed_then_reenrol_reanchors(
    tmp_path: Path, private_swtpm: Swtpm
) -> None:
    """Someone undefines the counter: the TPM path refuses the store (AnchorMissing),
    and an explicit re-enrolment with the passphrase anchors it in a new counter."""
    store = tmp_path / "ks"
    s = TpmSettings(tcti=private_swtpm.tcti)
    summary = _enrolled(store, s)
    assert isinstance(summary["anchor"], dict)
    old_ref = str(summary["anchor"]["ref"])
    undefine_nv(private_swtpm.tcti, int(old_ref, 16))
    with pytest.raises(AnchorMissing):
        _open_tpm(store, private_swtpm.tcti)

    ks = _passphrase_store(store)
    try:
        again = enroll(ks, s)
    finally:
        ks.close()
    assert isinstance(again["anchor"], dict)
    assert again["anchor"]["counter"] == "defined"
    named = _anchor_ref(store)
    assert named is not None and named[1] == again["anchor"]["ref"]
    p = _open_tpm(store, private_swtpm.tcti)
    p.close()


def test_unenroll_removes_anchor_then_counter(tmp_path: Path, private_swtpm: Swtpm) -> None:
    store = tmp_path / "ks"
    s = TpmSettings(tcti=private_swtpm.tcti)
    summary = _enrolled(store, s)
    assert isinstance(summary["anchor"], dict)
    index = int(str(summary["anchor"]["ref"]), 16)
    ks = _passphrase_store(store)
    try:
        assert unenroll(ks, s) is True
        assert ks.generation_anchor_ref() is None
    finally:
        ks.close()
    assert nv_attributes(private_swtpm.tcti, index) is None
    assert not (store / SIDE_FILE).exists()
    # Idempotent.
    ks = _passphrase_store(store)
    try:
        assert unenroll(ks, s) is False
    finally:
        ks.close()


def test_unenroll_without_settings_keeps_the_counter(tmp_path: Path, private_swtpm: Swtpm) -> None:
    """Without TPM settings the anchor still leaves the keystore (so the store never
    names a counter that is gone); the NV index stays for tpm2_nvundefine."""
    store = tmp_path / "ks"
    summary = _enrolled(store, TpmSettings(tcti=private_swtpm.tcti))
    assert isinstance(summary["anchor"], dict)
    index = int(str(summary["anchor"]["ref"]), 16)
    ks = _passphrase_store(store)
    try:
        assert unenroll(ks) is True
        assert ks.generation_anchor_ref() is None
    finally:
        ks.close()
    assert nv_attributes(private_swtpm.tcti, index) is not None


def test_health_names_the_counter_and_its_loss(tmp_path: Path, private_swtpm: Swtpm) -> None:
    store = tmp_path / "ks"
    summary = _enrolled(store, TpmSettings(tcti=private_swtpm.tcti))
    assert isinstance(summary["anchor"], dict)
    ref = str(summary["anchor"]["ref"])
    p = _open_tpm(store, private_swtpm.tcti)
    try:
        h = p.health()
        assert h.ok, h.reason
        assert h.details["generation_counter"].startswith(f"{ref} = ")
        undefine_nv(private_swtpm.tcti, int(ref, 16))  # removed while the store is open
        h = p.health()
        assert not h.ok
        assert "anchor_missing" in h.details["generation_counter"]
        assert ref in h.reason
    finally:
        p.close()


def test_rolled_back_store_is_not_opened_by_the_passphrase_fallback(
    tmp_path: Path, private_swtpm: Swtpm
) -> None:
    """The attack through the real factory with the usual chain ["tpm", "software"] and
    a passphrase at hand: the rollback verdict must stop the chain (fail closed)."""
    store = tmp_path / "ks"
    _enrolled(store, TpmSettings(tcti=private_swtpm.tcti))
    copy = tmp_path / "copy"
    shutil.copytree(store, copy)
    p = _open_tpm(store, private_swtpm.tcti)
    try:
        p.generate_key(KeySpec("after-the-copy"))
    finally:
        p.close()
    _restore(copy, store)
    raw = {
        "environment": "development",
        "network": "regtest",
        "fallback": {"chain": ["tpm", "software"], "timeout_ms": 2000},
        "providers": {"tpm": {"tcti": private_swtpm.tcti}, "software": {"path": str(store)}},
    }
    config = Config.from_mapping(raw, config_dir=tmp_path, env={})
    try:
        result = walk_chain(config, SecretBytes(PASSPHRASE))
    except HsmError as exc:
        assert "keystore_rolled_back" in str(exc.to_dict()) or isinstance(exc, KeystoreRolledBack)
        return
    result.provider.close()
    pytest.fail(f"the rolled-back store was opened by {result.provider.name!r}")


def test_status_reports_the_counter(tmp_path: Path, private_swtpm: Swtpm) -> None:
    from anyhsm.tpm import status

    store = tmp_path / "ks"
    s = TpmSettings(tcti=private_swtpm.tcti)
    summary = _enrolled(store, s)
    assert isinstance(summary["anchor"], dict)
    ref = str(summary["anchor"]["ref"])
    ks = _passphrase_store(store)
    try:
        info = status(ks, s)["generation_counter"]
        assert isinstance(info, dict)
        assert (info["ref"], info["state"]) == (ref, "ok")
        assert info["value"] == info["recorded"]
        TpmCounter.at(s, ref).increment()  # as if this keystore were an older copy
        info = status(ks, s)["generation_counter"]
        assert isinstance(info, dict)
        assert info["state"] == "ahead of the keystore (rolled back)"
        undefine_nv(private_swtpm.tcti, int(ref, 16))
        info = status(ks, s)["generation_counter"]
        assert isinstance(info, dict) and info["state"] == "error"
        assert isinstance(info["error"], dict) and info["error"]["code"] == "anchor_missing"
    finally:
        ks.close()


def test_passphrase_path_checks_the_counter_when_the_tpm_is_configured(
    tmp_path: Path, private_swtpm: Swtpm
) -> None:
    """A chain without the TPM provider (or a TPM whose unseal fails, e.g. PCRs changed)
    still reads the counter the manifest names when [providers.tpm] is configured: the
    passphrase path is no way around rollback detection."""
    from anyhsm import open_hsm

    store = tmp_path / "ks"
    _enrolled(store, TpmSettings(tcti=private_swtpm.tcti))
    copy = tmp_path / "copy"
    shutil.copytree(store, copy)
    p = _open_tpm(store, private_swtpm.tcti)
    try:
        p.generate_key(KeySpec("after-the-copy"))
    finally:
        p.close()
    raw = {
        "environment": "development",
        "network": "regtest",
        "fallback": {"chain": ["software"], "timeout_ms": 2000},
        "providers": {"tpm": {"tcti": private_swtpm.tcti}, "software": {"path": str(store)}},
        "audit": {"path": str(tmp_path / "audit.log")},
    }
    config = Config.from_mapping(raw, config_dir=tmp_path, env={})
    with open_hsm(config, passphrase=SecretBytes(PASSPHRASE)) as hsm:
        anchor = hsm.health().audit["anchor"]
        assert isinstance(anchor, dict) and anchor["checked"] is True
    _restore(copy, store)
    with pytest.raises(KeystoreRolledBack):
        open_hsm(config, passphrase=SecretBytes(PASSPHRASE))
