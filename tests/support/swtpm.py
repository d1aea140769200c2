"""Start and stop a real swtpm (TPM 2.0 emulator) for tests.

One swtpm process per call of :func:`start_swtpm`, in socket mode on a free
loopback port pair (server port N, control port N+1, which is what the TSS
``swtpm`` TCTI expects), with its own state directory. swtpm runs the TPM2
Startup(CLEAR) itself (``--flags not-need-init,startup-clear``); we wait until
it answers a real TPM command before returning. Every started process is
stopped at interpreter exit as a safety net; fixtures should stop it sooner.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import shutil
import signal
import socket
import struct
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

_STARTUP_WAIT_S = 10.0
# TPM2_GetRandom(8): tag TPM_ST_NO_SESSIONS, size 12, command code 0x17B, bytesRequested 8.
_PROBE_COMMAND = bytes.fromhex("80010000000c0000017b0008")

_running: list[Swtpm] = []


def swtpm_available() -> bool:
    """True when both the swtpm binary and tpm2-pytss are installed (what the TPM tests need)."""
    return shutil.which("swtpm") is not None and importlib.util.find_spec("tpm2_pytss") is not None


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _free_port_pair() -> int:
    """A port N with N and N+1 both free on 127.0.0.1 (a race remains; start retries)."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port < 65535 and _port_free(port + 1):
            return port
    raise RuntimeError("no free loopback port pair found for swtpm")


def _probe(port: int) -> bool:
    """Send TPM2_GetRandom on the data channel; True once a success response comes back."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
            s.sendall(_PROBE_COMMAND)
            header = b""
            while len(header) < 10:
                chunk = s.recv(10 - len(header))
                if not chunk:
                    return False
                header += chunk
            _tag, size, rc = struct.unpack(">HII", header)
            remaining = int(size) - 10
            while remaining > 0:
                chunk = s.recv(remaining)
                if not chunk:
                    return False
                remaining -= len(chunk)
            return int(rc) == 0
    except OSError:
        return False


@dataclass
class Swtpm:
    """A running (or stopped) swtpm with persistent state in ``state_dir``."""

    tcti: str
    port: int
    state_dir: Path
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start on the same ports with the same state (PCRs reset: Startup(CLEAR))."""
        if self.running:
            return
        self.state_dir.mkdir(parents=True, exist_ok=True)
        log = self.state_dir.parent / f"{self.state_dir.name}.swtpm.log"
        cmd = [
            "swtpm",
            "socket",
            "--tpm2",
            "--tpmstate",
            f"dir={self.state_dir}",
            "--server",
            f"type=tcp,port={self.port},bindaddr=127.0.0.1",
            "--ctrl",
            f"type=tcp,port={self.port + 1},bindaddr=127.0.0.1",
            "--flags",
            "not-need-init,startup-clear",
            "--log",
            f"file={log}",
        ]
        self._proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + _STARTUP_WAIT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                self._proc = None
                raise RuntimeError(f"swtpm exited at start: {err.strip()}")
            if _probe(self.port):
                return
            time.sleep(0.01)
        self.stop()
        raise RuntimeError(f"swtpm on port {self.port} did not answer within {_STARTUP_WAIT_S}s")

    def stop(self) -> None:
        """Terminate the process (state stays on disk)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)  # a paused process would not act on SIGTERM
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if proc.stderr is not None:
            proc.stderr.close()

    def wipe(self) -> None:
        """Stop, delete all TPM state, start fresh: a new TPM as far as sealed data is concerned."""
        self.stop()
        shutil.rmtree(self.state_dir, ignore_errors=True)
        self.start()

    def pause(self) -> None:
        """Freeze the process (SIGSTOP): the port accepts but nothing answers."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Undo :meth:`pause` (SIGCONT)."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGCONT)


def start_swtpm(state_dir: Path) -> Swtpm:
    """Start a swtpm on a free loopback port pair with state in ``state_dir``."""
    last: Exception | None = None
    for _ in range(5):
        port = _free_port_pair()
        tpm = Swtpm(tcti=f"swtpm:host=127.0.0.1,port={port}", port=port, state_dir=state_dir)
        try:
            tpm.start()
        except RuntimeError as exc:  # port taken between the check and the bind: try another
            last = exc
            continue
        _running.append(tpm)
        return tpm
    raise RuntimeError(f"could not start swtpm: {last}")


@atexit.register
def _stop_all() -> None:
    for tpm in _running:
        with contextlib.suppress(Exception):
            tpm.stop()
