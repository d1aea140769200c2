"""The protocol layer in-process: both argument styles, ``--stdin`` words, errors and
codes, the one output line; and what only a changed capability can show (no ``tr``
descriptor for a key whose provider cannot make BIP340 signatures)."""

from __future__ import annotations

import dataclasses
import io
import json
import shlex
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tests.signer.conftest import ABANDON_FP, PASSPHRASE, Deployment
from tests.signer.core import Core, boost_build_args
from tests.signer.test_core_calls import H, _inferred

from anyhsm.errors import (
    AllProvidersFailed,
    Forbidden,
    HsmError,
    InvalidRequest,
    KeyNotFound,
    NetworkMismatch,
    NothingSigned,
    PsbtError,
    PsbtLimitExceeded,
    RateLimited,
    SecretOnCommandLine,
    ServiceUnreachable,
    SigningPolicyError,
    Unauthenticated,
    WrongPassphrase,
)
from anyhsm.hsm import Hsm
from anyhsm.signer import commands, main, protocol
from anyhsm.signer.protocol import Chain, SignerError
from anyhsm.types import Capabilities, Network, SigScheme

B64 = st.text(
    alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=", min_size=1
)


def _run(argv: list[str], stdin: bytes = b"") -> tuple[object, int]:
    out = io.StringIO()
    status = main.main(argv, stdin=io.BytesIO(stdin), stdout=out)
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    return json.loads(lines[0]), status


# --- arguments -----------------------------------------------------------------------------------


def test_both_styles_parse_to_the_same_request() -> None:
    old = Core("v27", "regtest", {}, signer="/usr/bin/anyhsm-signer")
    new = Core("v28", "regtest", {}, signer="/usr/bin/anyhsm-signer")
    desc = "wpkh([73c5da0a/84h/1h/0h/0/0]02aa)#abcdefgh"
    for tail_old, tail_new in (
        (["getdescriptors", "--account", "3"], ["getdescriptors", "--account", "3"]),
        (["displayaddress", "--desc", f'"{desc}"'], ["displayaddress", "--desc", desc]),
    ):
        a = old.argv(ABANDON_FP, tail_old)[1:]
        b = new.argv(ABANDON_FP, tail_new)[1:]
        assert a == b  # Boost.Process dropped the quotes already
        assert protocol.parse(a) == protocol.parse(b)
    req = protocol.parse(new.argv(ABANDON_FP, ["getdescriptors", "--account", "3"])[1:])
    assert req == protocol.Request(
        "getdescriptors", fingerprint=ABANDON_FP, chain=Chain.REGTEST, account=3
    )


def test_quoted_values_left_in_argv_are_dequoted() -> None:
    """A launcher that did not strip the quotes of the old command string."""
    req = protocol.parse(
        [
            "--fingerprint",
            f'"{ABANDON_FP}"',
            "--chain",
            '"main"',
            "displayaddress",
            '--desc="pkh(02aa)"',
        ]
    )
    assert req is not None and req.fingerprint == ABANDON_FP and req.chain is Chain.MAIN
    assert req.desc == "pkh(02aa)"


def test_fingerprint_forms() -> None:
    for argv in (
        ["--fingerprint", "73C5DA0A", "enumerate"],
        ["--fingerprint=73c5da0a", "enumerate"],
        ["-f", "73c5da0a", "enumerate"],
    ):
        req = protocol.parse(argv)
        assert req is not None and req.fingerprint == ABANDON_FP
    for bad in ("73c5da0", "73c5da0a0", "zzzzzzzz", ""):
        with pytest.raises(SignerError) as e:
            protocol.parse(["--fingerprint", bad, "enumerate"])
        assert e.value.code == protocol.BAD_ARGUMENT


def test_chains_are_cores_names() -> None:
    assert {c.value: c.network for c in Chain} == {
        "main": Network.MAINNET,
        "test": Network.TESTNET,
        "testnet4": Network.TESTNET4,
        "signet": Network.SIGNET,
        "regtest": Network.REGTEST,
    }
    for other in ("mainnet", "testnet", "Main", "bitcoin"):
        with pytest.raises(SignerError, match="unknown chain"):
            Chain.parse(other)
    protocol.check_chain(None, Network.MAINNET)
    protocol.check_chain(Chain.TESTNET4, Network.TESTNET4)
    with pytest.raises(NetworkMismatch):
        protocol.check_chain(Chain.TEST, Network.TESTNET4)


def test_usage_errors_are_hwi_shaped() -> None:
    for argv in ([], ["frobnicate"], ["signtx"], ["getdescriptors", "--account"], ["--fing", "x"]):
        with pytest.raises(SignerError) as e:
            protocol.parse(argv)
        assert e.value.code == protocol.MISSING_ARGUMENTS and e.value.exit_status == 2


# --- standard input -----------------------------------------------------------------------------


