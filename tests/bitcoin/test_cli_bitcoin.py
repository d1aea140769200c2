"""The Bitcoin CLI commands through ``anyhsm.cli.main.main`` (and once as a real process):
xpub, address, descriptor, psbt inspect|sign|finalize, message sign|verify; --json shapes,
exit codes, PSBT input and output formats."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from embit.descriptor import Descriptor as EmbitDescriptor
from tests.bitcoin.test_signer import PASSPHRASE, Spend, Wallet, build_psbt

from anyhsm.bitcoin import Psbt
from anyhsm.bitcoin.bip39 import mnemonic_to_seed
from anyhsm.bitcoin.psbt_fields import MAGIC
from anyhsm.cli.main import main
from anyhsm.deploy import FAST_DEV_KDF, init_deployment
from anyhsm.secret import SecretBytes
from anyhsm.types import Network

MNEMONIC = "abandon " * 11 + "about"
Run = Callable[..., tuple[int, str, str]]


def _deploy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, network: Network) -> Path:
    monkeypatch.setenv("ANYHSM_PASSPHRASE", PASSPHRASE)
    cfg = init_deployment(
        tmp_path / network.value,
        SecretBytes(PASSPHRASE.encode()),
        kdf=FAST_DEV_KDF,
        network=network,
    )
    monkeypatch.setenv("ANYHSM_CONFIG", str(cfg))
    return cfg


def _import_wallet(r: Run, directory: Path) -> None:
    """Import the test mnemonic from a 0600 file (secrets never go in argv)."""
    words = directory / "mnemonic.txt"
    words.write_text(MNEMONIC + "\n")
    words.chmod(0o600)
    code, _, err = r("key", "import", "--label", "w", "--mnemonic-file", str(words))
    assert code == 0, err


def _runner(capsys: pytest.CaptureFixture[str]) -> Run:
    def run(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Run:
    """Regtest deployment with the BIP39 'abandon ... about' wallet imported as ``w``."""
    _deploy(tmp_path, monkeypatch, Network.REGTEST)
    r = _runner(capsys)
    _import_wallet(r, tmp_path)
    return r


@pytest.fixture
def mainnet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Run:
    _deploy(tmp_path, monkeypatch, Network.MAINNET)
    r = _runner(capsys)
    _import_wallet(r, tmp_path)
    return r


def _json(out: str) -> dict[str, object]:
    data = json.loads(out)
    assert isinstance(data, dict)
    return data


def _wallet() -> Wallet:
    with mnemonic_to_seed(MNEMONIC) as seed:
        return Wallet("w", bytes(seed.buffer))


def _psbt_file(tmp_path: Path, spends: list[Spend], name: str = "in.psbt", **kw: object) -> Path:
    p = tmp_path / name
    p.write_text(build_psbt(spends, **kw).to_base64())  # type: ignore[arg-type]
    return p


# --- keys, addresses, descriptors -------------------------------------------------------------


def test_xpub_json(mainnet: Run) -> None:
    code, out, _ = mainnet("xpub", "w", "m/84'/0'/0'", "--json")
    assert code == 0
    data = _json(out)
    assert data["xpub"] == (  # BIP84's account 0 key, written as xpub
        "xpub6CatWdiZiodmUeTDp8LT5or8nmbKNcuyvz7WyksVFkKB4RHwCD3XyuvPEbvqAQY3rAPshWcMLoP2fMFMKHPJ4Ze"
        "ZXYVUhLv1VMrjPC7PW6V"
    )
    assert data["origin"] == "[73c5da0a/84'/0'/0']" and data["master_fingerprint"] == "73c5da0a"
    code, out, _ = mainnet("xpub", "w", "m/84h/0h/0h", "--slip132", "zpub")
    assert out.strip() == (
        "zpub6rFR7y4Q2AijBEqTUquhVz398htDFrtymD9xYYfG1m4wAcvPhXNfE3EfH1r1ADqtfSdVCToUG868RvUUkgDKf3"
        "1mGDtKsAYz2oz2AGutZYs"
    )


@pytest.mark.parametrize(
    ("kind", "path", "address"),
    [
        ("p2pkh", "m/44'/0'/0'/0/0", "1LqBGSKuX5yYUonjxT5qGfpUsXKYYWeabA"),
        ("p2sh-p2wpkh", "m/49'/0'/0'/0/0", "37VucYSaXLCAsxYyAPfbSi9eh4iEcbShgf"),
        ("p2wpkh", "m/84'/0'/0'/0/0", "bc1qcr8te4kr609gcawutmrza0j4xv80jy8z306fyu"),  # BIP84
        (
            "p2tr",
            "m/86'/0'/0'/0/0",
            "bc1p5cyxnuxmeuwuvkwfem96lqzszd02n6xdcjrs20cac6yqjjwudpxqkedrcr",
        ),
    ],
)
def test_address_json(mainnet: Run, kind: str, path: str, address: str) -> None:
    code, out, _ = mainnet("address", "w", path, "--type", kind, "--json")
    assert code == 0
    data = _json(out)
    assert data["address"] == address and data["type"] == kind and data["path"] == path
    # without a path an HD key uses its type's standard path (account 0, index 0)
    assert _json(mainnet("address", "w", "--type", kind, "--json")[1])["address"] == address


def test_descriptor(mainnet: Run) -> None:
    code, out, _ = mainnet("descriptor", "w", "--type", "wpkh", "--json")
    assert code == 0
    data = _json(out)
    receive = EmbitDescriptor.from_string(str(data["receive"]))
    assert receive.derive(0).address() == "bc1qcr8te4kr609gcawutmrza0j4xv80jy8z306fyu"
    assert str(data["descriptor"]).startswith("wpkh([73c5da0a/84'/0'/0']xpub6CatWdiZ")
    assert "/<0;1>/*)#" in str(data["descriptor"])
    code, out, _ = mainnet("descriptor", "w", "--type", "tr", "--account", "1")
    assert code == 0 and "tr([73c5da0a/86'/0'/1']" in out


def test_single_key_is_used_as_is(run: Run) -> None:
    assert run("key", "create", "--label", "s")[0] == 0
    code, out, _ = run("address", "s", "--type", "p2wpkh", "--json")
    assert code == 0 and str(_json(out)["address"]).startswith("bcrt1q")
    assert run("address", "s", "m", "--type", "p2tr")[0] == 0
    code, _, err = run("address", "s", "m/0", "--type", "p2wpkh")
    assert code == 4
    assert "does not support BIP32 derivation" in err and "single" in err
    code, _, err = run("xpub", "s")
    assert code == 4 and "no chain code" in err
    code, out, _ = run("descriptor", "s", "--type", "wpkh")
    assert code == 0 and out.startswith(("wpkh(02", "wpkh(03"))


# --- PSBTs ------------------------------------------------------------------------------------


def test_psbt_sign_json(run: Run, tmp_path: Path) -> None:
    w = _wallet()
    stranger = Wallet("x", b"\x05" * 32)
    f = _psbt_file(
        tmp_path,
        [
            Spend("p2wpkh", [w.key("m/84'/1'/0'/0/0")]),
            Spend("p2tr", [w.key("m/86'/1'/0'/0/0")]),
            Spend("p2wpkh", [stranger.key("m/84'/1'/0'/0/0")]),
        ],
    )
    code, out, _ = run("psbt", "sign", "w", str(f), "--json")
    assert code == 0
    data = _json(out)
    signed = Psbt.parse(str(data["psbt"]))
    assert len(signed.inputs[0].partial_sigs) == 1 and signed.inputs[1].tap_key_sig is not None
    inputs = data["inputs"]
    assert isinstance(inputs, list)
    assert [i["status"] for i in inputs] == ["signed", "signed", "not-signed"]
    assert inputs[0]["signatures"][0]["path"] == "m/84'/1'/0'/0/0"
    assert data["signed_inputs"] == 2 and data["fee"] == 1000
    assert {"outputs", "warnings", "vsize", "fee_rate"} <= data.keys()


def test_psbt_sign_text_mode_and_formats(
    run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = _wallet()
    psbt = build_psbt([Spend("p2wpkh", [w.key("m/84'/1'/0'/0/0")])])
    files = {
        "b64": psbt.to_base64().encode(),
        "hex": psbt.to_hex().encode() + b"\n",
        "bin": psbt.serialize(),
    }
    results = set()
    for name, content in files.items():
        f = tmp_path / name
        f.write_bytes(content)
        code, out, err = run("psbt", "sign", "w", str(f))
        assert code == 0
        assert len(out.splitlines()) == 1  # only the signed PSBT on stdout
        assert "signed 1 of 1 input(s)" in err
        results.add(out.strip())
    assert len(results) == 1
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(psbt.serialize())))
    code, out, _ = run("psbt", "sign", "w", "-")
    assert code == 0 and out.strip() in results
    out_file = tmp_path / "signed.psbt"
    code, out, _ = run("psbt", "sign", "w", str(tmp_path / "bin"), "--out", str(out_file))
    assert code == 0 and out_file.read_text().strip() in results
    code, out, _ = run(
        "psbt", "sign", "w", str(tmp_path / "bin"), "--out", str(out_file), "--binary", "--json"
    )
    raw = out_file.read_bytes()
    assert code == 0 and raw.startswith(MAGIC)
    assert base64.b64encode(raw).decode() in results
    assert _json(out)["out"] == str(out_file)


def test_nothing_signed_exits_9(run: Run, tmp_path: Path) -> None:
    stranger = Wallet("x", b"\x05" * 32)
    f = _psbt_file(tmp_path, [Spend("p2wpkh", [stranger.key("m/84'/1'/0'/0/0")])])
    code, out, err = run("psbt", "sign", "w", str(f))
    assert code == 9 and out == ""
    assert err.count("\n") == 1 and err.startswith("anyhsm: error: no input of the PSBT")
    code, out, err = run("psbt", "sign", "w", str(f), "--json")
    assert code == 9
    error = _json(out)["error"]
    assert isinstance(error, dict) and error["code"] == "nothing_signed"
    assert error["details"][0]["status"] == "not-signed"


@pytest.mark.parametrize(
    "content",
    [b"", b"not a psbt at all", b"cHNidP8BAAoCAAAAAAAAAAAAAA", MAGIC + b"\x00\x01"],
)
def test_malformed_psbt_is_one_line_exit_2(run: Run, tmp_path: Path, content: bytes) -> None:
    f = tmp_path / "bad.psbt"
    f.write_bytes(content)
    for cmd in (
        ["psbt", "sign", "w", str(f)],
        ["psbt", "inspect", str(f)],
        ["psbt", "finalize", str(f)],
    ):
        code, out, err = run(*cmd)
        assert code == 2, (cmd, err)
        assert err.count("\n") == 1 and err.startswith("anyhsm: error:")
        assert "Traceback" not in err and out == ""
    code, out, _ = run("psbt", "inspect", str(f), "--json")
    assert code == 2 and _json(out)["error"]["code"] == "psbt_error"  # type: ignore[index]
    code, _, err = run("psbt", "inspect", str(tmp_path / "missing.psbt"))
    assert code == 2 and "cannot read PSBT file" in err


def test_malformed_psbt_in_a_real_process(tmp_path: Path) -> None:
    f = tmp_path / "bad.psbt"
    f.write_text("cHNidP8=")
    proc = subprocess.run(
        [sys.executable, "-m", "anyhsm.cli.main", "psbt", "inspect", str(f)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_policy_refusal_exits_7(run: Run, tmp_path: Path) -> None:
    w = _wallet()
    f = _psbt_file(tmp_path, [Spend("p2wpkh", [w.key("m/84'/1'/0'/0/0")], sighash=0x02)])
    code, out, err = run("psbt", "sign", "w", str(f))
    assert code == 7 and "input 0" in err and "sighash" in err and out == ""


def test_psbt_inspect(run: Run, tmp_path: Path) -> None:
    w = _wallet()
    f = _psbt_file(tmp_path, [Spend("p2wpkh", [w.key("m/84'/1'/0'/0/0")], amount=70_000)])
    code, out, _ = run("psbt", "inspect", str(f), "--json")
    assert code == 0
    data = _json(out)
    assert data["network"] == "regtest" and data["fee"] == 1000 and data["finalized"] is False
    inputs, outputs = data["inputs"], data["outputs"]
    assert isinstance(inputs, list) and isinstance(outputs, list)
    assert inputs[0]["script_type"] == "p2wpkh" and inputs[0]["amount"] == 70_000
    assert inputs[0]["derivations"][0]["origin"] == "[73c5da0a/84'/1'/0'/0/0]"
    assert str(outputs[0]["address"]).startswith("bcrt1q")
    code, out, _ = run("psbt", "inspect", str(f), "--network", "mainnet")
    assert code == 0 and "bc1q" in out and "fee 1000 sat" in out


def test_psbt_finalize(run: Run, tmp_path: Path) -> None:
    w = _wallet()
    f = _psbt_file(tmp_path, [Spend("p2wpkh", [w.key("m/84'/1'/0'/0/0")])])
    code, out, _ = run("psbt", "finalize", str(f), "--json")
    assert code == 1
    data = _json(out)
    assert data["complete"] is False and "tx" not in data and "psbt" in data
    signed = tmp_path / "signed.psbt"
    assert run("psbt", "sign", "w", str(f), "--out", str(signed))[0] == 0
    code, out, _ = run("psbt", "finalize", str(signed), "--json")
    assert code == 0
    data = _json(out)
    assert data["complete"] is True and isinstance(data["tx"], str)
    assert Psbt.parse(str(data["psbt"])).is_finalized()
    code, out, err = run("psbt", "finalize", str(signed))
    assert code == 0 and out.strip() == data["tx"] and "complete: txid" in err


# --- messages ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "bip322"),
    [("p2pkh", False), ("p2sh-p2wpkh", False), ("p2wpkh", False), ("p2wpkh", True), ("p2tr", True)],
)
def test_message_sign_and_verify(run: Run, kind: str, bip322: bool) -> None:
    path = {"p2pkh": "m/44'/1'/0'/0/0", "p2sh-p2wpkh": "m/49'/1'/0'/0/0"}.get(
        kind, "m/84'/1'/0'/0/0" if kind == "p2wpkh" else "m/86'/1'/0'/0/0"
    )
    args = ["message", "sign", "w", path, "hello anyhsm", "--type", kind, "--json"]
    code, out, _ = run(*args, *(["--bip322"] if bip322 else []))
    assert code == 0
    data = _json(out)
    assert data["format"] == ("bip322" if bip322 else "bip137")
    address, sig = str(data["address"]), str(data["signature"])
    assert address == _json(run("address", "w", path, "--type", kind, "--json")[1])["address"]
    code, out, _ = run("message", "verify", address, "hello anyhsm", sig, "--json")
    assert code == 0 and _json(out)["valid"] is True
    code, out, _ = run("message", "verify", address, "hello anyhsn", sig)
    assert code == 1 and out.strip() == "INVALID"


def test_message_taproot_needs_bip322(run: Run) -> None:
    code, _, err = run("message", "sign", "w", "m/86'/1'/0'/0/0", "hi", "--type", "p2tr")
    assert code == 2 and "--bip322" in err


def test_message_verify_refuses_other_network(run: Run) -> None:
    code, _, err = run(
        "message", "verify", "bc1qcr8te4kr609gcawutmrza0j4xv80jy8z306fyu", "hi", "AAAA"
    )
    assert code == 7 and "mainnet" in err


def test_message_verify_without_config(run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, _ = run(
        "message", "sign", "w", "m/84'/1'/0'/0/0", "hi", "--type", "p2wpkh", "--json"
    )
    data = _json(out)
    monkeypatch.delenv("ANYHSM_CONFIG")
    code, out, _ = run("message", "verify", str(data["address"]), "hi", str(data["signature"]))
    assert code == 0 and out.strip() == "valid"


def test_psbt_sign_refuses_an_oversized_file_before_parsing(
    deployment: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """policy.max_psbt_bytes is applied by the CLI to the bytes read, before decoding."""
    monkeypatch.setenv("ANYHSM_POLICY__MAX_PSBT_BYTES", "1000")
    big = tmp_path / "big.psbt"
    big.write_bytes(b"psbt\xff" + b"\x00" * 5000)
    code = main(["--config", str(deployment), "psbt", "sign", "w", str(big), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 2 and out["error"]["code"] == "psbt_limit_exceeded", out
    assert "max_psbt_bytes" in out["error"]["message"]


def test_key_list_names_the_master_fingerprint(run: Run, tmp_path: Path) -> None:
    """Issue 10 item 9: key list --json carries an HD key's master fingerprint (the one the
    xpub's origin shows), and null for a single key."""
    code, out, _ = run("key", "create", "--label", "single", "--json")
    assert code == 0
    code, out, _ = run("key", "list", "--json")
    keys = {k["label"]: k for k in json.loads(out)["keys"]}
    code, xpub, _ = run("xpub", "w", "m/84'/1'/0'", "--json")
    assert keys["w"]["master_fingerprint"] == json.loads(xpub)["master_fingerprint"]
    assert keys["single"]["master_fingerprint"] is None


