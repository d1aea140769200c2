"""TpmProvider and enrolment against a real swtpm and the real keystore.

The TPM path and the passphrase path open the SAME keystore: keys made through
one are visible through the other, and whatever happens to the TPM (PCRs
changed, stopped, wiped) the recovery passphrase still opens every key.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import pytest
from tests.providers.tpm.tpmtools import extend_pcr
from tests.support.swtpm import Swtpm

from anyhsm.config import Config
from anyhsm.crypto import secp256k1 as curve
from anyhsm.errors import AuthenticationFailed, KeystoreError, ProviderUnavailable
from anyhsm.factory import walk_chain
from anyhsm.keystore import KdfParams, Keystore
from anyhsm.provider import ProviderContext
from anyhsm.providers.software import SoftwareProvider
from anyhsm.providers.tpm import TpmProvider
from anyhsm.secret import SecretBytes
from anyhsm.tpm import (
    SIDE_FILE,
    SealedBlob,
    TpmBlobInvalid,
    TpmForeignBlob,
    TpmNotEnrolled,
    TpmPolicyMismatch,
    TpmSettings,
    enroll,
    status,
    unenroll,
)
from anyhsm.types import Environment, KeySpec, KeyType, Network, SecurityLevel, SigScheme

pytestmark = pytest.mark.tpm

PASSPHRASE = b"correct horse battery staple, recovery only"
FAST_KDF = KdfParams(name="argon2id", memory_kib=256, iterations=1, lanes=1)


def _context(store: Path, tpm: dict[str, object], passphrase: bool = False) -> ProviderContext:
    return ProviderContext(
        environment=Environment.DEVELOPMENT,
        network=Network.REGTEST,
        config_dir=store.parent,
        settings=dict(tpm),
        software_settings={"path": str(store)},
        passphrase=SecretBytes(PASSPHRASE) if passphrase else None,
        timeout_s=2.0,
    )


def _new_store(path: Path) -> Keystore:
    return Keystore.create(path, SecretBytes(PASSPHRASE), kdf=FAST_KDF)


def _enrolled(path: Path, settings: TpmSettings) -> dict[str, object]:
    ks = _new_store(path)
    try:
        return enroll(ks, settings)
    finally:
        ks.close()


def _tpm_provider(store: Path, tpm: dict[str, object]) -> TpmProvider:
    p = TpmProvider(_context(store, tpm))
    p.open()
    return p


def _software_provider(store: Path) -> SoftwareProvider:
    p = SoftwareProvider(_context(store, {}, passphrase=True))
    p.open()
    return p


def _sign_and_verify(p: SoftwareProvider, label: str) -> None:
    digest = secrets.token_bytes(32)
    info = p.get_key(label)
    sig = p.sign_digest(label, digest, SigScheme.ECDSA)
    assert curve.ecdsa_verify(info.public_key, digest, sig)


def test_enroll_summary_has_no_secret(tmp_path: Path, swtpm: Swtpm) -> None:
    store = tmp_path / "ks"
    ks = _new_store(store)
    with ks.master_key() as mk:
        master_hex = mk.reveal().hex()
    summary = enroll(ks, TpmSettings(tcti=swtpm.tcti))
    ks.close()
    assert summary["enrolled"] is True
    assert summary["replaced"] is False
    assert summary["no_da"] is True
    assert summary["pcrs"] == []
    assert (store / SIDE_FILE).is_file()
    text = json.dumps(summary) + (store / SIDE_FILE).read_text()
    assert master_hex not in text


def test_open_without_passphrase_and_share_keys(tmp_path: Path, swtpm: Swtpm) -> None:
    store = tmp_path / "ks"
    table = {"tcti": swtpm.tcti}
    _enrolled(store, TpmSettings(tcti=swtpm.tcti))

    tpm = _tpm_provider(store, table)
    try:
        assert tpm.name == "tpm"
        assert tpm.security_level() is SecurityLevel.TPM
        assert tpm.production_ready()
        assert tpm.keystore.unlocked_by == "tpm"
        made_by_tpm = tpm.generate_key(KeySpec("via-tpm"))
        _sign_and_verify(tpm, "via-tpm")
        tpm_store_id = tpm.store_id()
    finally:
        tpm.close()

    sw = _software_provider(store)
    try:
        assert sw.store_id() == tpm_store_id  # one store reached two ways
        assert sw.get_key("via-tpm").public_key == made_by_tpm.public_key
        _sign_and_verify(sw, "via-tpm")
        made_by_passphrase = sw.generate_key(KeySpec("via-passphrase", KeyType.BIP32))
    finally:
        sw.close()

    tpm = _tpm_provider(store, table)
    try:
        assert tpm.get_key("via-passphrase").public_key == made_by_passphrase.public_key
        assert {k.label for k in tpm.list_keys()} == {"via-tpm", "via-passphrase"}
    finally:
        tpm.close()


def test_health_reports_the_tpm(tmp_path: Path, swtpm: Swtpm) -> None:
    store = tmp_path / "ks"
    _enrolled(store, TpmSettings(tcti=swtpm.tcti))
    tpm = _tpm_provider(store, {"tcti": swtpm.tcti})
    try:
        h = tpm.health()
        assert h.ok, h.reason
        assert h.security_level is SecurityLevel.TPM
        assert h.details["tpm_reachable"] == "yes"
        assert h.details["tpm_manufacturer"] == "IBM"
        assert h.details["tpm_firmware"].count(".") == 3
        assert h.details["unlock_blob"] == "present"
        assert h.details["unseals"] == "yes"
        assert h.details["unlocked_by"] == "tpm"

        unenroll(tpm.keystore)  # removed while open: keys still usable, health says why not ok
        h = tpm.health()
        assert not h.ok
        assert h.details["unlock_blob"] == "absent"
        _sign_and_verify(tpm, tpm.generate_key(KeySpec("still-works")).label)
    finally:
        tpm.close()


def test_not_enrolled_and_unenroll(tmp_path: Path, swtpm: Swtpm) -> None:
    store = tmp_path / "ks"
    _new_store(store).close()
    with pytest.raises(TpmNotEnrolled) as info:
        _tpm_provider(store, {"tcti": swtpm.tcti})
    assert "anyhsm tpm enroll" in info.value.message
    assert isinstance(info.value, ProviderUnavailable)

    ks = Keystore.load(store)
    ks.unlock_with_passphrase(SecretBytes(PASSPHRASE))
    assert unenroll(ks) is False
    enroll(ks, TpmSettings(tcti=swtpm.tcti))
    assert enroll(ks, TpmSettings(tcti=swtpm.tcti))["replaced"] is True
    assert unenroll(ks) is True
    ks.close()
    with pytest.raises(TpmNotEnrolled):
        _tpm_provider(store, {"tcti": swtpm.tcti})
    _software_provider(store).close()  # the passphrase path is untouched


def test_enroll_needs_an_unlocked_keystore(tmp_path: Path, swtpm: Swtpm) -> None:
    store = tmp_path / "ks"
    _new_store(store).close()
    with pytest.raises(KeystoreError):
        enroll(Keystore.load(store), TpmSettings(tcti=swtpm.tcti))
    assert not (store / SIDE_FILE).exists()


def test_pcr_change_refused_recovery_passphrase_opens(tmp_path: Path, swtpm: Swtpm) -> None:
    store = tmp_path / "ks"
    table: dict[str, object] = {"tcti": swtpm.tcti, "pcrs": [16]}
    _enrolled(store, TpmSettings.from_mapping(table))
    tpm = _tpm_provider(store, table)
    tpm.generate_key(KeySpec("before-update"))
    tpm.close()

    extend_pcr(swtpm.tcti, 16, b"new boot loader")
    with pytest.raises(TpmPolicyMismatch) as info:
        _tpm_provider(store, table)
    assert info.value.changed_pcrs == (16,)

    ks = Keystore.load(store)
    report = status(ks, TpmSettings.from_mapping(table))
    assert report["enrolled"] is True
    assert report["unsealable"] is False
    assert report["changed_pcrs"] == [16]

    sw = _software_provider(store)  # recovery: every key is still there
    try:
        _sign_and_verify(sw, "before-update")
        summary = enroll(sw.keystore, TpmSettings.from_mapping(table))  # re-seal to new values
        assert summary["replaced"] is True
    finally:
        sw.close()
    tpm = _tpm_provider(store, table)
    _sign_and_verify(tpm, "before-update")
    tpm.close()


def test_tpm_wiped_recovery_passphrase_opens(tmp_path: Path, private_swtpm: Swtpm) -> None:
    store = tmp_path / "ks"
    table = {"tcti": private_swtpm.tcti}
    _enrolled(store, TpmSettings(tcti=private_swtpm.tcti))
    tpm = _tpm_provider(store, table)
    tpm.generate_key(KeySpec("k1"))
    tpm.close()

    private_swtpm.wipe()
    with pytest.raises(TpmForeignBlob):
        _tpm_provider(store, table)
    sw = _software_provider(store)
    try:
        _sign_and_verify(sw, "k1")
        enroll(sw.keystore, TpmSettings(tcti=private_swtpm.tcti))  # enroll the new TPM
    finally:
        sw.close()
    _tpm_provider(store, table).close()


def test_tpm_stopped_mid_run(tmp_path: Path, private_swtpm: Swtpm) -> None:
    store = tmp_path / "ks"
    table = {"tcti": private_swtpm.tcti}
    _enrolled(store, TpmSettings(tcti=private_swtpm.tcti))
    tpm = _tpm_provider(store, table)
    try:
        private_swtpm.stop()
        # Keys stay usable (the master key is in memory); health says the next open fails.
        _sign_and_verify(tpm, tpm.generate_key(KeySpec("during-outage")).label)
        h = tpm.health()
        assert not h.ok
        assert h.details["tpm_reachable"] == "no"
        assert "TPM unreachable" in h.reason
    finally:
        tpm.close()
    with pytest.raises(ProviderUnavailable):
        _tpm_provider(store, table)
    _software_provider(store).close()


def test_tampered_blob_refused(tmp_path: Path, swtpm: Swtpm) -> None:
    store = tmp_path / "ks"
    _enrolled(store, TpmSettings(tcti=swtpm.tcti))
    d = json.loads((store / SIDE_FILE).read_bytes())
    d["private"] = d["private"][:-2] + ("00" if d["private"][-2:] != "00" else "01")
    (store / SIDE_FILE).write_text(json.dumps(d))
    with pytest.raises(TpmBlobInvalid):
        _tpm_provider(store, {"tcti": swtpm.tcti})


def test_blob_of_another_keystore_is_refused(tmp_path: Path, swtpm: Swtpm) -> None:
    """A valid blob copied from another keystore unseals, but its key does not open this one."""
    s = TpmSettings(tcti=swtpm.tcti)
    _enrolled(tmp_path / "a", s)
    _enrolled(tmp_path / "b", s)
    (tmp_path / "b" / SIDE_FILE).write_bytes((tmp_path / "a" / SIDE_FILE).read_bytes())
    with pytest.raises(AuthenticationFailed) as info:
        _tpm_provider(tmp_path / "b", {"tcti": swtpm.tcti})
    assert "does not open the keystore" in info.value.message


def test_use_rng_mixes_tpm_randomness(tmp_path: Path, swtpm: Swtpm) -> None:
    store = tmp_path / "ks"
    _enrolled(store, TpmSettings(tcti=swtpm.tcti))
    plain = _tpm_provider(store, {"tcti": swtpm.tcti})
    assert plain._extra_entropy() is None
    plain.close()
    p = _tpm_provider(store, {"tcti": swtpm.tcti, "use_rng": True})
    try:
        a, b = p._extra_entropy(), p._extra_entropy()
        assert a is not None and b is not None
        assert len(a) == 64 and a != b
        assert p.health().details["tpm_rng"] == "mixed into new keys"
        _sign_and_verify(p, p.generate_key(KeySpec("rng-mixed")).label)
        _sign_and_verify(p, p.generate_key(KeySpec("rng-mixed-hd", KeyType.BIP32)).label)
    finally:
        p.close()


def test_status(tmp_path: Path, swtpm: Swtpm) -> None:
    store = tmp_path / "ks"
    s = TpmSettings(tcti=swtpm.tcti)
    _new_store(store).close()
    report = status(Keystore.load(store), s)
    assert report["enrolled"] is False
    assert report["reachable"] is True
    ks = Keystore.load(store)
    ks.unlock_with_passphrase(SecretBytes(PASSPHRASE))
    enroll(ks, s)
    ks.close()
    report = status(Keystore.load(store), s)
    assert report["enrolled"] is True
    assert report["unsealable"] is True
    assert report["opens_keystore"] is True
    assert report["tpm"]["manufacturer"] == "IBM"  # type: ignore[index]
    assert SealedBlob.from_json((store / SIDE_FILE).read_bytes()).pcrs == ()


def test_fallback_chain_tpm_then_software(tmp_path: Path, private_swtpm: Swtpm) -> None:
    """Through the real factory: TPM first while it answers; stopped, the chain falls
    back to the passphrase with the TPM's reason recorded."""
    store = tmp_path / "ks"
    _enrolled(store, TpmSettings(tcti=private_swtpm.tcti))
    raw = {
        "environment": "development",
        "network": "regtest",
        "fallback": {"chain": ["tpm", "software"], "timeout_ms": 2000},
        "providers": {"tpm": {"tcti": private_swtpm.tcti}, "software": {"path": str(store)}},
    }
    config = Config.from_mapping(raw, config_dir=tmp_path, env={})
    result = walk_chain(config, None)
    try:
        assert result.provider.name == "tpm"
        assert [a.status for a in result.attempts] == ["ok", "not_tried"]
    finally:
        result.provider.close()

    private_swtpm.stop()
    result = walk_chain(config, SecretBytes(PASSPHRASE))
    try:
        assert result.provider.name == "software"
        first = result.attempts[0]
        assert (first.name, first.status) == ("tpm", "unavailable")
        assert "not reachable" in first.reason
        assert first.error_code == "provider_unavailable"
    finally:
        result.provider.close()
