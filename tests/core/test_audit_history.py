"""Issue 9, items 1-5: the audit log must prove what happened, or refuse to run.

Each test performs the attack the issue describes against a real deployment (keystore
directory, config, audit log on disk) through the CLI or the library, and shows that it
now fails closed with a typed error (exit 8) naming what is inconsistent, and that the
recovery is an explicit, audited command."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from anyhsm import open_hsm
from anyhsm.cli.main import main
from anyhsm.errors import KeystoreRolledBack, KeystoreTampered

DIGEST = "ab" * 32


def run(capsys: pytest.CaptureFixture[str], dep: Path, *args: str) -> tuple[int, dict[str, object]]:
    """Exit status and the --json output (an error's object for failures)."""
    code = main(["--config", str(dep), *args, "--json"])
    out = capsys.readouterr().out
    data = json.loads(out) if out.strip() else {}
    err = data.get("error") if isinstance(data, dict) else None
    return code, err if isinstance(err, dict) else data


def entries(log: Path) -> list[dict[str, object]]:
    return [json.loads(x) for x in log.read_bytes().splitlines()]


@pytest.fixture
def used(deployment: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    """A deployment with a key that has signed, and the log closed (state recorded)."""
    assert run(capsys, deployment, "key", "create", "--label", "hot")[0] == 0
    assert run(capsys, deployment, "sign", "--key", "hot", "--digest", DIGEST)[0] == 0
    return deployment


def test_wipe_of_log_is_refused_not_restarted(
    used: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Item 1: deleting audit.log (and the old checkpoint file, which no longer exists)
    used to start a fresh chain that verified as intact."""
    log = used.parent / "audit.log"
    log.unlink()
    (used.parent / "keystore" / "audit-checkpoint.json").unlink(missing_ok=True)
    code, out = run(capsys, used, "sign", "--key", "hot", "--digest", DIGEST)
    assert code == 8
    assert out["code"] == "audit_state_mismatch"
    assert "missing" in str(out["message"]) and "audit recover" in str(out.get("hint", ""))
    assert not log.exists(), "no new chain may be started silently"
    code, out = run(capsys, used, "audit", "verify")
    assert code == 8


def test_wipe_then_explicit_recovery_records_the_loss(
    used: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = used.parent / "audit.log"
    last_mac = entries(log)[-1]["mac"]
    log.unlink()
    code, out = run(capsys, used, "audit", "recover", "--reason", "disk replaced, log lost")
    assert code == 0, out
    first = entries(log)[0]
    assert first["op"] == "audit_recover" and first["seq"] == 1
    detail = first["detail"]
    assert isinstance(detail, dict)
    assert "missing" in detail["found"] and detail["reason"] == "disk replaced, log lost"
    assert detail["lost_chain"] == "1" and detail["new_chain"] == "2"
    assert detail["lost_recorded_mac"] == last_mac  # what was lost is named
    assert run(capsys, used, "sign", "--key", "hot", "--digest", DIGEST)[0] == 0
    code, out = run(capsys, used, "audit", "verify")
    assert code == 0 and out["chain"] == 2
    # A second recovery with nothing wrong is refused.
    code, out = run(capsys, used, "audit", "recover", "--reason", "nothing is wrong here")
    assert code == 8 and "nothing to recover" in str(out["message"])


def test_recovery_keeps_the_damaged_log(used: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = used.parent / "audit.log"
    lines = log.read_bytes().splitlines(keepends=True)
    log.write_bytes(b"".join(lines[:-2]))  # cut back
    code, out = run(capsys, used, "audit", "recover", "--reason", "tail lost in a crash")
    assert code == 0
    moved = Path(str(out["old_log_moved_to"]))
    assert moved.read_bytes() == b"".join(lines[:-2])
    assert "shorter" in str(out["found"])


def test_swap_log_aside_refuses_operations(used: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Item 2: move the log aside, run sign and key create, move it back."""
    log = used.parent / "audit.log"
    aside = used.parent / "aside.log"
    log.rename(aside)
    assert run(capsys, used, "sign", "--key", "hot", "--digest", DIGEST)[0] == 8
    assert run(capsys, used, "key", "create", "--label", "sneaky")[0] == 8
    assert not log.exists()
    aside.rename(log)
    code, out = run(capsys, used, "key", "list")
    assert code == 0
    assert "sneaky" not in json.dumps(out)  # the operation never ran
    assert run(capsys, used, "audit", "verify")[0] == 0


def test_audit_path_pointed_elsewhere_is_refused(
    used: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("ANYHSM_AUDIT__PATH", str(tmp_path / "other.log"))
    code, out = run(capsys, used, "sign", "--key", "hot", "--digest", DIGEST)
    assert code == 8 and out["code"] == "audit_state_mismatch"
    # A copy of the real log elsewhere is accepted (it is the same chain) ...
    shutil.copy(used.parent / "audit.log", tmp_path / "copy.log")
    monkeypatch.setenv("ANYHSM_AUDIT__PATH", str(tmp_path / "copy.log"))
    assert run(capsys, used, "sign", "--key", "hot", "--digest", DIGEST)[0] == 0
    # ... but then the original no longer holds the recorded chain: swapping back fails.
    monkeypatch.delenv("ANYHSM_AUDIT__PATH")
    code, out = run(capsys, used, "sign", "--key", "hot", "--digest", DIGEST)
    assert code == 8 and "shorter" in str(out["message"])


def test_log_from_another_deployment_is_refused(
    used: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from tests.conftest import PASSPHRASE

    from anyhsm.deploy import FAST_DEV_KDF, init_deployment
    from anyhsm.secret import SecretBytes

    other = init_deployment(tmp_path / "o", SecretBytes(PASSPHRASE.encode()), kdf=FAST_DEV_KDF)
    for _ in range(6):
        assert run(capsys, other, "health")[0] == 0
    shutil.copy(other.parent / "audit.log", used.parent / "audit.log")
    code, out = run(capsys, used, "health")
    assert code == 8 and out["code"] == "audit_state_mismatch"


def test_replayed_checkpoint_with_cut_log_is_refused(
    used: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Item 3: an old copy of the recorded state (a keystore backup) plus the log cut back
    to it. The state now lives in the keystore manifest; putting the old manifest back is
    a rollback the deletion after it betrays."""
    ks = used.parent / "keystore"
    backup = tmp_path / "backup"
    shutil.copytree(ks, backup)
    log = used.parent / "audit.log"
    cut = log.stat().st_size
    assert run(capsys, used, "key", "create", "--label", "victim")[0] == 0
    assert run(capsys, used, "sign", "--key", "victim", "--digest", DIGEST)[0] == 0
    assert run(capsys, used, "key", "delete", "victim", "--yes")[0] == 0
    shutil.copy(backup / "keys" / "MANIFEST", ks / "keys" / "MANIFEST")
    with open(log, "r+b") as f:
        f.truncate(cut)
    code, out = run(capsys, used, "sign", "--key", "hot", "--digest", DIGEST)
    assert code == 8 and out["code"] == "keystore_rolled_back", out
    with pytest.raises(KeystoreRolledBack):
        open_hsm(used).close()


def test_replayed_state_without_cutting_the_log_is_caught(
    used: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The log kept, the recorded state put back: the log is longer than recorded, which is
    accepted only because every later entry chains from the recorded one, so nothing the
    operations wrote is hidden (the replay gains the attacker nothing)."""
    ks = used.parent / "keystore"
    backup = tmp_path / "backup"
    shutil.copytree(ks, backup)
    assert run(capsys, used, "sign", "--key", "hot", "--digest", DIGEST)[0] == 0
    shutil.copy(backup / "keys" / "MANIFEST", ks / "keys" / "MANIFEST")
    code, out = run(capsys, used, "audit", "verify")
    assert code == 0 and out["entries"] == len(entries(used.parent / "audit.log"))


def test_deleted_manifest_is_refused(used: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (used.parent / "keystore" / "keys" / "MANIFEST").unlink()
    code, out = run(capsys, used, "sign", "--key", "hot", "--digest", DIGEST)
    assert code == 8 and "manifest" in str(out["message"])
    with pytest.raises(KeystoreTampered):
        open_hsm(used).close()


def test_unicode_escaped_rewrite_fails_verify(
    used: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Item 4: "op":"export_key" rewritten with \\u escapes (same JSON, other bytes)."""
    monkeypatch.setenv("ANYHSM_POLICY__ALLOW_EXPORT", "true")
    with open_hsm(used) as hsm:
        info = hsm.import_key("exp", bytes.fromhex("22" * 32), exportable=True)
        with hsm.export_key(info.id):
            pass
    log = used.parent / "audit.log"
    lines = log.read_bytes().splitlines()
    i = next(n for n, x in enumerate(lines) if b'"op":"export_key","outcome":"ok"' in x)
    hidden = lines[i].replace(b'"op":"export_key"', b'"op":"\\u0065xport_key"')
    hidden = hidden.replace(info.id.encode(), "".join(f"\\u{ord(c):04x}" for c in info.id).encode())
    assert json.loads(hidden) == json.loads(lines[i])
    lines[i] = hidden
    log.write_bytes(b"\n".join(lines) + b"\n")
    assert b"export_key" not in log.read_bytes().splitlines()[i]  # hidden from grep ...
    code, out = run(capsys, used, "audit", "verify")
    assert code == 8, out
    assert out["first_bad_line"] == i + 1, out  # ... but not from verify


def test_refusals_and_signing_are_audited_with_what_and_who(
    used: Path, capsys: pytest.CaptureFixture[str], make_config: object
) -> None:
    """Item 5: a refusal is an entry naming its rules; signing entries say what was signed
    (the digest) and who asked (uid, pid)."""
    log = used.parent / "audit.log"
    signs = [e for e in entries(log) if e["op"] == "sign" and e["outcome"] == "ok"]
    assert signs and signs[-1]["detail"]["digest"] == DIGEST  # type: ignore[index]
    assert signs[-1]["uid"] == os.getuid() and isinstance(signs[-1]["pid"], int)
    with open_hsm(used) as hsm, pytest.raises(Exception) as e:
        hsm.export_key("hot")  # not exportable: refused
    refusals = [x for x in entries(log) if x["op"] == "export_key" and x["outcome"] != "started"]
    assert refusals[-1]["outcome"] == "refused", refusals[-1]
    assert refusals[-1]["error"] == getattr(e.value, "code", None)


def test_forwarding_copies_every_entry_to_syslog(
    deployment: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The copy that a local attacker cannot rewind: every entry, byte for byte, goes to a
    syslog socket as it is written (a real Unix datagram socket standing in for /dev/log)."""
    import socket

    path = tmp_path / "syslog.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)
    monkeypatch.setenv("ANYHSM_AUDIT__FORWARD", "syslog")
    monkeypatch.setenv("ANYHSM_AUDIT__SYSLOG_ADDRESS", str(path))
    with open_hsm(deployment) as hsm:
        hsm.generate_key("fwd")
        hsm.sign("fwd", bytes(32))
        assert hsm.health().audit["forward"] == "syslog"
    got = []
    while True:
        try:
            got.append(sock.recv(65536))
        except TimeoutError:
            break
    sock.close()
    lines = (deployment.parent / "audit.log").read_bytes().splitlines()
    forwarded = [g.split(b": ", 1)[1] for g in got]
    assert got and all(g.startswith(b"<86>anyhsm[") for g in got)
    assert forwarded == lines[-len(forwarded) :]
    assert any(b'"op":"sign"' in f for f in forwarded)


def test_forwarding_required_fails_closed_without_a_collector(
    deployment: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from anyhsm.errors import AuditWriteFailed

    monkeypatch.setenv("ANYHSM_AUDIT__FORWARD", "syslog")
    monkeypatch.setenv("ANYHSM_AUDIT__SYSLOG_ADDRESS", str(tmp_path / "nobody.sock"))
    monkeypatch.setenv("ANYHSM_AUDIT__FORWARD_REQUIRED", "true")
    with pytest.raises(AuditWriteFailed, match="forward"):
        open_hsm(deployment)


def _stale_view(deployment: Path) -> tuple[object, object]:
    """The audit state and keys a handle read from the keystore before a rotation."""
    from tests.conftest import PASSPHRASE

    from anyhsm.keystore.store import Keystore
    from anyhsm.secret import SecretBytes

    ks = Keystore.load(deployment.parent / "keystore")
    ks.unlock_with_passphrase(SecretBytes(PASSPHRASE.encode()))
    try:
        return ks.load_audit_state(), ks.audit_keys()
    finally:
        ks.close()


def test_open_racing_a_rotation_is_the_retryable_rotation_error(
    used: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A handle that read the keystore just before another process committed a rotation
    sees the new key's entries in the log: that is AuditKeyRotated (reopen), not a
    broken chain that an operator would have to recover from (seen under load as an
    'audit_state_mismatch' in the rotation-while-signing reliability test)."""
    from anyhsm.audit import AuditKeyRing, AuditState, _check_against_state, diagnose
    from anyhsm.errors import AuditKeyRotated

    state, ring = _stale_view(used)
    assert isinstance(state, AuditState) and isinstance(ring, AuditKeyRing)
    assert run(capsys, used, "keystore", "rotate")[0] == 0
    assert run(capsys, used, "sign", "--key", "hot", "--digest", DIGEST)[0] == 0
    with open_hsm(used) as hsm:
        path = hsm.audit_path
    assert any(e.get("kid") == 2 for e in entries(path))  # entries under the new key
    with pytest.raises(AuditKeyRotated, match="newer than this keystore's key"):
        _check_against_state(path, state, ring)
    # The current keystore reads the same log as one unbroken chain.
    with open_hsm(used) as hsm:
        assert hsm.verify_audit().ok
        assert diagnose(path, hsm.keystore) is None


def test_forged_entry_naming_a_newer_key_stays_recoverable(
    used: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A line appended by hand that claims a future audit key cannot be chained: opening
    fails closed, and 'audit recover' (which holds no race) still treats it as the loss
    it is, instead of telling the operator to reopen for ever."""
    with open_hsm(used) as hsm:
        path = hsm.audit_path
    last = entries(path)[-1]
    forged = {k: v for k, v in last.items() if k != "mac"}
    forged.update(seq=int(str(last["seq"])) + 1, kid=7)
    body = json.dumps(forged, sort_keys=True, separators=(",", ":"))
    with path.open("ab") as f:
        f.write(body[:-1].encode() + b',"mac":"' + b"00" * 32 + b'"}\n')
    code, err = run(capsys, used, "sign", "--key", "hot", "--digest", DIGEST)
    assert code != 0 and err["code"] in {"audit_key_rotated", "audit_state_mismatch"}
    code, out = run(capsys, used, "audit", "recover", "--reason", "forged line found")
    assert code == 0, out
    assert run(capsys, used, "sign", "--key", "hot", "--digest", DIGEST)[0] == 0