@given(B64)
def test_stdin_lines_of_both_styles(psbt: str) -> None:
    old = f'signtx "{psbt}"\n'.encode()
    new = f"signtx {psbt}".encode()
    for raw in (old, new):
        words = protocol.read_stdin_words(io.BytesIO(raw), 1 << 20)
        assert words == ["signtx", psbt] == shlex.split(raw.decode())


@given(
    st.lists(
        st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), max_size=12), max_size=5
    )
)
def test_split_line_is_shlex(words: list[str]) -> None:
    line = " ".join(shlex.quote(w) for w in words)
    assert protocol.split_line(line) == shlex.split(line)


def test_stdin_stops_at_an_empty_line_and_has_a_limit() -> None:
    raw = b"signtx abc\n\nthis is not read\n"
    assert protocol.read_stdin_words(io.BytesIO(raw), 100) == ["signtx", "abc"]
    with pytest.raises(PsbtError, match="longer than 20 bytes"):
        protocol.read_stdin_words(io.BytesIO(b"signtx " + b"A" * 50), 20)
    with pytest.raises(SignerError, match="UTF-8"):
        protocol.read_stdin_words(io.BytesIO(b"signtx \xff"), 100)
    with pytest.raises(SignerError, match="split"):
        protocol.read_stdin_words(io.BytesIO(b'signtx "abc'), 100)
    assert protocol.stdin_limit(3) >= 4 + len('signtx ""\n')


def test_boost_split_port() -> None:
    cmd = '/a/b --stdin --fingerprint "73c5da0a" --chain main  displayaddress --desc "x y"'
    assert boost_build_args(cmd) == [
        "/a/b", "--stdin", "--fingerprint", "73c5da0a", "--chain", "main",
        "displayaddress", "--desc", "x y",
    ]  # fmt: skip


# --- errors ---------------------------------------------------------------------------------


def test_error_codes() -> None:
    cases: list[tuple[HsmError, int]] = [
        (WrongPassphrase("x"), protocol.NO_PASSWORD),
        (NetworkMismatch("x"), protocol.BAD_ARGUMENT),
        (SigningPolicyError("x"), protocol.ACTION_CANCELED),
        (PsbtLimitExceeded("x"), protocol.INVALID_TX),
        (KeyNotFound("x"), protocol.DEVICE_CONN_ERROR),
        (AllProvidersFailed("x"), protocol.DEVICE_CONN_ERROR),
        (NothingSigned("x"), protocol.BAD_ARGUMENT),
        (HsmError("x"), protocol.UNKNOWN_ERROR),
        # a signing service's answers (--addr)
        (Unauthenticated("x"), protocol.NO_PASSWORD),
        (Forbidden("x"), protocol.UNAVAILABLE_ACTION),
        (ServiceUnreachable("x"), protocol.DEVICE_CONN_ERROR),
        (RateLimited("x"), protocol.DEVICE_BUSY),
        (InvalidRequest("x"), protocol.BAD_ARGUMENT),
        (SecretOnCommandLine("x"), protocol.BAD_ARGUMENT),
    ]
    for error, code in cases:
        assert protocol.error_code(error) == code, error


def test_version_and_help_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    answer, status = _run(["--version"])
    assert status == 0 and isinstance(answer, dict) and "version" in answer
    answer, status = _run(["--help"])
    assert answer == {"error": "Help text requested", "code": -17} and status == 0
    assert "getdescriptors" in capsys.readouterr().err


