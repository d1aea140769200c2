"""The keystore manifest as the spending policy's anchor (asked by the policy engine):
the active policy's hash and version are authenticated state under the generation, every
change is one audited step, and the state secret outlives master-key rotations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.conftest import PASSPHRASE

from anyhsm import open_hsm
from anyhsm.errors import EnrolmentOnlyHandle, KeystoreError, UnsupportedFormatVersion
from anyhsm.hsm import open_for_enrolment
from anyhsm.keystore import Keystore, manifest
from anyhsm.secret import SecretBytes

SHA_A = "a" * 64
SHA_B = "0123456789abcdef" * 4
NEW = "another passphrase, also long enough for production use"


def manifest_body(deployment: Path) -> dict[str, object]:
    ks = Keystore.load(deployment.parent / "keystore")
    body: dict[str, object] = json.loads((ks.keys_dir / manifest.FILE_NAME).read_bytes())
    return body


def ops(deployment: Path, op: str) -> list[object]:
    lines = (deployment.parent / "audit.log").read_text().splitlines()
    return [e["outcome"] for e in map(json.loads, lines) if e["op"] == op]


def test_the_policy_binding_is_audited_versioned_state(deployment: Path) -> None:
    assert manifest_body(deployment)["version"] == 1  # nothing set: still readable by v1
    with open_hsm(deployment) as hsm:
        assert hsm.policy_binding() is None
        generation = hsm.anchor.generation
        assert hsm.set_policy_binding(SHA_A, {"file": "policy.toml"}) == 1
        assert hsm.policy_binding() == (SHA_A, 1)
        assert hsm.anchor.generation == (generation or 0) + 1
        with pytest.raises(KeystoreError):
            hsm.set_policy_binding("not a hash", {})
    assert manifest_body(deployment)["version"] == 2
    with open_hsm(deployment) as hsm:  # persisted, authenticated
        assert hsm.policy_binding() == (SHA_A, 1)
        assert hsm.set_policy_binding(None, {}) == 2
        assert hsm.policy_binding() is None
        assert hsm.set_policy_binding(SHA_B, {}) == 3  # versions never go back
        assert hsm.policy_binding() == (SHA_B, 3)
        assert hsm.verify_audit().ok
    assert (
        ops(deployment, "policy_set")
        == ["started", "ok", "started", "error"]
        + [
            "started",
            "ok",
        ]
        * 2
    )


def test_a_v1_reader_refuses_a_store_holding_a_binding(
    deployment: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with open_hsm(deployment) as hsm:
        hsm.set_policy_binding(SHA_A, {})
    monkeypatch.setattr(manifest, "VERSION", 1)  # an anyhsm from before the binding
    ks = Keystore.load(deployment.parent / "keystore")
    with pytest.raises(UnsupportedFormatVersion, match="manifest format 2"):
        ks.unlock_with_passphrase(SecretBytes(PASSPHRASE.encode()))


def test_the_state_key_outlives_master_key_rotations(deployment: Path) -> None:
    with open_hsm(deployment) as hsm:
        first = hsm.state_key("spending-policy")
        assert len(first) == 32
        other = hsm.state_key("something-else")
        assert not other.equals(first)
        hsm.rotate_master_key(SecretBytes(PASSPHRASE.encode()))
        assert hsm.state_key("spending-policy").equals(first)
        hsm.change_passphrase(SecretBytes(PASSPHRASE.encode()), SecretBytes(NEW.encode()))
        assert hsm.anchor.epoch == 3
    with open_hsm(deployment, passphrase=NEW) as hsm:
        again = hsm.state_key("spending-policy")
        assert again.equals(first)
    for k in (first, other, again):
        k.wipe()


def test_the_enrolment_only_handle_sets_no_policy(deployment: Path) -> None:
    with open_for_enrolment(deployment, passphrase=PASSPHRASE) as admin:
        with pytest.raises(EnrolmentOnlyHandle):
            admin.set_policy_binding(SHA_A, {})
        with pytest.raises(EnrolmentOnlyHandle):
            admin.state_key("spending-policy")
        assert admin.policy_binding() is None
