"""A worker process for the reliability tests, and the test-side helpers that drive it.

Run as a script (``python helpers_worker.py MODE CONFIG ...``) it opens the
deployment with :func:`anyhsm.open_hsm` (passphrase from ``ANYHSM_PASSPHRASE``)
and works against the real keystore and audit log, printing one line per
*acknowledged* result, flushed only after the library call returned:

    READY <pid>
    KEY <id> <label> <public key hex>
    SIG <key id> <digest hex> <signature hex>
    EXISTS <label>
    DELETING <id>          (printed before the call: the deletion may or may not happen)
    DELETED <id>
    ROTATING <epoch> <passphrase index>   (before a rotation: it may or may not commit)
    ROTATED <epoch> <passphrase index>    (after it returned: committed)
    ERR <error code>       (an anyhsm error the worker was told to expect and survive)
    REOPENED
    DONE

Modes:
    generate CONFIG PREFIX [--count N] [--signs-per-key M] [--go FILE]
        make keys PREFIX-0, PREFIX-1, ... (forever unless --count), signing M
        random digests with each one after it is acknowledged.
    race CONFIG BARRIER_DIR NPROCS LABEL...
        for each label, meet the other NPROCS-1 workers at a file barrier, then
        try to create that label; print KEY on success, EXISTS on KeyExists.
    delete CONFIG REF
        delete one key.
    create CONFIG LABEL
        create one key.
    rotate CONFIG --start I --how passwd|cli|cli-passwd [--rounds N] [--secret-dir D]
           [--die-after-commit]
        rotate the master key over and over (forever unless --rounds): "passwd" calls
        Hsm.change_passphrase to passphrase I+1, I+2, ... (one handle for all rounds),
        "cli" runs ``anyhsm keystore rotate`` in-process with passphrase I each time (a
        fresh handle per round, as the command does), "cli-passwd" runs ``anyhsm keystore
        passwd --new-passphrase-file D/...`` with I+1, I+2, ...; --die-after-commit kills itself
        right after the first rotation committed. Passphrase number I is
        passphrase_for(ANYHSM_PASSPHRASE, I), so no secret crosses the command line.
    churn CONFIG PREFIX [--index I]
        forever (with passphrase number I): create PREFIX-i, then delete the key created before it.
    signloop CONFIG STOP_FILE KEY...
        sign with the keys in turn until STOP_FILE exists (then sign once more with
        each key); on an anyhsm error print ERR, close the handle and open a new one.

Any other error escapes with a traceback and a non-zero exit status, which
the tests report.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

WORKER = Path(__file__).resolve()


# --- worker side --------------------------------------------------------------------------


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _wait_for_file(path: Path, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"worker: {path} never appeared")
        time.sleep(0.001)


def _barrier(directory: Path, name: str, nprocs: int, timeout_s: float = 60.0) -> None:
    """Meet the other workers: each drops a file, then waits until all are there."""
    (directory / f"{name}.{os.getpid()}").touch()
    deadline = time.monotonic() + timeout_s
    prefix = f"{name}."
    while sum(1 for n in os.listdir(directory) if n.startswith(prefix)) < nprocs:
        if time.monotonic() > deadline:
            raise SystemExit(f"worker: barrier {name} timed out")
        time.sleep(0.0005)


def _generate(args: argparse.Namespace) -> None:
    from anyhsm import open_hsm

    hsm = open_hsm(args.config)
    _say(f"READY {os.getpid()}")
    if args.go:
        _wait_for_file(Path(args.go))
    i = 0
    while args.count is None or i < args.count:
        label = f"{args.prefix}-{i}"
        info = hsm.generate_key(label)
        _say(f"KEY {info.id} {info.label} {info.public_key.hex()}")
        for _ in range(args.signs_per_key):
            digest = os.urandom(32)
            sig = hsm.sign(info.id, digest)
            _say(f"SIG {info.id} {digest.hex()} {sig.hex()}")
        i += 1
    hsm.close()
    _say("DONE")


def _race(args: argparse.Namespace) -> None:
    from anyhsm import open_hsm
    from anyhsm.errors import KeyExists

    hsm = open_hsm(args.config)
    _say(f"READY {os.getpid()}")
    barrier = Path(args.barrier_dir)
    for label in args.labels:
        _barrier(barrier, label, args.nprocs)
        try:
            info = hsm.generate_key(label)
        except KeyExists:
            _say(f"EXISTS {label}")
            continue
        _say(f"KEY {info.id} {info.label} {info.public_key.hex()}")
    hsm.close()
    _say("DONE")


def _delete(args: argparse.Namespace) -> None:
    from anyhsm import open_hsm

    with open_hsm(args.config) as hsm:
        info = hsm.get_key(args.ref)
        hsm.delete_key(args.ref)
        _say(f"DELETED {info.id}")
    _say("DONE")


def _create(args: argparse.Namespace) -> None:
    from anyhsm import open_hsm

    with open_hsm(args.config) as hsm:
        info = hsm.generate_key(args.label)
        _say(f"KEY {info.id} {info.label} {info.public_key.hex()}")
    _say("DONE")


def passphrase_for(base: str, index: int) -> str:
    """Passphrase number ``index`` of a rotation series (0: the deployment's own)."""
    return base if index == 0 else f"{base} / rotation {index}"


def _rotate(args: argparse.Namespace) -> None:
    import contextlib
    import io
    import json

    from anyhsm import open_hsm
    from anyhsm.cli.main import main as cli_main
    from anyhsm.secret import SecretBytes

    base = os.environ["ANYHSM_PASSPHRASE"]
    index = args.start
    rounds = 0
    if args.die_after_commit:
        # Fault injection: SIGKILL ourselves the moment the new header is in place (the
        # rotation committed), before the old epoch is removed and the "ok" entry written.
        import signal

        from anyhsm.keystore.store import Keystore

        def die(*_: object) -> None:
            sys.__stdout__.write("COMMITTED\n")  # the CLI's own output is redirected
            sys.__stdout__.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        Keystore._adopt = die  # type: ignore[method-assign,assignment]
    if args.how in ("cli", "cli-passwd"):
        _say(f"READY {os.getpid()}")
        while args.rounds is None or rounds < args.rounds:
            os.environ["ANYHSM_PASSPHRASE"] = passphrase_for(base, index)
            command = ["keystore", "rotate"]
            new = index
            if args.how == "cli-passwd":
                new = index + 1
                secret = Path(args.secret_dir) / f"new-passphrase-{new}"
                fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(passphrase_for(base, new))
                command = ["keystore", "passwd", "--new-passphrase-file", str(secret)]
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                rc = cli_main(["--config", args.config, "--json", *command])
            if rc != 0:
                raise SystemExit(f"worker: {' '.join(command)} exited {rc}: {out.getvalue()}")
            index = new
            _say(f"ROTATED {json.loads(out.getvalue())['epoch']} {index}")
            rounds += 1
        _say("DONE")
        return
    hsm = open_hsm(args.config, passphrase=passphrase_for(base, index))
    _say(f"READY {os.getpid()}")
    while args.rounds is None or rounds < args.rounds:
        _say(f"ROTATING {hsm.keystore.epoch} {index + 1}")
        current = SecretBytes(passphrase_for(base, index).encode())
        with current, SecretBytes(passphrase_for(base, index + 1).encode()) as new:
            summary = hsm.change_passphrase(current, new)
        index += 1
        _say(f"ROTATED {summary['epoch']} {index}")
        rounds += 1
    hsm.close()
    _say("DONE")


def _churn(args: argparse.Namespace) -> None:
    from anyhsm import open_hsm

    hsm = open_hsm(
        args.config, passphrase=passphrase_for(os.environ["ANYHSM_PASSPHRASE"], args.index)
    )
    _say(f"READY {os.getpid()}")
    previous: str | None = None
    i = 0
    while True:
        info = hsm.generate_key(f"{args.prefix}-{i}")
        _say(f"KEY {info.id} {info.label} {info.public_key.hex()}")
        if previous is not None:
            _say(f"DELETING {previous}")
            hsm.delete_key(previous)
            _say(f"DELETED {previous}")
        previous = info.id
        i += 1


def _reopen(config: str) -> object:
    """Open again after a typed failure. An open that races a rotation committing in
    another process fails with a typed error too (KeystoreRotated, AuditKeyRotated):
    retry, a bounded number of times, as an operator's supervisor would."""
    import time

    from anyhsm import open_hsm
    from anyhsm.errors import HsmError

    for _ in range(100):
        try:
            return open_hsm(config)
        except HsmError as e:
            _say(f"REOPEN-ERR {e.code}")
            time.sleep(0.02)
    return open_hsm(config)


def _signloop(args: argparse.Namespace) -> None:
    from anyhsm import open_hsm
    from anyhsm.errors import HsmError

    hsm = open_hsm(args.config)
    _say(f"READY {os.getpid()}")
    stop = Path(args.stop)
    last_round = False
    while True:
        for key_id in args.keys:
            digest = os.urandom(32)
            try:
                sig = hsm.sign(key_id, digest)
            except HsmError as e:
                _say(f"ERR {e.code}")
                with contextlib.suppress(HsmError):
                    hsm.close()
                hsm = _reopen(args.config)
                _say("REOPENED")
                continue
            _say(f"SIG {key_id} {digest.hex()} {sig.hex()}")
        if last_round:
            break
        last_round = stop.exists()
    hsm.close()
    _say("DONE")


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    sub = ap.add_subparsers(dest="mode", required=True)
    g = sub.add_parser("generate")
    g.add_argument("config")
    g.add_argument("prefix")
    g.add_argument("--count", type=int, default=None)
    g.add_argument("--signs-per-key", type=int, default=0)
    g.add_argument("--go", default="")
    r = sub.add_parser("race")
    r.add_argument("config")
    r.add_argument("barrier_dir")
    r.add_argument("nprocs", type=int)
    r.add_argument("labels", nargs="+")
    d = sub.add_parser("delete")
    d.add_argument("config")
    d.add_argument("ref")
    c = sub.add_parser("create")
    c.add_argument("config")
    c.add_argument("label")
    ro = sub.add_parser("rotate")
    ro.add_argument("config")
    ro.add_argument("--start", type=int, default=0)
    ro.add_argument("--how", choices=["passwd", "cli", "cli-passwd"], default="passwd")
    ro.add_argument("--secret-dir", default="", help="where cli-passwd writes new passphrases")
    ro.add_argument("--rounds", type=int, default=None)
    ro.add_argument("--die-after-commit", action="store_true")
    ch = sub.add_parser("churn")
    ch.add_argument("config")
    ch.add_argument("prefix")
    ch.add_argument("--index", type=int, default=0, help="passphrase number")
    sl = sub.add_parser("signloop")
    sl.add_argument("config")
    sl.add_argument("stop")
    sl.add_argument("keys", nargs="+")
    args = ap.parse_args(argv)
    modes = {
        "generate": _generate,
        "race": _race,
        "delete": _delete,
        "create": _create,
        "rotate": _rotate,
        "churn": _churn,
        "signloop": _signloop,
    }
    modes[args.mode](args)


# --- test side ----------------------------------------------------------------------------


@dataclass(frozen=True)
class AckedKey:
    id: str
    label: str
    public_key: bytes


@dataclass(frozen=True)
class AckedSig:
    key_id: str
    digest: bytes
    signature: bytes


@dataclass
class Output:
    """What a worker acknowledged (complete lines only)."""

    pid: int = 0
    keys: list[AckedKey] = field(default_factory=list)
    sigs: list[AckedSig] = field(default_factory=list)
    exists: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    deleting: list[str] = field(default_factory=list)
    rotating: list[tuple[int, int]] = field(default_factory=list)  # (epoch before, index)
    rotated: list[tuple[int, int]] = field(default_factory=list)  # (epoch after, index)
    errors: list[str] = field(default_factory=list)
    reopened: int = 0
    lines: list[str] = field(default_factory=list)  # every tagged line, in order
    reopen_errors: list[str] = field(default_factory=list)  # a reopen that raced a rotation
    done: bool = False

    def add(self, line: str) -> None:
        parts = line.split()
        if not parts:
            return
        tag = parts[0]
        self.lines.append(line.rstrip("\n"))
        if tag == "READY":
            self.pid = int(parts[1])
        elif tag == "KEY":
            self.keys.append(AckedKey(parts[1], parts[2], bytes.fromhex(parts[3])))
        elif tag == "SIG":
            self.sigs.append(AckedSig(parts[1], bytes.fromhex(parts[2]), bytes.fromhex(parts[3])))
        elif tag == "EXISTS":
            self.exists.append(parts[1])
        elif tag == "DELETED":
            self.deleted.append(parts[1])
        elif tag == "DELETING":
            self.deleting.append(parts[1])
        elif tag == "ROTATING":
            self.rotating.append((int(parts[1]), int(parts[2])))
        elif tag == "ROTATED":
            self.rotated.append((int(parts[1]), int(parts[2])))
        elif tag == "ERR":
            self.errors.append(parts[1])
        elif tag == "REOPEN-ERR":
            self.reopen_errors.append(parts[1])
        elif tag == "REOPENED":
            self.reopened += 1
        elif tag == "DONE":
            self.done = True


class Worker:
    """A running worker; lines are collected by a reader thread as they arrive."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(os.environ),
        )
        self.output = Output()
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._stderr = b""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            if raw.endswith(b"\n"):  # a line cut by a kill was never acknowledged
                self._lines.put(raw.decode())
        self._lines.put(None)

    def _take(self, line: str) -> None:
        self.output.add(line)

    def wait_for(self, tag: str, timeout_s: float = 60.0) -> None:
        """Block until the worker printed a line starting with ``tag``."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.kill()
                raise AssertionError(f"worker printed no {tag} line in {timeout_s} s") from None
            if line is None:
                self.finish(timeout_s)
                raise AssertionError(
                    f"worker exited ({self.proc.returncode}) before printing {tag}:\n" + self.stderr
                )
            self._take(line)
            if line.startswith(tag):
                return

    def kill(self) -> Output:
        """SIGKILL the worker and collect every complete line it printed."""
        self.proc.kill()
        return self.finish(30.0)

    def finish(self, timeout_s: float = 120.0) -> Output:
        """Wait for exit; collect the remaining lines."""
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(timeout_s)
        while True:
            line = self._lines.get_nowait() if not self._lines.empty() else None
            if line is None:
                break
            self._take(line)
        assert self.proc.stderr is not None
        self._stderr = self.proc.stderr.read()
        self.proc.stderr.close()
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        return self.output

    @property
    def stderr(self) -> str:
        return self._stderr.decode(errors="replace")

    def check_ok(self) -> Output:
        """Wait for a normal exit and insist on it."""
        out = self.finish()
        assert self.proc.returncode == 0, f"worker failed ({self.proc.returncode}):\n{self.stderr}"
        assert out.done, "worker exited without DONE"
        return out


ROTATION_OPS = ("rotate_master_key", "keystore_passwd")


def check_audit_key_ids(audit_path: Path, epoch: int) -> list[dict[str, object]]:
    """One chain whose key id (``kid``) moves up by exactly one, only right after a
    rotation's "started" entry (the last entry under the old key), once per committed
    rotation: it ends at the keystore's epoch. Returns the entries."""
    import itertools
    import json

    entries = [json.loads(line) for line in audit_path.read_bytes().splitlines()]
    assert [e["seq"] for e in entries] == list(range(1, len(entries) + 1))
    kid = 1
    for prev, entry in itertools.pairwise(entries):
        k = entry.get("kid", 1)
        if k == kid:
            continue
        assert k == kid + 1, f"entry {entry['seq']}: audit key {k} after {kid}"
        assert prev["op"] in ROTATION_OPS and prev["outcome"] == "started", (
            f"entry {entry['seq']}: the audit key changed after {prev['op']} {prev['outcome']}"
        )
        kid = k
    assert kid == epoch, f"{epoch - 1} rotations committed but the audit key is number {kid}"
    return entries


if __name__ == "__main__":
    main()
