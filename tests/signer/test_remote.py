"""``anyhsm-signer`` over a signing service (``--addr``/``ANYHSM_ADDR``): a real
``anyhsm serve`` on a loopback port, and the real signer process run as Bitcoin Core runs
it (both argument styles, tests/signer/core.py), with no configuration and no passphrase
on the signer's side. Every Core command answers exactly what the local signer answers
on the same deployment, errors and spending-policy refusals (with their rule names)
included; the token comes from the environment or a 0600 file, never from argv."""

from __future__ import annotations

import base64
import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from tests.bitcoin.kernel import assert_spends
from tests.signer.conftest import ABANDON, ABANDON_FP
from tests.signer.core import Core, CoreError, Reply, signer_command
from tests.signer.test_core_calls import H, _inferred, _wallet_psbt

from anyhsm.bitcoin.psbt import Psbt
from anyhsm.ops.psbt import finalize_psbt

pytest.importorskip("aiohttp", reason="the server extra is not installed")

from tests.service.conftest import PASSPHRASE
from tests.service.test_lifecycle import Child, serve_command, spawn, stop_child
from tests.service.test_remote_cli import add_client

from anyhsm import open_hsm
from anyhsm.deploy import FAST_DEV_KDF, init_deployment
from anyhsm.ops.keys import import_mnemonic
from anyhsm.ops.policy import set_policy
from anyhsm.secret import SecretBytes
from anyhsm.types import Network

# leaving per transaction: 1 input of _wallet_psbt 30,000 sat, 2 inputs 80,000, 3 130,000
SPENDING = '[[rules]]\nname = "per-tx"\nkeys = ["core"]\nmax_per_tx_sat = 100000\n'


@dataclass
class Remote:
    directory: Path
    config: Path
    child: Child
    tokens: dict[str, str]

    def local(self, style: str, chain: str = "regtest") -> Core:
        env = {"ANYHSM_CONFIG": str(self.config), "ANYHSM_PASSPHRASE": PASSPHRASE}
        return Core(style, chain, env, cwd=self.directory)

    def remote(
        self, style: str, chain: str = "regtest", client: str = "core-node", **env: str
    ) -> Core:
        """No configuration, no passphrase: the address and the token only."""
        base = {"ANYHSM_ADDR": self.child.url, "ANYHSM_TOKEN": self.tokens[client]}
        return Core(style, chain, {**base, **env}, cwd=self.directory)


@pytest.fixture(scope="module")
def remote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Remote]:
    directory = tmp_path_factory.mktemp("remote-signer")
    cfg = init_deployment(
        directory / "dep",
        SecretBytes(PASSPHRASE.encode()),
        kdf=FAST_DEV_KDF,
        network=Network.REGTEST,
    )
    text = cfg.read_text()  # a generous bound on the provider's open (a loaded machine)
    cfg.write_text(text.replace("[fallback]\n", "[fallback]\ntimeout_ms = 60000\n", 1))
    policy = directory / "spending.toml"
    policy.write_text(SPENDING)
    with open_hsm(cfg, passphrase=PASSPHRASE) as hsm:
        import_mnemonic(hsm, "core", ABANDON)
        hsm.generate_key("hot-1")
        set_policy(hsm, policy)
    tokens = {
        "core-node": add_client(cfg, directory, "core-node", "read,sign-psbt", "core"),
        "reader": add_client(cfg, directory, "reader", "read"),
        "stranger": add_client(cfg, directory, "stranger", "read,sign-psbt", "hot-*"),
    }
    child = spawn(serve_command(cfg), cfg)
    try:
        yield Remote(directory, cfg, child, tokens)
    finally:
        stop_child(child)


def _same(local: Reply, remote: Reply) -> object:
    """The remote signer's reply is the local one: status, and the one JSON line."""
    assert remote.status == local.status, remote.stderr
    assert len(remote.stdout.splitlines()) == 1, remote.stdout
    assert json.loads(remote.first_line) == json.loads(local.first_line), remote.stderr
    return json.loads(remote.first_line)


