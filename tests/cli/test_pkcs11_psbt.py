"""A Bitcoin PSBT signed with a key held in a real SoftHSM2 token (P2WPKH, single key)
finalizes into a valid transaction; taproot inputs are refused with a clear reason
because the token cannot make BIP340 signatures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from embit import ec as embit_ec
from embit import script as embit_script
from embit.transaction import Transaction as EmbitTx
from tests.bitcoin.test_signer import Spend, build_psbt

from anyhsm import open_hsm
from anyhsm.bitcoin import Psbt, finalize_psbt
from anyhsm.cli.main import main
from anyhsm.ops.psbt import sign_psbt


@pytest.fixture
def pkcs11_config(deployment: Path, token: object, monkeypatch: pytest.MonkeyPatch) -> Path:
    text = deployment.read_text().replace('chain = ["software"]', 'chain = ["pkcs11"]')
    text += f'\n[providers.pkcs11]\nmodule = "{token.module}"\ntoken_label = "{token.label}"\n'  # type: ignore[attr-defined]
    deployment.write_text(text)
    monkeypatch.setenv("ANYHSM_PKCS11_PIN", token.pin)  # type: ignore[attr-defined]
    return deployment


def test_p2wpkh_psbt_signed_in_the_token_finalizes(pkcs11_config: Path, tmp_path: Path) -> None:
    with open_hsm(pkcs11_config) as hsm:
        assert hsm.active_provider == "pkcs11"
        info = hsm.generate_key("token-hot")
        psbt = build_psbt([Spend("p2wpkh", [(info.public_key, None)]),
                           Spend("p2wpkh", [(info.public_key, None)], amount=55_000)])  # fmt: skip
        signed = sign_psbt(hsm, psbt, "token-hot")
        assert signed.signed_inputs == 2
        done = finalize_psbt(signed.psbt)
        assert done.complete and done.tx is not None
        hsm.delete_key("token-hot")

    # Independent check with embit: every witness signature verifies under the BIP143
    # sighash embit computes for the extracted transaction.
    tx = EmbitTx.parse(done.tx.serialize())
    for i, inp in enumerate(psbt.inputs):
        spent = inp.spent_output()
        assert spent is not None
        der_and_type, pub = tx.vin[i].witness.items
        assert pub == info.public_key
        script_code = embit_script.p2pkh(embit_ec.PublicKey.parse(pub))
        h = tx.sighash_segwit(i, script_code, spent.value, sighash=der_and_type[-1])
        sig = embit_ec.Signature.parse(der_and_type[:-1])
        assert embit_ec.PublicKey.parse(pub).verify(sig, h)


def test_taproot_input_reports_missing_schnorr(
    pkcs11_config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with open_hsm(pkcs11_config) as hsm:
        info = hsm.generate_key("token-tr")
        psbt = build_psbt([Spend("p2tr", [(info.public_key, None)])])
    f = tmp_path / "tr.psbt"
    f.write_text(psbt.to_base64())
    code = main(["--config", str(pkcs11_config), "psbt", "sign", "token-tr", str(f), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 9  # nothing could be signed
    assert "schnorr" in json.dumps(out).lower() or "bip340" in json.dumps(out).lower()
    with open_hsm(pkcs11_config) as hsm:
        hsm.delete_key("token-tr")
    assert Psbt.parse(f.read_text()).serialize() == psbt.serialize()  # input untouched


@pytest.mark.parametrize(
    ("command", "kind"), [("address", "p2tr"), ("descriptor", "tr")], ids=["address", "descriptor"]
)
def test_no_taproot_address_or_descriptor_for_a_token_key(
    pkcs11_config: Path, capsys: pytest.CaptureFixture[str], command: str, kind: str
) -> None:
    """Issue 10 item 4: a taproot address for a key that can never make a BIP340 signature
    would strand the coins sent there: refused, naming the capability; ECDSA types work."""
    with open_hsm(pkcs11_config) as hsm:
        hsm.generate_key("token-addr")
    try:
        c = ["--config", str(pkcs11_config)]
        code = main([*c, command, "token-addr", "--type", kind, "--json"])
        out = json.loads(capsys.readouterr().out)
        assert code == 4 and out["error"]["code"] == "unsupported_operation", out
        assert "BIP340" in out["error"]["message"] and "never be spent" in out["error"]["message"]
        ecdsa = "p2wpkh" if command == "address" else "wpkh"
        code = main([*c, command, "token-addr", "--type", ecdsa, "--json"])
        out = json.loads(capsys.readouterr().out)
        assert code == 0, out
    finally:
        with open_hsm(pkcs11_config) as hsm:
            hsm.delete_key("token-addr")