def test_importing_a_seed_already_present_warns(run: Run, tmp_path: Path) -> None:
    """Issue 10 item 10: the wallet's mnemonic imported again under another label is
    accepted but said (JSON warnings, text line) and recorded in the audit entry."""
    words = tmp_path / "mnemonic.txt"  # written by the fixture's import of "w"
    code, out, err = run("key", "import", "--label", "w2", "--mnemonic-file", str(words), "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["warnings"] == ["the same key is already in the store as w"]
    code, out, _ = run("key", "import", "--label", "w3", "--mnemonic-file", str(words))
    line = next(x for x in out.splitlines() if x.startswith("warning: the same key"))
    assert code == 0 and sorted(line.rsplit(" as ", 1)[1].split(", ")) == ["w", "w2"]


@pytest.mark.parametrize(
    ("kind", "path", "fmt", "prefix"),
    [
        ("p2wpkh", "m/84'/1'/0'/0/0", "simple", "smp"),
        ("p2wpkh", "m/84'/1'/0'/0/0", "full", "ful"),
        ("p2pkh", "m/44'/1'/0'/0/0", None, "ful"),  # full is the default for legacy
        ("p2tr", "m/86'/1'/0'/0/0", None, "smp"),
    ],
)
def test_message_bip322_formats_and_nonce(
    run: Run, kind: str, path: str, fmt: str | None, prefix: str
) -> None:
    args = ["message", "sign", "w", path, "hi", "--type", kind, "--bip322", "--json"]
    code, out, err = run(*args, *(["--format", fmt] if fmt else []))
    assert code == 0, err
    data = _json(out)
    assert str(data["signature"]).startswith(prefix)
    assert data["bip322_format"] == (fmt or ("full" if kind == "p2pkh" else "simple"))
    assert data["nonce"] == (None if kind == "p2tr" else "low-r")
    code, out, _ = run("message", "verify", str(data["address"]), "hi", str(data["signature"]))
    assert code == 0 and out.strip() == "valid"
    if kind != "p2tr":  # plain RFC 6979: deterministic, the same signature twice
        plain = [*args, "--nonce", "rfc6979", "--no-prefix"]
        first, second = (_json(run(*plain)[1]) for _ in range(2))
        assert first["signature"] == second["signature"] and first["nonce"] == "rfc6979"
        assert not str(first["signature"]).startswith(("smp", "ful"))
    code, _, err = run("message", "sign", "w", path, "hi", "--type", kind, "--format", "full")
    assert code == 2 and "--bip322" in err


def test_psbt_create_then_combine(run: Run, tmp_path: Path) -> None:
    """Core's createpsbt and combinepsbt, no keys needed; a signed copy combined with the
    unsigned one keeps the signature."""
    txid = "aa" * 32
    dest = "bcrt1qw508d6qejxtdg4y5r3zarvary0c5xw7kygt080"
    code, out, err = run(
        "psbt", "create", "--input", f"{txid}:1", "--output", f"{dest}=0.0001",
        "--output", "data=cafe", "--json",
    )  # fmt: skip
    assert code == 0, err
    data = _json(out)
    psbt = Psbt.parse(str(data["psbt"]))
    tx = psbt.unsigned_tx()
    assert tx.inputs[0].sequence == 0xFFFFFFFD and tx.outputs[0].value == 10_000
    assert data["unsigned_txid"] == tx.txid_hex()
    code, _, err = run(
        "psbt", "create", "--input", f"{txid}:1", "--output", "1BoatSLRHtKNngkdXEeobR76b53LETtpyT=1"
    )
    assert code == 7 and "network" in err.lower()  # a mainnet address on regtest
    w = _wallet()
    one = _psbt_file(tmp_path, [Spend("p2wpkh", [w.key("m/84'/1'/0'/0/0")])], "one.psbt")
    signed = tmp_path / "signed.psbt"
    assert run("psbt", "sign", "w", str(one), "--out", str(signed))[0] == 0
    combined = tmp_path / "combined.psbt"
    code, out, _ = run("psbt", "combine", str(one), str(signed), "--out", str(combined), "--json")
    assert code == 0 and _json(out)["out"] == str(combined)
    assert len(Psbt.parse(combined.read_text()).inputs[0].partial_sigs) == 1
    code, _, err = run("psbt", "combine", "-", "-")
    assert code == 2 and "only one" in err


def test_sign_and_verify_a_digest_at_a_path_and_tweaked(run: Run) -> None:
    from anyhsm.crypto import secp256k1 as curve

    w = _wallet()
    digest = "11" * 32
    path = "m/84'/1'/0'/0/3"
    code, out, err = run("sign", "--key", "w", "--digest", digest, "--path", path, "--json")
    assert code == 0, err
    sig = str(_json(out)["signature"])
    assert curve.ecdsa_verify(w.pub(path), bytes.fromhex(digest), bytes.fromhex(sig))
    args = ["verify", "--key", "w", "--digest", digest, "--signature", sig]
    assert run(*args, "--path", path)[0] == 0
    assert run(*args)[0] == 1  # the master key did not sign it
    tweak = "22" * 32
    code, out, _ = run(
        "sign", "--key", "w", "--digest", digest, "--scheme", "schnorr", "--tweak", tweak, "--json"
    )
    assert code == 0
    sig = str(_json(out)["signature"])
    v = ["verify", "--key", "w", "--digest", digest, "--signature", sig, "--scheme", "schnorr"]
    assert run(*v, "--tweak", tweak)[0] == 0 and run(*v)[0] == 1


def test_message_verify_reports_the_bip322_verdict(run: Run) -> None:
    """An inconclusive BIP322 verdict (a witness version 2 address: rules not known yet)
    is neither valid nor invalid: the verdict object with an error member, exit 2."""
    from anyhsm.bitcoin.address import address_from_script

    v2 = address_from_script(b"\x52\x20" + b"\x11" * 32, Network.REGTEST)
    assert v2 is not None
    code, out, err = run("message", "verify", v2, "m", "smpAA==", "--json")
    data = _json(out)
    assert code == 2 and data["state"] == "inconclusive" and data["valid"] is False
    assert data["error"]["code"] == "message_error" and "inconclusive" in err  # type: ignore[index]
    code, out, _ = run("message", "verify", v2, "m", "smpAA==")
    assert code == 2 and out.startswith("INCONCLUSIVE")


MNEMONIC_2 = "legal winner thank year wave sausage worth useful legal winner thank yellow"


def _second_wallet(run: Run, tmp_path: Path) -> Wallet:
    words = tmp_path / "mnemonic-2.txt"
    words.write_text(MNEMONIC_2 + "\n")
    words.chmod(0o600)
    code, _, err = run("key", "import", "--label", "v", "--mnemonic-file", str(words))
    assert code == 0, err
    with mnemonic_to_seed(MNEMONIC_2) as seed:
        return Wallet("v", bytes(seed.buffer))


def test_psbt_sign_with_several_keys_and_with_every_key(run: Run, tmp_path: Path) -> None:
    """Issue 11: one call signs with several keys (KEY plus --key) or with every key that
    the PSBT names (--all-keys): a 2-of-2 of two HD keys gets both signatures in one
    signing and finalizes; one audit entry names both keys."""
    w, v = _wallet(), _second_wallet(run, tmp_path)
    spends = [
        Spend("p2wpkh", [w.key("m/84'/1'/0'/0/0")]),
        Spend("p2wpkh", [v.key("m/84'/1'/0'/0/1")]),
        Spend("p2wsh", [w.key("m/48'/1'/0'/2'/0/0"), v.key("m/48'/1'/0'/2'/0/0")], m=2),
    ]
    f = _psbt_file(tmp_path, spends)
    # One key alone: the multisig input keeps waiting for the other signature.
    code, out, _ = run("psbt", "sign", "w", str(f), "--json")
    assert code == 0 and [i["status"] for i in _json(out)["inputs"]] == [  # type: ignore[union-attr]
        "signed",
        "not-signed",
        "signed",
    ]
    for argv in (["w", str(f), "--key", "v"], [str(f), "--all-keys"]):
        code, out, err = run("psbt", "sign", *argv, "--json")
        assert code == 0, err
        data = _json(out)
        signed = Psbt.parse(str(data["psbt"]))
        assert [len(i.partial_sigs) for i in signed.inputs] == [1, 1, 2]
        assert data["signed_inputs"] == 3
        done = tmp_path / "signed.psbt"
        done.write_text(str(data["psbt"]))
        code, out, err = run("psbt", "finalize", str(done), "--json")
        assert code == 0 and _json(out)["complete"] is True, out + err
    log = Path(str(json.loads(run("health", "--json")[1])["audit"]["path"]))  # type: ignore[index]
    entries = [json.loads(x) for x in log.read_text().splitlines()]
    several = [e for e in entries if e["op"] == "psbt_sign" and "keys" in e.get("detail", {})]
    assert several and all(len(e["detail"]["keys"].split(",")) == 2 for e in several)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [([], "name the key"), (["w", "--all-keys"], "--all-keys signs with every key")],
)
def test_psbt_sign_key_arguments_are_checked(
    run: Run, tmp_path: Path, argv: list[str], needle: str
) -> None:
    f = _psbt_file(tmp_path, [Spend("p2wpkh", [_wallet().key("m/84'/1'/0'/0/0")])])
    code, out, _ = run("psbt", "sign", *argv[:1], str(f), *argv[1:], "--json")
    err = _json(out)["error"]
    assert code == 2 and isinstance(err, dict) and needle in str(err["message"])