def _calls(core: Core) -> list[Reply]:
    """Every Core command, answers and errors, with deterministic outputs (ECDSA only)."""
    wpkh, _ = _inferred("wpkh", [84 | H, 1 | H, H, 0, 3])
    tr, _ = _inferred("tr", [86 | H, 1 | H, H, 1, 2])
    off_policy, _ = _inferred("wpkh", [84 | H, 0 | H, H, 0, 0])  # mainnet coin type
    one, _ = _wallet_psbt(["p2wpkh"])
    two, _ = _wallet_psbt(["p2pkh", "p2sh-p2wpkh"])
    no_prev, _ = _wallet_psbt(["p2wpkh"])
    no_prev.inputs[0].non_witness_utxo = None  # the signing policy wants it
    large, _ = _wallet_psbt(["p2wpkh", "p2pkh", "p2sh-p2wpkh"])  # over per-tx
    return [
        core.call_enumerate(),
        core.call_getdescriptors(ABANDON_FP),
        core.call_getdescriptors(ABANDON_FP, 3),
        core.call_displayaddress(ABANDON_FP, wpkh),
        core.call_displayaddress(ABANDON_FP, tr),
        core.call_displayaddress(ABANDON_FP, off_policy),
        core.call_displayaddress(ABANDON_FP, "wpkh("),
        core.call_signtx(ABANDON_FP, one.to_base64()),
        core.call_signtx(ABANDON_FP, two.to_base64()),
        core.call_signtx(ABANDON_FP, no_prev.to_base64()),
        core.call_signtx(ABANDON_FP, large.to_base64()),
        core.call_signtx(ABANDON_FP, "bm90IGEgcHNidA=="),
        core.call_getdescriptors("deadbeef"),
        core.run(core.argv(None, ["getdescriptors"])),  # no --fingerprint
    ]


@pytest.mark.parametrize("style", ["v27", "v28"])
def test_every_core_command_answers_as_the_local_signer(remote: Remote, style: str) -> None:
    answers = [
        _same(loc, rem)
        for loc, rem in zip(_calls(remote.local(style)), _calls(remote.remote(style)), strict=True)
    ]
    assert answers[0] == [{"fingerprint": ABANDON_FP, "model": "anyhsm software"}]
    assert isinstance(answers[1], dict) and len(answers[1]["receive"]) == 4
    assert isinstance(answers[7], dict) and set(answers[7]) == {"psbt"}
    errors = {n: a for n, a in enumerate(answers) if isinstance(a, dict) and "error" in a}
    assert {n: e["code"] for n, e in errors.items()} == {
        5: -7,  # displayaddress at a path the policy never signs
        6: -7,  # a malformed descriptor
        9: -14,  # the signing policy: the previous transaction is missing
        10: -14,  # the spending policy: over per-tx
        11: -5,  # not a PSBT
        12: -3,  # not this key's fingerprint
        13: -1,  # no --fingerprint
    }
    assert "per-tx" in str(errors[10]["error"]) and "max_per_tx_sat" in str(errors[10]["error"])


def test_core_signs_and_finalizes_through_the_service(remote: Remote) -> None:
    core = remote.remote("v28")
    assert core.the_signer() == ABANDON_FP
    descs = core.getdescriptors()
    assert sorted(d.split("(", 1)[0] for d in descs["receive"]) == ["pkh", "sh", "tr", "wpkh"]
    desc, address = _inferred("tr", [86 | H, 1 | H, H, 0, 7])
    core.displayaddress(desc, address)
    psbt, spent = _wallet_psbt(["p2tr", "p2wpkh"])  # schnorr: the signature is the service's
    signed = Psbt.parse(base64.b64decode(core.signtx(psbt.to_base64())))
    tx = finalize_psbt(signed).tx
    assert tx is not None
    assert_spends(tx, spent)
    large, _ = _wallet_psbt(["p2tr", "p2wpkh", "p2pkh"])
    with pytest.raises(CoreError, match="per-tx"):
        core.signtx(large.to_base64())
    audit = [json.loads(line) for line in (remote.config.parent / "audit.log").open()]
    signed_by = [e.get("principal") for e in audit if e["op"] == "psbt_sign"]
    assert "core-node" in signed_by  # the service's entries name the client


