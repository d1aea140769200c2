"""Keys are never swapped (issue 9, item 9), on real SoftHSM2 tokens.

A deployment with a token and the keystore as its anchor: the keystore is the key
directory. The attacks: another application (anyone with the user PIN) plants a
token object labelled like a key; another token is configured that holds a key with
the same label and CKA_ID; the key object is replaced on the same token under the
same CKA_ID and label. The planting is done by a separate process through
python-pkcs11, as another application would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from tests.support.softhsm import SoftHsmToken

from anyhsm import open_hsm
from anyhsm.cli.main import main
from anyhsm.crypto import secp256k1 as curve
from anyhsm.errors import HsmError
from anyhsm.providers.pkcs11.keys import decode_ec_point

# Another application on the same token: its own process, its own login.
_PLANT = r"""
import os, sys
import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass

module, token_label, pin, action, label, key_id = sys.argv[1:7]
lib = pkcs11.lib(module)
token = lib.get_token(token_label=token_label)
key_id = bytes.fromhex(key_id) if key_id != "-" else os.urandom(16)
with token.open(rw=True, user_pin=pin) as s:
    if action in ("replace", "delete"):
        for cls in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
            for obj in s.get_objects({Attribute.CLASS: cls, Attribute.ID: key_id}):
                obj.destroy()
        if action == "delete":
            sys.exit(0)
    pub, priv = s.generate_keypair(
        KeyType.EC,
        id=key_id,
        label=label,
        store=True,
        capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
        mechanism=Mechanism.EC_KEY_PAIR_GEN,
        public_template={Attribute.EC_PARAMS: bytes.fromhex("06052b8104000a")},
    )
    print(bytes(pub[Attribute.EC_POINT]).hex())
"""


def plant(token: SoftHsmToken, label: str, key_id: str = "-", *, action: str = "plant") -> bytes:
    """Generate a secp256k1 pair on ``token`` from another process (``replace``: after
    destroying the objects with ``key_id``); its public key. ``delete`` only destroys."""
    args = [token.module, token.label, token.pin, action, label]
    proc = subprocess.run(
        [sys.executable, "-c", _PLANT, *args, key_id],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=dict(os.environ, SOFTHSM2_CONF=str(token.conf)),
    )
    assert proc.returncode == 0, proc.stderr
    if action == "delete":
        return b""
    return decode_ec_point(bytes.fromhex(proc.stdout.strip()))


def configure(deployment: Path, token: SoftHsmToken, chain: str = '["pkcs11", "software"]') -> Path:
    """The deployment's config with the token in the chain (the keystore stays the anchor)."""
    text = deployment.read_text()
    text = text.split("\n[providers.pkcs11]")[0]
    for old in ('chain = ["software"]', 'chain = ["pkcs11", "software"]'):
        text = text.replace(old, f"chain = {chain}")
    text += f'\n[providers.pkcs11]\nmodule = "{token.module}"\ntoken_label = "{token.label}"\n'
    deployment.write_text(text)
    return deployment


def label() -> str:
    return f"routing-{uuid.uuid4().hex[:10]}"


def refuses(code: str, fn: object, *args: object) -> HsmError:
    """``fn(*args)`` raises the anyhsm error ``code`` (checked by code, so this file
    imports on the code before the fix and the test fails there on the attack)."""
    with pytest.raises(HsmError) as e:
        fn(*args)  # type: ignore[operator]
    assert e.value.code == code, e.value
    return e.value


