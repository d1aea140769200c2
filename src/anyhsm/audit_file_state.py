"""Development without a keystore: the audit chain's state in a MAC-ed file beside the log.

Real deployments keep the state in the keystore manifest (``config check``
refuses a deployment without one outside development). This exists so that a
simulator-only development set-up still gets a chained, checked log; its key
is a 0600 file beside the log, so it proves nothing against anyone who can read
that directory.
"""

from __future__ import annotations

import hmac
import json
import os
from pathlib import Path

from anyhsm.audit import AuditKeyRing, AuditState
from anyhsm.errors import AuditTampered
from anyhsm.fsutil import atomic_write, file_lock
from anyhsm.secret import SecretBytes


class FileAuditState:
    """An :class:`anyhsm.audit.AuditStateStore` kept in ``<log>.state`` and ``<log>.key``."""

    def __init__(self, log_path: Path) -> None:
        self._state_path = log_path.with_name(log_path.name + ".state")
        self._key_path = log_path.with_name(log_path.name + ".key")
        self._lock_path = log_path.with_name(log_path.name + ".lock")
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(self._lock_path):
            if not self._key_path.exists():
                atomic_write(self._key_path, os.urandom(32))
            if not self._state_path.exists():
                self._write(AuditState())

    def _key(self) -> SecretBytes:
        return SecretBytes(self._key_path.read_bytes())

    def _write(self, state: AuditState) -> None:
        body = json.dumps(state.to_dict(), sort_keys=True).encode()
        with self._key() as key:
            mac = hmac.digest(key.buffer, body, "sha256").hex()
        atomic_write(self._state_path, json.dumps({"state": state.to_dict(), "mac": mac}).encode())

    def load_audit_state(self) -> AuditState:
        try:
            d = json.loads(self._state_path.read_bytes())
            body = json.dumps(d["state"], sort_keys=True).encode()
            with self._key() as key:
                ok = hmac.compare_digest(
                    hmac.digest(key.buffer, body, "sha256").hex(), str(d["mac"])
                )
            if not ok:
                raise ValueError("mac")
            return AuditState.from_dict(d["state"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise AuditTampered(
                f"the audit state {self._state_path} is missing or fails authentication ({e})"
            ) from None

    def advance_audit_state(self, seq: int, mac: bytes, offset: int) -> None:
        with file_lock(self._lock_path):
            current = self.load_audit_state()
            if seq > current.seq:
                self._write(AuditState(current.chain, seq, mac, offset, current.genesis))

    def audit_keys(self) -> AuditKeyRing:
        return AuditKeyRing([(1, self._key())])

    def start_audit_chain(self, genesis: bytes) -> AuditState:
        with file_lock(self._lock_path):
            state = AuditState(self.load_audit_state().chain + 1, 0, genesis, 0, genesis)
            self._write(state)
            return state

    def check_not_rotated(self) -> None:
        """This store's key is a file that is never rotated."""
