"""``anyhsm-signer`` driven exactly as Bitcoin Core drives it (both argument styles):
the argument vectors and standard input of ``ExternalSigner``, the first stdout line read
as JSON, exit statuses checked. Descriptors are checked with embit (checksum, origin,
addresses from the BIP39 test words derived independently); signed PSBTs are finalized and
checked by Bitcoin Core's own script interpreter."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from embit import bip32 as ebip32
from embit import bip39 as ebip39
from embit.descriptor import Descriptor as EDescriptor
from embit.descriptor.checksum import add_checksum
from embit.networks import NETWORKS
from tests.bitcoin.kernel import assert_spends
from tests.bitcoin.test_signer import Spend, build_psbt
from tests.signer.conftest import ABANDON, ABANDON_FP, PASSPHRASE, Deployment, make_deployment
from tests.signer.core import Core, CoreError

from anyhsm.bitcoin.bip32 import HARDENED, KeyOrigin
from anyhsm.bitcoin.encoding import hash160
from anyhsm.bitcoin.psbt import Psbt, PsbtOutput
from anyhsm.bitcoin.script import p2wpkh
from anyhsm.bitcoin.tx import TxOut
from anyhsm.ops.psbt import finalize_psbt
from anyhsm.types import Network

EMBIT_NET = {"regtest": NETWORKS["regtest"], "main": NETWORKS["main"]}
ROOT = ebip32.HDKey.from_seed(ebip39.mnemonic_to_seed(ABANDON))
PURPOSES = {"pkh": 44, "sh": 49, "wpkh": 84, "tr": 86}
SPEND_PURPOSES = {"p2pkh": 44, "p2sh-p2wpkh": 49, "p2wpkh": 84, "p2tr": 86}
H = HARDENED


def _kind(desc: str) -> str:
    return desc.split("(", 1)[0]


def _only_line(reply_stdout: str) -> str:
    lines = reply_stdout.splitlines()
    assert len(lines) == 1, reply_stdout
    return lines[0]


def _error(reply_json: object) -> tuple[str, int]:
    assert isinstance(reply_json, dict) and set(reply_json) == {"error", "code"}, reply_json
    return str(reply_json["error"]), int(reply_json["code"])


# --- enumerate ------------------------------------------------------------------------------


def test_enumerate_answers_the_one_hd_key_then_without_the_passphrase(
    dep: Deployment, style: str
) -> None:
    core = dep.core(style)
    reply = core.call_enumerate()
    assert reply.status == 0 and _only_line(reply.stdout) == reply.first_line
    assert json.loads(reply.first_line) == [{"fingerprint": ABANDON_FP, "model": "anyhsm software"}]
    # the keystore wrote the public index: the next call needs no passphrase
    index = dep.directory / "signer-public.json"
    assert index.stat().st_mode & 0o777 == 0o644
    assert PASSPHRASE not in index.read_text()
    locked = Core(style, core.chain, {"ANYHSM_CONFIG": str(dep.config)})
    assert locked.enumerate() == [{"fingerprint": ABANDON_FP, "name": "anyhsm software"}]


def test_enumerate_without_index_or_passphrase_says_how_to_set_up(
    dep: Deployment, style: str
) -> None:
    locked = Core(style, "regtest", {"ANYHSM_CONFIG": str(dep.config)})
    reply = locked.call_enumerate()
    assert reply.status == 0
    [element] = reply.json()  # type: ignore[misc]
    message, code = _error(element)
    assert code == -6 and "anyhsm-signer setup" in message
    with pytest.raises(CoreError, match=r"error: .*no passphrase"):
        locked.enumerate()
    # setup, run once by the operator with the passphrase, writes the index
    setup = dep.core(style).run(dep.core(style).argv(None, ["setup"]))
    assert setup.status == 0
    answer = setup.json()
    assert isinstance(answer, dict) and answer["fingerprint"] == ABANDON_FP
    assert answer["key"] == "core" and answer["model"] == "anyhsm software"
    assert locked.enumerate() == [{"fingerprint": ABANDON_FP, "name": "anyhsm software"}]


def test_several_hd_keys_none_named_is_an_enumerate_error(tmp_path: Path, style: str) -> None:
    dep = make_deployment(tmp_path / "dep", keys=("core", "other"))
    core = dep.core(style)
    reply = core.call_enumerate()
    [element] = reply.json()  # type: ignore[misc]
    message, code = _error(element)
    assert code == -12 and "2 HD keys (core, other) and none is named" in message
    assert "ANYHSM_SIGNER_KEY" in message
    with pytest.raises(CoreError, match="none is named"):
        core.getdescriptors()
    # named by the environment, or by [signer] key
    other_fp = dep.core(style, ANYHSM_SIGNER_KEY="other").the_signer()
    assert other_fp != ABANDON_FP
    dep.add_config('[signer]\nkey = "core"')
    assert dep.core(style).the_signer() == ABANDON_FP
    assert dep.core(style, ANYHSM_SIGNER_KEY="other").the_signer() == other_fp  # env first
    # and every other command refuses the fingerprint of the key that is not exposed
    reply = dep.core(style).call_getdescriptors(other_fp)
    message, code = _error(reply.json())
    assert code == -3 and f"no key with master fingerprint {other_fp}" in message


def test_a_named_key_that_is_not_hd_is_refused(tmp_path: Path, style: str) -> None:
    dep = make_deployment(tmp_path / "dep")
    hsm = dep.open()
    try:
        hsm.generate_key("single")
    finally:
        hsm.close()
    core = dep.core(style, ANYHSM_SIGNER_KEY="single")
    reply = core.call_getdescriptors(ABANDON_FP)
    message, code = _error(reply.json())
    assert code == -9 and "not an HD key" in message
    reply = dep.core(style, ANYHSM_SIGNER_KEY="nosuch").call_enumerate()
    [element] = reply.json()  # type: ignore[misc]
    assert _error(element)[1] == -3


# --- getdescriptors ---------------------------------------------------------------------------


def _check_descriptors(descs: dict[str, list[str]], chain: str, coin: int) -> None:
    """Checksums recomputed by embit, origins, and addresses derived by embit equal the
    addresses of keys derived from the BIP39 words independently."""
    assert [_kind(d) for d in descs["receive"]] == ["pkh", "sh", "wpkh", "tr"]
    assert [_kind(d) for d in descs["internal"]] == ["pkh", "sh", "wpkh", "tr"]
    net = EMBIT_NET[chain]
    for branch, name in ((0, "receive"), (1, "internal")):
        for text in descs[name]:
            body, _, checksum = text.partition("#")
            assert add_checksum(body) == text and len(checksum) == 8
            assert f"/{branch}/*)" in body
            d = EDescriptor.from_string(text)
            origin = d.keys[0].origin
            purpose = PURPOSES[_kind(text)]
            assert origin.fingerprint.hex() == ABANDON_FP
            assert origin.derivation == [purpose | H, coin | H, 0 | H]
            for index in (0, 1, 7):
                key = ROOT.derive([purpose | H, coin | H, H, branch, index])
                mine = EDescriptor.from_string(
                    {
                        "pkh": "pkh({})",
                        "sh": "sh(wpkh({}))",
                        "wpkh": "wpkh({})",
                        "tr": "tr({})",
                    }[_kind(text)].format(key.key.sec().hex())
                )
                assert d.derive(index).address(net) == mine.address(net)


def test_getdescriptors_regtest(dep: Deployment, style: str) -> None:
    core = dep.core(style)
    reply = core.call_getdescriptors(ABANDON_FP, 0)
    assert reply.status == 0 and len(reply.stdout.splitlines()) == 1
    descs = core.getdescriptors()
    _check_descriptors(descs, "regtest", 1)
    assert all("tpub" in d for d in descs["receive"])


def test_getdescriptors_mainnet_gives_the_bip_test_vector_addresses(
    tmp_path: Path, style: str
) -> None:
    dep = make_deployment(tmp_path / "main", Network.MAINNET)
    descs = dep.core(style).getdescriptors()
    _check_descriptors(descs, "main", 0)
    first = [
        EDescriptor.from_string(d).derive(0).address(NETWORKS["main"]) for d in descs["receive"]
    ]
    assert first == [
        "1LqBGSKuX5yYUonjxT5qGfpUsXKYYWeabA",  # BIP44
        "37VucYSaXLCAsxYyAPfbSi9eh4iEcbShgf",  # BIP49
        "bc1qcr8te4kr609gcawutmrza0j4xv80jy8z306fyu",  # BIP84
        "bc1p5cyxnuxmeuwuvkwfem96lqzszd02n6xdcjrs20cac6yqjjwudpxqkedrcr",  # BIP86
    ]


def test_getdescriptors_other_account(dep: Deployment, style: str) -> None:
    reply = dep.core(style).call_getdescriptors(ABANDON_FP, 5)
    descs = reply.json()
    assert isinstance(descs, dict)
    for text in descs["receive"]:
        assert EDescriptor.from_string(text).keys[0].origin.derivation[2] == 5 | H


# --- displayaddress ---------------------------------------------------------------------------


def _inferred(kind: str, path: list[int], chain: str = "regtest") -> tuple[str, str]:
    """What Core's InferDescriptor(...)->ToString() gives for one address of the wallet,
    and the address."""
    key = ROOT.derive(path)
    pub = key.key.sec().hex()
    if kind == "tr":
        pub = pub[2:]
    steps = "/".join(f"{i & ~H}h" if i >= H else str(i) for i in path)
    inner = f"[{ABANDON_FP}/{steps}]{pub}"
    body = {"pkh": "pkh({})", "sh": "sh(wpkh({}))", "wpkh": "wpkh({})", "tr": "tr({})"}[
        kind
    ].format(inner)
    return add_checksum(body), EDescriptor.from_string(body).address(EMBIT_NET[chain])


@pytest.mark.parametrize("kind", ["pkh", "sh", "wpkh", "tr"])
def test_displayaddress_echoes_the_address(dep: Deployment, style: str, kind: str) -> None:
    path = [PURPOSES[kind] | H, 1 | H, H, 0, 3]
    desc, address = _inferred(kind, path)
    dep.core(style).displayaddress(desc, address)  # raises CoreError otherwise


def test_displayaddress_with_an_xpub_descriptor(dep: Deployment, style: str) -> None:
    account = ROOT.derive([84 | H, 1 | H, H]).to_public()
    account_text = account.to_string(NETWORKS["regtest"]["xpub"])
    body = f"wpkh([{ABANDON_FP}/84h/1h/0h]{account_text}/1/4)"
    # embit's address() of a non-ranged xpub descriptor ignores its steps; derive() applies them
    expected = EDescriptor.from_string(body).derive(0).address(NETWORKS["regtest"])
    dep.core(style).displayaddress(add_checksum(body), expected)


def test_displayaddress_refuses_what_is_not_this_key(dep: Deployment, style: str) -> None:
    core = dep.core(style)
    desc, _ = _inferred("wpkh", [84 | H, 1 | H, H, 0, 0])
    foreign_fp = desc.replace(ABANDON_FP, "00000001").split("#")[0]
    other = ebip32.HDKey.from_seed(bytes(32)).derive([84 | H, 1 | H, H, 0, 0])
    wrong_key = f"wpkh([{ABANDON_FP}/84h/1h/0h/0/0]{other.key.sec().hex()})"
    ranged = (
        desc.split("]")[0]
        + "]"
        + ROOT.derive([84 | H, 1 | H, H]).to_public().to_string(NETWORKS["regtest"]["xpub"])
        + "/0/*)"
    )
    off_policy, _ = _inferred("wpkh", [84 | H, 0 | H, H, 0, 0])  # mainnet coin type
    for bad, needle in (
        (foreign_fp, "fingerprint 00000001 is not the master fingerprint"),
        (wrong_key, "public key is not the key"),
        (ranged, "one address"),
        (off_policy, "signing policy would never spend"),
        ("wpkh(", "descriptor"),
    ):
        reply = core.call_displayaddress(ABANDON_FP, bad)
        message, code = _error(reply.json())
        assert needle in message and code in (-7, -14), (bad, message, code)
        with pytest.raises(CoreError, match="Signer returned error"):
            core.displayaddress(bad, "whatever")


# --- signtx -------------------------------------------------------------------------------


def _wallet_psbt(kinds: list[str], chain_coin: int = 1) -> tuple[Psbt, list[TxOut]]:
    """A PSBT spending the wallet's receive addresses of ``kinds``, with a change output at
    the wallet's internal branch, carrying what Core's wallet puts in (BIP32 derivations
    or taproot ones, previous outputs)."""
    spends = []
    for n, kind in enumerate(kinds):
        purpose = SPEND_PURPOSES[kind]
        path = (purpose | H, chain_coin | H, H, 0, n)
        pub = ROOT.derive(list(path)).key.sec()
        spends.append(Spend(kind, [(pub, KeyOrigin(bytes.fromhex(ABANDON_FP), path))], 50_000))
    change_path = (84 | H, chain_coin | H, H, 1, 0)
    change_pub = ROOT.derive(list(change_path)).key.sec()
    change = PsbtOutput(amount=20_000, script=p2wpkh(hash160(change_pub)))
    change.bip32_derivations[change_pub] = KeyOrigin(bytes.fromhex(ABANDON_FP), change_path)
    pay = TxOut(50_000 * len(kinds) - 20_000 - 2_000, bytes.fromhex("0014" + "11" * 20))
    psbt = build_psbt(spends, [pay, change])
    spent = []
    for inp in psbt.inputs:
        if inp.witness_utxo is not None:
            spent.append(inp.witness_utxo)
        else:
            assert inp.non_witness_utxo is not None
            spent.append(inp.non_witness_utxo.outputs[inp.prevout.vout])
    return psbt, spent


@pytest.mark.parametrize(
    "kinds",
    [["p2pkh"], ["p2sh-p2wpkh"], ["p2wpkh"], ["p2tr"], ["p2wpkh", "p2tr", "p2pkh", "p2sh-p2wpkh"]],
)
def test_signtx_finalizes_into_a_transaction_core_accepts(
    dep: Deployment, style: str, kinds: list[str]
) -> None:
    psbt, spent = _wallet_psbt(kinds)
    core = dep.core(style)
    reply = core.call_signtx(ABANDON_FP, psbt.to_base64())
    assert reply.status == 0 and len(reply.stdout.splitlines()) == 1
    answer = reply.json()
    assert isinstance(answer, dict) and set(answer) == {"psbt"}
    signed = Psbt.parse(base64.b64decode(str(answer["psbt"])))
    assert signed.unique_id() == psbt.unique_id()
    result = finalize_psbt(signed)
    assert result.tx is not None
    assert_spends(result.tx, spent)
    audit = (dep.directory / "audit.log").read_text()
    assert "psbt_sign" in audit


def test_signtx_psbt_given_as_an_argument_too(dep: Deployment, style: str) -> None:
    psbt, spent = _wallet_psbt(["p2wpkh"])
    core = dep.core(style)
    reply = core.run(core.argv(ABANDON_FP, ["signtx", psbt.to_base64()]))
    answer = reply.json()
    assert isinstance(answer, dict)
    tx = finalize_psbt(Psbt.parse(base64.b64decode(str(answer["psbt"])))).tx
    assert tx is not None
    assert_spends(tx, spent)


def test_chain_mismatch_is_an_error_and_signs_nothing(dep: Deployment, style: str) -> None:
    psbt, _ = _wallet_psbt(["p2wpkh"])
    before = (dep.directory / "audit.log").read_text().count("psbt_sign")
    for chain in ("main", "test", "testnet4", "signet"):
        core = dep.core(style, chain=chain)
        for reply in (
            core.call_signtx(ABANDON_FP, psbt.to_base64()),
            core.call_getdescriptors(ABANDON_FP),
        ):
            assert reply.status == 0
            message, code = _error(reply.json())
            assert code == -7 and f"chain {chain!r}" in message and "regtest" in message
    assert (dep.directory / "audit.log").read_text().count("psbt_sign") == before
    reply = dep.core(style, chain="bitcoin").call_getdescriptors(ABANDON_FP)
    assert _error(reply.json())[1] == -7


def test_wrong_fingerprint_is_refused(dep: Deployment, style: str) -> None:
    psbt, _ = _wallet_psbt(["p2wpkh"])
    core = dep.core(style)
    for reply in (
        core.call_signtx("00000001", psbt.to_base64()),
        core.call_getdescriptors("deadbeef"),
        core.call_displayaddress("deadbeef", _inferred("wpkh", [84 | H, 1 | H, H, 0, 0])[0]),
    ):
        message, code = _error(reply.json())
        assert code == -3 and "no key with master fingerprint" in message
        assert ABANDON_FP in message


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("cHNidP8BAAoCAAAAAAAAAAAA", "ends before"),  # "psbt\xff" then a truncated map
        ("bm90IGEgcHNidA==", "magic bytes"),  # "not a psbt"
        ("!!!", ""),
    ],
)
def test_malformed_psbt(dep: Deployment, style: str, text: str, needle: str) -> None:
    core = dep.core(style)
    reply = core.call_signtx(ABANDON_FP, text)
    assert reply.status == 0
    message, code = _error(reply.json())
    assert code == -5 and needle in message
    with pytest.raises(CoreError):
        core.signtx(text)


def test_truncated_psbt(dep: Deployment, style: str) -> None:
    psbt, _ = _wallet_psbt(["p2wpkh"])
    cut = base64.b64encode(psbt.serialize()[:-7]).decode()
    _, code = _error(dep.core(style).call_signtx(ABANDON_FP, cut).json())
    assert code == -5


def test_wrong_or_missing_passphrase(dep: Deployment, style: str) -> None:
    psbt, _ = _wallet_psbt(["p2wpkh"])
    wrong = dep.core(style, ANYHSM_PASSPHRASE="not the passphrase of this keystore at all")
    message, code = _error(wrong.call_signtx(ABANDON_FP, psbt.to_base64()).json())
    assert code == -6 and "passphrase does not open" in message
    missing = Core(style, "regtest", {"ANYHSM_CONFIG": str(dep.config)})
    message, code = _error(missing.call_getdescriptors(ABANDON_FP).json())
    assert code == -6 and "no passphrase" in message


def test_passphrase_file_in_the_config(dep: Deployment, style: str) -> None:
    pf = dep.directory / "passphrase"
    pf.write_text(PASSPHRASE)
    pf.chmod(0o600)
    text = dep.config.read_text().replace(
        "[providers.software]\n", '[providers.software]\npassphrase_file = "passphrase"\n'
    )
    dep.config.write_text(text)
    core = Core(style, "regtest", {"ANYHSM_CONFIG": str(dep.config)})
    psbt, spent = _wallet_psbt(["p2tr"])
    signed = Psbt.parse(base64.b64decode(core.signtx(psbt.to_base64())))
    tx = finalize_psbt(signed).tx
    assert tx is not None
    assert_spends(tx, spent)


def test_policy_refusal_is_an_error(dep: Deployment, style: str) -> None:
    psbt, _ = _wallet_psbt(["p2wpkh"])
    psbt.inputs[0].non_witness_utxo = None  # the policy wants the previous transaction
    core = dep.core(style)
    message, code = _error(core.call_signtx(ABANDON_FP, psbt.to_base64()).json())
    assert code == -14 and "previous" in message


# --- the command line -------------------------------------------------------------------------


def test_usage_errors(dep: Deployment, style: str) -> None:
    core = dep.core(style)
    reply = core.run(core.argv(None, ["getdescriptors", "--account", "0"]))
    assert reply.status == 0 and _error(reply.json())[1] == -1
    reply = core.run(core.argv(None, ["frobnicate"]))
    assert reply.status == 2 and _error(json.loads(reply.first_line))[1] == -2
    with pytest.raises(CoreError, match="returned 2: anyhsm-signer: error"):
        reply.json()
    reply = core.run(core.argv("abc", ["getdescriptors"]))
    assert _error(reply.json())[1] == -7
    reply = core.run(core.argv(ABANDON_FP, ["getdescriptors", "--account", "x"]))
    assert reply.status == 2 and _error(json.loads(reply.first_line))[1] == -2


def test_equals_forms_and_short_option(dep: Deployment) -> None:
    core = dep.core("v28")
    base = core.argv(None, [])
    reply = core.run(
        [*base, f"--fingerprint={ABANDON_FP}", "--chain=regtest", "getdescriptors", "--account=0"]
    )
    assert isinstance(reply.json(), dict) and "receive" in reply.json()  # type: ignore[operator]
    desc, address = _inferred("wpkh", [84 | H, 1 | H, H, 0, 0])
    reply = core.run(
        [*base, "-f", ABANDON_FP.upper(), "--chain", "regtest", "displayaddress", f"--desc={desc}"]
    )
    assert reply.json() == {"address": address}
    reply = core.run([*base, "--config", str(dep.config), "enumerate"])
    assert reply.json() == [{"fingerprint": ABANDON_FP, "model": "anyhsm software"}]