def test_token_file_and_addr_in_the_signer_command(remote: Remote, tmp_path: Path) -> None:
    """Core's ``-signer="anyhsm-signer --addr URL --token-file FILE"``: nothing secret
    in argv; the file must be the owner's alone (production's rule without a config)."""
    token_file = tmp_path / "token"
    token_file.write_text(remote.tokens["core-node"] + "\n")
    token_file.chmod(0o600)
    command = f"{signer_command()} --addr {remote.child.url} --token-file {token_file}"
    for style in ("v27", "v28"):
        core = Core(style, "regtest", {}, signer=command, cwd=remote.directory)
        assert core.the_signer() == ABANDON_FP
        assert "receive" in core.getdescriptors()
    token_file.chmod(0o644)
    core = Core("v28", "regtest", {}, signer=command, cwd=remote.directory)
    reply = core.call_enumerate()
    message = reply.json()[0]["error"]  # type: ignore[index]
    assert "token" in message and remote.tokens["core-node"] not in reply.stdout + reply.stderr


def test_a_token_in_argv_is_refused_unsent(remote: Remote) -> None:
    token = remote.tokens["core-node"]
    command = f"{signer_command()} --addr {remote.child.url} --token {token}"
    reply = Core("v28", "regtest", {}, signer=command).call_getdescriptors(ABANDON_FP)
    answer = reply.json()
    assert isinstance(answer, dict) and answer["code"] == -7
    assert token not in reply.stdout + reply.stderr


def test_credentials_and_rights_as_hwi_errors(remote: Remote) -> None:
    psbt, _ = _wallet_psbt(["p2wpkh"])
    bad = remote.remote("v28", ANYHSM_TOKEN="ahs_not-a-token")
    reply = bad.call_getdescriptors(ABANDON_FP)
    assert reply.json() == {"error": reply.json()["error"], "code": -6}  # type: ignore[index]
    reader = remote.remote("v28", client="reader")  # may read, not sign
    assert reader.the_signer() == ABANDON_FP
    answer = reader.call_signtx(ABANDON_FP, psbt.to_base64()).json()
    assert isinstance(answer, dict) and answer["code"] == -9 and "sign-psbt" in answer["error"]
    stranger = remote.remote("v28", client="stranger")  # no HD key among its keys
    with pytest.raises(CoreError, match="no HD"):
        stranger.the_signer()
    named = remote.remote("v28", client="stranger", ANYHSM_SIGNER_KEY="core")
    answer = named.call_getdescriptors(ABANDON_FP).json()  # not its key: forbidden
    assert isinstance(answer, dict) and answer["code"] == -9
    chain = remote.remote("v28", chain="main").call_getdescriptors(ABANDON_FP).json()
    assert isinstance(chain, dict) and chain["code"] == -7 and "regtest" in chain["error"]


def test_a_service_that_is_down_or_in_clear_text(remote: Remote) -> None:
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = remote.remote("v28", ANYHSM_ADDR=f"http://127.0.0.1:{port}")
    answer = down.call_enumerate().json()
    assert isinstance(answer, list) and answer[0]["code"] == -3
    far = remote.remote("v28", ANYHSM_ADDR="http://10.0.0.1:8420")
    answer = far.call_getdescriptors(ABANDON_FP).json()
    assert isinstance(answer, dict) and "clear text" in answer["error"]
    setup = remote.remote("v28")
    answer = setup.run(setup.argv(None, ["setup"])).json()
    assert isinstance(answer, dict) and "needs none" in answer["error"]