@pytest.fixture
def pin_env(softhsm: SoftHsmToken, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANYHSM_PKCS11_PIN", softhsm.pin)


def test_planted_token_object_never_signs_for_a_keystore_key(
    deployment: Path, softhsm: SoftHsmToken, pin_env: None
) -> None:
    name = label()
    with open_hsm(deployment) as hsm:  # chain ["software"]: the key is made in the keystore
        assert hsm.active_provider == "software"
        mine = hsm.generate_key(name)
    planted = plant(softhsm, name)  # another application, same label, on the token
    assert planted != mine.public_key
    configure(deployment, softhsm)
    digest = os.urandom(32)
    with open_hsm(deployment) as hsm:
        assert hsm.active_provider == "pkcs11"
        err = refuses("key_label_conflict", hsm.sign, name, digest)
        assert mine.store in err.message and f"pkcs11:{softhsm.serial}" in err.message
        refuses("key_label_conflict", hsm.get_key, name)
        # by its id the key resolves through the directory only: the keystore key signs
        sig = hsm.sign(mine.id, digest)
        assert curve.ecdsa_verify(mine.public_key, digest, sig)
        assert not curve.ecdsa_verify(planted, digest, sig)
        assert hsm.get_key(mine.id).provider == "software"
    ops = [
        line for line in hsm.audit_path.read_text().splitlines() if '"key_label_conflict"' in line
    ]
    assert ops, "the refusal is in the audit log"


def test_token_object_unknown_to_the_directory_is_never_used(
    deployment: Path, softhsm: SoftHsmToken, pin_env: None
) -> None:
    name = label()
    planted = plant(softhsm, name)
    configure(deployment, softhsm)
    with open_hsm(deployment) as hsm:
        assert hsm.active_provider == "pkcs11"
        err = refuses("key_not_in_directory", hsm.sign, name, os.urandom(32))
        assert f"pkcs11:{softhsm.serial}" in err.message
        assert all(k.public_key != planted for k in hsm.list_keys())
        # nor can anyhsm be made to adopt the label into the directory by creating it
        refuses("key_exists", hsm.generate_key, name)


@pytest.mark.parametrize("same_id", [True, False], ids=["same-cka-id", "same-label"])
def test_another_token_with_the_same_key_names_is_refused(
    deployment: Path,
    softhsm: SoftHsmToken,
    second_token: SoftHsmToken,
    pin_env: None,
    monkeypatch: pytest.MonkeyPatch,
    same_id: bool,
) -> None:
    name = label()
    configure(deployment, softhsm)
    with open_hsm(deployment) as hsm:
        assert hsm.active_provider == "pkcs11"
        cold = hsm.generate_key(name)
    other = plant(second_token, name, cold.id if same_id else "-")
    configure(deployment, second_token)  # the operator (or an attacker) points at another token
    monkeypatch.setenv("ANYHSM_PKCS11_PIN", second_token.pin)
    digest = os.urandom(32)
    with open_hsm(deployment) as hsm:
        assert hsm.active_provider == "pkcs11"
        for ref in (name, cold.id):
            err = refuses("key_binding_mismatch", hsm.sign, ref, digest)
            assert f"pkcs11:{softhsm.serial}" in err.message
            assert f"pkcs11:{second_token.serial}" in err.message and "pkcs11" in err.message
            assert name in err.message
        refuses("key_binding_mismatch", hsm.sign_many, name, [(digest, cold_scheme(), None)])
        assert all(k.public_key != other for k in hsm.list_keys())
    assert err.exit_code == 8


def cold_scheme() -> object:
    from anyhsm.types import SigScheme

    return SigScheme.ECDSA


def test_replaced_key_object_is_a_typed_error_never_a_signature(
    deployment: Path, softhsm: SoftHsmToken, pin_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    name = label()
    configure(deployment, softhsm)
    with open_hsm(deployment) as hsm:
        cold = hsm.generate_key(name)
    new_pub = plant(softhsm, name, cold.id, action="replace")  # same serial, CKA_ID, label
    assert new_pub != cold.public_key
    digest = os.urandom(32)
    with open_hsm(deployment) as hsm:
        for ref in (name, cold.id):
            err = refuses("key_binding_mismatch", hsm.sign, ref, digest)
            assert cold.public_key.hex() in err.message and new_pub.hex() in err.message
            assert f"pkcs11:{softhsm.serial}" in err.message
        refuses("key_binding_mismatch", hsm.get_key, name)
    # the CLI: a typed error in --json, exit 8, no signature on stdout
    code = main(
        ["--config", str(deployment), "sign", "--key", name, "--digest", "ab" * 32, "--json"]
    )
    out = json.loads(capsys.readouterr().out)
    assert code == 8 and out["error"]["code"] == "key_binding_mismatch"
    assert "signature" not in out


def _close_all_sessions(hsm: object) -> None:
    """Fault injection through the real module: every session of this process on the
    token closes (as after a token reset), so the provider reconnects and looks the key
    up again instead of using what it cached."""
    from anyhsm.providers.pkcs11.module import loaded_module

    provider = hsm._active  # type: ignore[attr-defined]
    module = loaded_module(str(provider.settings.module))
    facts = provider._conn.facts
    assert module is not None and facts is not None
    with module.gate.shared(5.0):
        assert module.cryptoki.close_all_sessions(facts.slot_id) == 0


@pytest.mark.parametrize("attack", ["replaced", "deleted-then-id-as-label"])
def test_key_object_swapped_while_the_handle_is_open_never_signs(
    deployment: Path, softhsm: SoftHsmToken, pin_env: None, attack: str
) -> None:
    """The signing hot path (routing cached in the handle, the key cached in the
    provider) when another application swaps the key object and the provider has to
    look it up again."""
    name = label()
    configure(deployment, softhsm)
    with open_hsm(deployment) as hsm:
        cold = hsm.generate_key(name)
        first = os.urandom(32)
        assert curve.ecdsa_verify(cold.public_key, first, hsm.sign(name, first))
        if attack == "replaced":
            new_pub = plant(softhsm, name, cold.id, action="replace")
            expected = "key_binding_mismatch"
        else:  # the key is gone; an object labelled with its id's hex takes its place
            plant(softhsm, name, cold.id, action="delete")
            new_pub = plant(softhsm, cold.id)
            expected = "key_not_found"
        _close_all_sessions(hsm)
        digest = os.urandom(32)
        outcomes: list[str] = []
        for ref in (name, cold.id, name):
            try:
                sig = hsm.sign(ref, digest)
            except HsmError as e:
                outcomes.append(e.code)
            else:
                planted = curve.ecdsa_verify(new_pub, digest, sig)
                outcomes.append("signed" + (" with the planted key" * planted))
        assert outcomes == [expected] * 3


def test_key_deleted_from_the_token_elsewhere_leaves_a_record_key_delete_removes(
    deployment: Path, softhsm: SoftHsmToken, pin_env: None
) -> None:
    name = label()
    configure(deployment, softhsm)
    with open_hsm(deployment) as hsm:
        cold = hsm.generate_key(name)
    plant(softhsm, name, cold.id, action="delete")  # another application deletes it
    with open_hsm(deployment) as hsm:
        err = refuses("key_not_found", hsm.sign, name, os.urandom(32))
        assert cold.id in err.message and f"pkcs11:{softhsm.serial}" in err.message
        hsm.delete_key(name)  # the directory record goes; nothing else is touched
        refuses("key_not_found", hsm.get_key, cold.id)
        again = hsm.generate_key(name)  # the label is free again
        assert again.id != cold.id
        hsm.delete_key(again.id)