@pytest.mark.parametrize(
    ("kind", "path"), [("p2wpkh", "m/84'/1'/0'/0/0"), ("p2tr", "m/86'/1'/0'/0/0")]
)
def test_message_sign_proof_of_funds(run: Run, kind: str, path: str) -> None:
    """Issue 11: a BIP322 proof-of-funds signature from the CLI: it verifies, lists the
    outputs it claims, and Bitcoin Core's interpreter accepts every input of the to_sign
    transaction its finalized PSBT holds (the message's to_spend output and each claimed
    output)."""
    from tests.bitcoin.kernel import assert_spends

    from anyhsm.bitcoin.address import script_from_address
    from anyhsm.bitcoin.bip322 import bip322_to_spend, split_signature
    from anyhsm.bitcoin.tx import TxOut

    funds = [f"{'ab' * 32}:1:150000", f"{'cd' * 32}:0:2500"]
    args = ["message", "sign", "w", path, "I hold these", "--type", kind, "--bip322", "--json"]
    code, out, err = run(*args, *[a for f in funds for a in ("--proof-of-funds", f)])
    assert code == 0, err
    data = _json(out)
    assert str(data["signature"]).startswith("pof") and data["bip322_format"] == "proof-of-funds"
    code, out, _ = run(
        "message", "verify", str(data["address"]), "I hold these", str(data["signature"]), "--json"
    )
    verdict = _json(out)
    assert code == 0 and verdict["valid"] is True and verdict["bip322_format"] == "proof-of-funds"
    proven = verdict["proven"]
    assert isinstance(proven, list)
    assert [(p["txid"], p["vout"], p["amount"]) for p in proven] == [
        ("ab" * 32, 1, 150000),
        ("cd" * 32, 0, 2500),
    ]
    challenge = script_from_address(str(data["address"]), Network.REGTEST)
    _, raw, _ = split_signature(str(data["signature"]))
    to_sign = Psbt.parse(raw).extract_transaction()  # a proof of funds is a finalized PSBT
    to_spend = bip322_to_spend("I hold these", challenge)
    assert_spends(to_sign, [to_spend.outputs[0], TxOut(150000, challenge), TxOut(2500, challenge)])
    # Another message, or a claimed output removed, does not verify.
    code, out, _ = run("message", "verify", str(data["address"]), "other", str(data["signature"]))
    assert code == 1 and out.strip() == "INVALID"


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--proof-of-funds", "ab:1:5", "--bip322"], "TXID:VOUT:SATS"),
        (["--proof-of-funds", f"{'ab' * 32}:1:5"], "--bip322"),
        (["--proof-of-funds", f"{'ab' * 32}:1:5", "--bip322", "--type", "p2pkh"], "previous"),
    ],
)
def test_message_proof_of_funds_refusals(run: Run, extra: list[str], needle: str) -> None:
    code, out, _ = run("message", "sign", "w", "m/84'/1'/0'/0/0", "x", *extra, "--json")
    err = _json(out)["error"]
    assert code != 0 and isinstance(err, dict) and needle in str(err["message"]) + str(err["hint"])