def test_an_unexpected_exception_is_one_json_line(
    dep: Deployment, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ANYHSM_CONFIG", str(dep.config))
    monkeypatch.delenv("ANYHSM_DEBUG", raising=False)  # no traceback

    def boom(*_: object) -> None:
        raise RuntimeError("secret-looking text that must not be shown")

    monkeypatch.setattr(commands, "read_index", boom)
    answer, status = _run(["enumerate"])
    assert status == 0 and isinstance(answer, list)
    assert answer[0]["code"] == -13 and "RuntimeError" in answer[0]["error"]
    assert "secret-looking" not in json.dumps(answer) + capsys.readouterr().err


# --- the index --------------------------------------------------------------------------------


def test_an_index_others_may_write_is_ignored(
    dep: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANYHSM_CONFIG", str(dep.config))
    monkeypatch.setenv("ANYHSM_PASSPHRASE", PASSPHRASE)
    assert _run(["enumerate"])[0] == [{"fingerprint": ABANDON_FP, "model": "anyhsm software"}]
    path = dep.directory / "signer-public.json"
    forged = json.loads(path.read_text())
    forged["keys"][0]["fingerprint"] = "00000001"
    path.write_text(json.dumps(forged))
    path.chmod(0o666)
    monkeypatch.delenv("ANYHSM_PASSPHRASE")
    answer, _ = _run(["enumerate"])  # ignored: the keystore is asked, and needs the passphrase
    assert isinstance(answer, list) and answer[0]["code"] == -6
    path.chmod(0o644)
    assert _run(["enumerate"])[0] == [{"fingerprint": "00000001", "model": "anyhsm software"}]
    # a forged index only changes enumerate's answer: no command accepts that fingerprint
    monkeypatch.setenv("ANYHSM_PASSPHRASE", PASSPHRASE)
    answer, _ = _run(["--fingerprint", "00000001", "--chain", "regtest", "getdescriptors"])
    assert isinstance(answer, dict) and answer["code"] == -3
    assert json.loads(path.read_text())["keys"][0]["fingerprint"] == ABANDON_FP  # rewritten
    for junk in ("[]", "{", json.dumps({**forged, "network": "mainnet"})):
        path.write_text(junk)
        monkeypatch.delenv("ANYHSM_PASSPHRASE", raising=False)
        assert _run(["enumerate"])[0][0]["code"] == -6  # type: ignore[index]


def test_public_file_setting(
    dep: Deployment, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    dep.add_config('[signer]\npublic_file = "../elsewhere.json"')
    monkeypatch.setenv("ANYHSM_CONFIG", str(dep.config))
    monkeypatch.setenv("ANYHSM_PASSPHRASE", PASSPHRASE)
    answer, _ = _run(["setup"])
    assert isinstance(answer, dict) and answer["index"] == str(dep.directory / "../elsewhere.json")
    assert (dep.directory.parent / "elsewhere.json").is_file()
    assert not (dep.directory / "signer-public.json").exists()


# --- capabilities -------------------------------------------------------------------------------


def test_no_taproot_descriptor_for_a_key_without_bip340(
    dep: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A provider that signs ECDSA only (as PKCS#11 tokens do): getdescriptors leaves tr
    out, displayaddress refuses a tr address."""
    real = Hsm.capabilities

    def ecdsa_only(self: Hsm, key: str | None = None) -> Capabilities:
        caps = real(self, key)
        return dataclasses.replace(caps, schemes=frozenset({SigScheme.ECDSA}), can_tweak=False)

    monkeypatch.setattr(Hsm, "capabilities", ecdsa_only)
    monkeypatch.setenv("ANYHSM_CONFIG", str(dep.config))
    monkeypatch.setenv("ANYHSM_PASSPHRASE", PASSPHRASE)
    answer, status = _run(["--fingerprint", ABANDON_FP, "--chain", "regtest", "getdescriptors"])
    assert status == 0 and isinstance(answer, dict)
    assert [d.split("(")[0] for d in answer["receive"]] == ["pkh", "sh", "wpkh"]
    assert [d.split("(")[0] for d in answer["internal"]] == ["pkh", "sh", "wpkh"]
    desc, _ = _inferred("tr", [86 | H, 1 | H, H, 0, 0])
    answer, _ = _run(
        ["--fingerprint", ABANDON_FP, "--chain", "regtest", "displayaddress", "--desc", desc]
    )
    assert isinstance(answer, dict) and answer["code"] == -9 and "BIP340" in str(answer["error"])


def test_the_docs_list_every_code() -> None:
    """docs/bitcoin-core.md's code table names exactly the codes the signer answers with."""
    import re

    doc = (Path(__file__).resolve().parents[2] / "docs" / "bitcoin-core.md").read_text()
    documented = {int(m) for m in re.findall(r"^\| (-\d+) \| `[A-Z_]+` \|", doc, re.M)}
    used = {
        getattr(protocol, name)
        for name in dir(protocol)
        if name.isupper()
        and isinstance(getattr(protocol, name), int)
        and getattr(protocol, name) < 0
    }
    assert documented == used


def test_console_script_is_the_public_contract() -> None:
    import tomllib
    from importlib.metadata import entry_points

    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    scripts = tomllib.loads(pyproject.read_text())["project"]["scripts"]
    assert scripts["anyhsm-signer"] == "anyhsm.signer.main:main"
    installed = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert installed.get("anyhsm-signer", scripts["anyhsm-signer"]) == scripts["anyhsm-signer"]


def test_enumerate_from_the_index_opens_no_keystore(dep: Deployment) -> None:
    """The passphrase-free path loads the config and reads the index: no handle, no
    keystore, no cryptography (which is also why it is fast)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("ANYHSM_")}
    env["ANYHSM_CONFIG"] = str(dep.config)
    setup = [sys.executable, "-m", "anyhsm.signer", "setup"]
    r = subprocess.run(setup, env={**env, "ANYHSM_PASSPHRASE": PASSPHRASE}, capture_output=True)
    assert r.returncode == 0, r.stderr
    heavy = ("anyhsm.hsm", "anyhsm.keystore", "anyhsm.ops", "cryptography", "coincurve")
    code = (
        "import sys; from anyhsm.signer.main import main; assert main(['enumerate']) == 0;"
        f"bad = [m for m in sys.modules if m.startswith({heavy!r})]; assert not bad, bad"
    )
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    want = [{"fingerprint": ABANDON_FP, "model": "anyhsm software"}]
    assert r.stdout.splitlines() == [json.dumps(want)]
