"""The CLI against a running service (``--addr`` / ``ANYHSM_ADDR``, docs/service.md "The
CLI against a service"): the served commands print what the local path prints, as text
and as --json, with the same exit statuses; credentials failures exit 5 (401) and 7
(403) with the JSON error object; a service that is down exits with
service_unreachable's status; a token is never taken from argv; a command not served
refuses under --addr, naming itself."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from cryptography import x509
from tests.bitcoin.test_signer import Spend, Wallet, add_wallet, build_psbt
from tests.service.conftest import PASSPHRASE, Running
from tests.service.test_lifecycle import Child, serve_command, spawn, stop_child
from tests.service.test_tls import fingerprint, pki  # noqa: F401 (pki: a fixture)
from tests.support.cli import cli

from anyhsm import open_hsm
from anyhsm.deploy import FAST_DEV_KDF, init_deployment
from anyhsm.errors import (
    Forbidden,
    KeyNotFound,
    SecretOnCommandLine,
    ServiceUnreachable,
    Unauthenticated,
    UsageError,
)
from anyhsm.secret import SecretBytes
from anyhsm.types import Network

DIGEST = hashlib.sha256(b"remote cli").hexdigest()


@dataclass
class Deployment:
    config: Path
    directory: Path
    wallet: Wallet
    child: Child
    signer: str  # token: read, sign-digest, sign-psbt on every key
    reader: str  # token: read only
    wallet2: Wallet | None = None

    def local(self, *args: str) -> subprocess.CompletedProcess[str]:
        return cli(
            "--config",
            str(self.config),
            *args,
            env={"ANYHSM_PASSPHRASE": PASSPHRASE},
            cwd=self.directory,
        )

    def remote(
        self, *args: str, token: str | None = None, addr: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """No config, no passphrase: only the address and the token."""
        env = {"ANYHSM_ADDR": addr or self.child.url, "ANYHSM_TOKEN": token or self.signer}
        return cli(*args, env=env, cwd=self.directory)


def add_client(cfg: Path, directory: Path, name: str, ops: str, keys: str = "*") -> str:
    """``anyhsm service add-client`` (the real command); the token it prints last."""
    r = cli(
        "--config",
        str(cfg),
        "service",
        "add-client",
        name,
        "--keys",
        keys,
        "--ops",
        ops,
        env={"ANYHSM_PASSPHRASE": PASSPHRASE},
        cwd=directory,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def dep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    directory = tmp_path_factory.mktemp("remote-cli")
    cfg = init_deployment(
        directory / "dep",
        SecretBytes(PASSPHRASE.encode()),
        kdf=FAST_DEV_KDF,
        network=Network.REGTEST,
    )
    with open_hsm(cfg, passphrase=PASSPHRASE) as hsm:
        hsm.generate_key("hot-1")
        wallet = add_wallet(hsm, "w")
        wallet2 = add_wallet(hsm, "w2")
    signer = add_client(cfg, directory, "signer", "read,sign-digest,sign-psbt")
    reader = add_client(cfg, directory, "reader", "read")
    child = spawn(serve_command(cfg), cfg, signer)
    try:
        yield Deployment(cfg, directory, wallet, child, signer, reader, wallet2)
    finally:
        stop_child(child)


def _json(r: subprocess.CompletedProcess[str]) -> dict[str, object]:
    data = json.loads(r.stdout)
    assert isinstance(data, dict), r.stdout
    return data


SAME = [
    ("key", "list"),
    ("key", "show", "hot-1"),
    ("key", "show", "w"),
    ("xpub", "w", "m/84'/1'/0'"),
    ("address", "w", "m/84'/1'/0'/0/3", "--type", "p2wpkh"),
    ("address", "w", "--type", "p2tr"),
    ("address", "hot-1", "--type", "p2tr"),
    ("descriptor", "w", "--type", "wpkh"),
    ("descriptor", "hot-1", "--type", "pkh"),
    ("sign", "--key", "hot-1", "--digest", DIGEST),  # ECDSA is deterministic (RFC 6979)
    ("sign", "--key", "w", "--digest", DIGEST, "--path", "m/84'/1'/0'/0/5"),
    ("sign", "--key", "w", "--digest", DIGEST, "--path", "m/x"),  # bip32_error either way
    ("sign", "--key", "hot-1", "--digest", DIGEST, "--path", "m/0"),  # unsupported either way
    ("sign", "--key", "w", "--digest", DIGEST, "--tweak", "11" * 32),  # ECDSA: unsupported
    ("key", "show", "no-such-key"),  # an error: the same object and status
    ("address", "w", "m/x"),
]


@pytest.mark.parametrize("args", SAME, ids=[" ".join(a[:2]) for a in SAME])
def test_remote_output_and_status_equal_local(dep: Deployment, args: tuple[str, ...]) -> None:
    local_json, remote_json = dep.local("--json", *args), dep.remote("--json", *args)
    assert remote_json.returncode == local_json.returncode, remote_json.stderr
    assert "usage_error" not in remote_json.stdout  # the command itself ran
    assert _json(remote_json) == _json(local_json)
    assert "schema_version" in _json(remote_json)
    local_text, remote_text = dep.local(*args), dep.remote(*args)
    assert remote_text.returncode == local_text.returncode
    assert remote_text.stdout == local_text.stdout


def test_an_error_keeps_its_class_status(dep: Deployment) -> None:
    r = dep.remote("--json", "key", "show", "no-such-key")
    assert r.returncode == KeyNotFound.exit_code
    assert _json(r)["error"]["code"] == KeyNotFound.code  # type: ignore[index]


@pytest.mark.parametrize("scheme", ["ecdsa", "schnorr"])
def test_sign_then_verify_either_way(dep: Deployment, scheme: str) -> None:
    remote = dep.remote("--json", "sign", "--key", "hot-1", "--digest", DIGEST, "--scheme", scheme)
    local = dep.local("--json", "sign", "--key", "hot-1", "--digest", DIGEST, "--scheme", scheme)
    assert remote.returncode == local.returncode == 0, remote.stderr
    r, loc = _json(remote), _json(local)
    assert r.keys() == loc.keys() and r["scheme"] == loc["scheme"] and r["key"] == "hot-1"
    for sig in (str(r["signature"]), str(loc["signature"])):
        args = (
            "verify",
            "--key",
            "hot-1",
            "--digest",
            DIGEST,
            "--signature",
            sig,
            "--scheme",
            scheme,
        )
        v_local, v_remote = dep.local("--json", *args), dep.remote("--json", *args)
        assert v_local.returncode == v_remote.returncode == 0
        assert _json(v_remote) == _json(v_local)
        assert _json(v_remote)["valid"] is True
    bad = str(r["signature"])[:-2] + ("00" if not str(r["signature"]).endswith("00") else "01")
    args = ("verify", "--key", "hot-1", "--digest", DIGEST, "--signature", bad, "--scheme", scheme)
    v_local, v_remote = dep.local(*args), dep.remote(*args)
    assert v_remote.returncode == v_local.returncode  # 1 (invalid) or the error's status
    assert v_remote.stdout == v_local.stdout


def test_psbt_sign_remote_equals_local(dep: Deployment, tmp_path: Path) -> None:
    psbt = build_psbt([Spend("p2wpkh", [dep.wallet.key("m/84'/1'/0'/0/0")])])
    f = tmp_path / "in.psbt"
    f.write_text(psbt.to_base64())
    local, remote = (
        dep.local("--json", "psbt", "sign", "w", str(f)),
        dep.remote("--json", "psbt", "sign", "w", str(f)),
    )
    assert remote.returncode == local.returncode == 0, remote.stderr
    assert _json(remote) == _json(local)
    out = tmp_path / "out.psbt"
    local_text = dep.local("psbt", "sign", "w", str(f), "--out", str(out))
    local_signed = out.read_text()
    remote_text = dep.remote("psbt", "sign", "w", str(f), "--out", str(out))
    assert remote_text.returncode == local_text.returncode == 0
    assert (remote_text.stdout, remote_text.stderr) == (local_text.stdout, local_text.stderr)
    assert out.read_text() == local_signed


def test_psbt_sign_with_several_keys_remote_equals_local(dep: Deployment, tmp_path: Path) -> None:
    """``--key A --key B`` and ``--all-keys`` (every key the client may use: here all of
    them) against the service: one request, the same report as locally."""
    assert dep.wallet2 is not None
    psbt = build_psbt(
        [
            Spend("p2wpkh", [dep.wallet.key("m/84'/1'/0'/0/0")]),
            Spend("p2tr", [dep.wallet2.key("m/86'/1'/0'/0/1")]),
        ]
    )
    f = tmp_path / "two.psbt"
    f.write_text(psbt.to_base64())
    for keys in (("w", str(f), "--key", "w2"), ("--all-keys", str(f))):
        local = dep.local("--json", "psbt", "sign", *keys)
        remote = dep.remote("--json", "psbt", "sign", *keys)
        assert remote.returncode == local.returncode == 0, remote.stderr
        r, loc = _json(remote), _json(local)
        assert r["signed_inputs"] == loc["signed_inputs"] == 2
        # the taproot signature's aux randomness differs per signing: compare all but it
        for report in (r, loc):
            report.pop("psbt")
        assert r == loc
    one_local = dep.local("--json", "psbt", "sign", "w", str(f))
    one_remote = dep.remote("--json", "psbt", "sign", "w", str(f))
    # w alone: w2's taproot input counts in the fee unverified, a refusal either way
    assert one_remote.returncode == one_local.returncode == 7
    assert _json(one_remote) == _json(one_local)
    assert _json(one_remote)["error"]["rules"] == ["unverified-amount"]  # type: ignore[index]


def test_health_same_shape_and_status(dep: Deployment) -> None:
    local, remote = dep.local("--json", "health"), dep.remote("--json", "health")
    assert remote.returncode == local.returncode == 0, remote.stderr
    loc, rem = _json(local), _json(remote)
    assert rem.keys() == loc.keys()
    for name in ("ok", "active_provider", "security_level", "environment", "network"):
        assert rem[name] == loc[name]
    text = dep.remote("health")
    assert text.returncode == 0 and text.stdout.startswith("active provider: ")


def test_bad_token_exits_5_and_forbidden_exits_7(dep: Deployment) -> None:
    r = dep.remote("--json", "key", "list", token="ahs_not-a-token")
    assert r.returncode == Unauthenticated.exit_code == 5
    assert _json(r)["error"]["code"] == Unauthenticated.code  # type: ignore[index]
    r = dep.remote("--json", "sign", "--key", "hot-1", "--digest", DIGEST, token=dep.reader)
    assert r.returncode == Forbidden.exit_code == 7
    assert _json(r)["error"]["code"] == Forbidden.code  # type: ignore[index]
    assert dep.reader not in r.stdout + r.stderr


def test_a_service_that_is_down(dep: Deployment) -> None:
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = dep.remote("--json", "key", "list", addr=f"http://127.0.0.1:{port}")
    assert r.returncode == ServiceUnreachable.exit_code
    assert _json(r)["error"]["code"] == ServiceUnreachable.code  # type: ignore[index]


def test_token_never_from_argv_and_from_a_0600_file(dep: Deployment, tmp_path: Path) -> None:
    r = cli("--json", "--addr", dep.child.url, "--token", dep.signer, "key", "list", cwd=tmp_path)
    assert r.returncode == SecretOnCommandLine.exit_code
    assert _json(r)["error"]["code"] == SecretOnCommandLine.code  # type: ignore[index]
    assert dep.signer not in r.stdout + r.stderr
    token_file = tmp_path / "token"
    token_file.write_text(dep.signer + "\n")
    token_file.chmod(0o600)
    args = ("--json", "--addr", dep.child.url, "--token-file", str(token_file), "key", "list")
    ok = cli(*args, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert _json(ok) == _json(dep.local("--json", "key", "list"))
    token_file.chmod(0o644)  # no config: production's rule, a readable token file refused
    loose = cli(*args, cwd=tmp_path)
    assert loose.returncode != 0 and dep.signer not in loose.stdout + loose.stderr
    missing = cli("--json", "--addr", dep.child.url, "key", "list", cwd=tmp_path)
    assert missing.returncode == UsageError.exit_code


def test_a_command_not_served_refuses_under_addr(dep: Deployment) -> None:
    r = dep.remote("--json", "key", "create", "--label", "x")
    assert r.returncode == UsageError.exit_code
    err = _json(r)["error"]
    assert isinstance(err, dict) and "key create" in str(err["message"])


def test_sign_at_a_path_with_a_tweak_remote_verifies_locally(dep: Deployment) -> None:
    """``sign --path --tweak`` (BIP340 at a child, tweaked, as a taproot key path spend)
    through the service: the local path verifies it at the same path and tweak, and the
    service's verify agrees; without the tweak it does not verify."""
    tweak = "22" * 32
    args = ("--key", "w", "--digest", DIGEST, "--scheme", "schnorr", "--path", "m/86'/1'/0'/0/2")
    r = dep.remote("--json", "sign", *args, "--tweak", tweak)
    assert r.returncode == 0, r.stderr
    sig = str(_json(r)["signature"])
    assert len(sig) == 128
    check = ("verify", *args, "--signature", sig)
    for run in (dep.local, dep.remote):
        good = run("--json", *check, "--tweak", tweak)
        assert good.returncode == 0 and _json(good)["valid"] is True, good.stderr
        untweaked = run("--json", *check)
        assert untweaked.returncode == 1 and _json(untweaked)["valid"] is False


