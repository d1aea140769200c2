"""Copy each audit entry, as it is written, to syslog or journald.

The local log proves what happened only as long as nobody who can write files
on the host rewinds it together with the keystore. A copy sent as each entry
is written, to a collector the host cannot rewrite (a remote syslog server, or
journald forwarding to one), is what catches a rollback of the whole host; the
TPM counter that anchors the keystore generation is the other answer.

Entries go out as RFC 3164 messages ``<PRI>anyhsm[PID]: <the exact line>`` on
facility authpriv, over a Unix datagram socket (``/dev/log``: rsyslog,
syslog-ng, journald) or UDP to ``host:port``.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

from anyhsm.config import AuditConfig
from anyhsm.errors import AuditWriteFailed

FACILITY_AUTHPRIV = 10
SEVERITY_INFO = 6
MAX_DATAGRAM = 60_000


class SyslogForwarder:
    """Send each line as one datagram. ``required``: a failed send fails the operation
    (the entry is already in the local log); otherwise it is counted and logged."""

    def __init__(self, address: str, *, required: bool = False) -> None:
        self.address = address
        self.required = required
        self._prefix = f"<{FACILITY_AUTHPRIV * 8 + SEVERITY_INFO}>anyhsm[{os.getpid()}]: ".encode()
        self._sock: socket.socket | None = None
        self._target: str | tuple[str, int]
        if address.startswith("/"):
            self._family = socket.AF_UNIX
            self._target = address
        else:
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"syslog address {address!r} is neither a path nor host:port")
            self._family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
            self._target = (host.strip("[]"), int(port))

    def _socket(self) -> socket.socket:
        if self._sock is None:
            self._sock = socket.socket(self._family, socket.SOCK_DGRAM)
        return self._sock

    def send(self, line: bytes) -> None:
        msg = self._prefix + line.rstrip(b"\n")
        if len(msg) > MAX_DATAGRAM:
            msg = msg[:MAX_DATAGRAM]
        try:
            self._socket().sendto(msg, self._target)
        except OSError as e:
            self.close()
            if self.required:
                raise AuditWriteFailed(
                    f"cannot forward the audit entry to syslog at {self.address}: "
                    f"{e.strerror or e} (the entry is in the local log)",
                    hint="start the syslog daemon, or set [audit] forward_required = false",
                ) from None
            raise

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None


def default_address() -> str:
    return "/dev/log" if Path("/dev/log").exists() else "/run/systemd/journal/syslog"


def forwarder_for(config: AuditConfig) -> SyslogForwarder | None:
    """The forwarder ``[audit] forward`` asks for, or None."""
    if config.forward != "syslog":
        return None
    return SyslogForwarder(
        config.syslog_address or default_address(), required=config.forward_required
    )
