"""Where the active spending policy is authenticated: its binding and the state's MAC key.

The binding is (SHA-256 of the active policy file, version): ``anyhsm policy set`` writes
it, every signing checks the policy it reads against it, so a policy file edited on disk
without that admin step is refused. The state key MACs the velocity counters.

Today both come from the keystore in one place, :class:`KeystoreFileAnchor`: the binding
is a small file beside the policy state, MAC-ed under a key derived (HKDF) from the
keystore's master key, and the state key is derived the same way. Nobody without the
master key can write a binding or state that verifies. Two limits, documented in
docs/policy.md: a master-key rotation (``anyhsm keystore rotate``) changes both keys, so
the policy must be set again afterwards (signing under it is refused until then: fail
closed); and a copy of older binding and state files put back by someone who can write
the directory is not told apart from the current ones (the keystore manifest, with its
TPM-anchored generation, is where the binding belongs: asked of the handle's owner).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from anyhsm.errors import HsmError, PolicyNotAuthenticated

if TYPE_CHECKING:
    from anyhsm.hsm import Hsm

BINDING_FILE = "binding.json"
POLICY_FILE = "policy.toml"
FORMAT = "anyhsm-policy-binding"
BINDING_RULE = "policy-authenticated"
_BINDING_PURPOSE = "anyhsm/v1/spending-policy/binding"
_STATE_PURPOSE = "anyhsm/v1/spending-policy/state"


@dataclass(frozen=True)
class Binding:
    """The active policy: the SHA-256 of its file and how many times one was set."""

    sha256: str
    version: int


class PolicyAnchor(Protocol):
    def binding(self) -> Binding | None:
        """The active binding; None when no policy was ever set (no binding at all)."""
        ...

    def bind(self, sha256: str) -> Binding:
        """Make ``sha256`` the active policy (version + 1); the caller holds the state
        transaction's lock and audits the step."""
        ...

    def state_key(self) -> bytes:
        """The key MAC-ing the policy state."""
        ...


def _refused(message: str, hint: str | None = None) -> PolicyNotAuthenticated:
    return PolicyNotAuthenticated(message, hint=hint, rules=[BINDING_RULE])


class KeystoreFileAnchor:
    """:class:`PolicyAnchor` as a MAC-ed file beside the state, keyed from the keystore."""

    def __init__(self, hsm: Hsm, directory: Path) -> None:
        self._hsm = hsm
        self.directory = directory
        self.path = directory / BINDING_FILE

    def exists(self) -> bool:
        """Whether a binding file is there (checked before any key is derived)."""
        return self.path.exists()

    def _key(self, purpose: str) -> bytes:
        try:
            keystore = self._hsm.keystore
        except HsmError:
            raise _refused(
                "a spending policy needs the keystore as its anchor, and this deployment "
                "opened none",
                "add [providers.software] (the keystore) to the configuration",
            ) from None
        with keystore.subkey(purpose) as key:
            return bytes(key.buffer)

    def state_key(self) -> bytes:
        return self._key(_STATE_PURPOSE)

    def _mac(self, sha256: str, version: int) -> str:
        body = f"{FORMAT}\x00{sha256}\x00{version}".encode()
        return hmac.new(self._key(_BINDING_PURPOSE), body, hashlib.sha256).hexdigest()

    def binding(self) -> Binding | None:
        try:
            raw = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return None
        except ValueError:
            raise _refused(f"the spending policy binding {self.path} is damaged") from None
        sha, version, mac = raw.get("sha256"), raw.get("version"), raw.get("mac")
        if not (isinstance(sha, str) and isinstance(version, int) and isinstance(mac, str)):
            raise _refused(f"the spending policy binding {self.path} is damaged")
        if raw.get("format") != FORMAT or not hmac.compare_digest(mac, self._mac(sha, version)):
            raise _refused(
                f"the spending policy binding {self.path} fails authentication: written "
                "without the keystore's key, or before a master-key rotation",
                "run 'anyhsm policy set FILE --reset-state' (audited) to set the policy again",
            )
        return Binding(sha, version)

    def bind(self, sha256: str) -> Binding:
        from anyhsm.fsutil import atomic_write

        try:
            old = self.binding()
        except PolicyNotAuthenticated:
            old = None  # replaced by the admin step that was asked to replace it
        version = (old.version if old is not None else 0) + 1
        data = {"format": FORMAT, "sha256": sha256, "version": version}
        data["mac"] = self._mac(sha256, version)
        atomic_write(self.path, json.dumps(data, sort_keys=True).encode() + b"\n")
        return Binding(sha256, version)


__all__ = ["BINDING_FILE", "POLICY_FILE", "Binding", "KeystoreFileAnchor", "PolicyAnchor"]