def test_help_does_not_load_the_client() -> None:
    code = (
        "import sys\nfrom anyhsm.cli.main import main\n"
        "assert main(['--help']) == 0\n"
        "assert 'anyhsm.client' not in sys.modules, 'the client was imported by --help'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


def test_https_with_a_ca_file_and_a_client_certificate(
    start: Callable[..., Running],
    pki: dict[str, tuple[x509.Certificate, Path, Path]],  # noqa: F811 (the fixture)
    tmp_path: Path,
) -> None:
    """--addr https://..., --ca-file, and --client-cert/--client-key for a token bound to
    its certificate: the token alone exits 5, as the library's client raises."""
    _, server_cert, server_key = pki["server"]
    ca = pki["ca"][1]
    alice = pki["alice"]
    r = start(tls_cert=server_cert, tls_key=server_key, tls_client_ca=ca)
    clients = tuple(
        replace(c, cert_sha256=fingerprint(alice[0])) if c.name == "signer" else c
        for c in r.service.settings.clients
    )
    r.service._apply(replace(r.service.settings, clients=clients))
    env = {"ANYHSM_TOKEN": r.tokens["signer"]}
    base = ("--json", "--addr", r.url, "--ca-file", str(ca))
    mtls = ("--client-cert", str(alice[1]), "--client-key", str(alice[2]))
    ok = cli(*base, *mtls, "key", "show", "hot-1", env=env, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert _json(ok)["label"] == "hot-1"
    alone = cli(*base, "key", "show", "hot-1", env=env, cwd=tmp_path)
    assert alone.returncode == Unauthenticated.exit_code
    no_ca = cli("--json", "--addr", r.url, *mtls, "key", "show", "hot-1", env=env, cwd=tmp_path)
    assert no_ca.returncode == ServiceUnreachable.exit_code  # the server's CA is not trusted
    env_ca = cli(
        "--json",
        "--addr",
        r.url,
        *mtls,
        "key",
        "list",
        env={**env, "ANYHSM_CA_FILE": str(ca)},
        cwd=tmp_path,
    )
    assert env_ca.returncode == 0, env_ca.stderr


@pytest.mark.parametrize("addr", ["http://10.0.0.1:8420", "http://signer.example:8420"])
def test_no_token_in_clear_text_beyond_loopback(tmp_path: Path, addr: str) -> None:
    r = cli("--json", "--addr", addr, "key", "list", env={"ANYHSM_TOKEN": "ahs_x"}, cwd=tmp_path)
    assert r.returncode == UsageError.exit_code
    assert "clear text" in str(_json(r)["error"]["message"])  # type: ignore[index]
