"""Where the active spending policy is authenticated: its binding and the state's MAC key.

The binding is (SHA-256 of the active policy file, version), kept in the keystore's
manifest (:meth:`anyhsm.hsm.Hsm.policy_binding`, :meth:`~anyhsm.hsm.Hsm.set_policy_binding`):
authenticated under the master key, part of the store's generation, which a TPM anchors
where one is enrolled, so neither an edit nor a rollback of the directory goes unseen.
``anyhsm policy set`` changes it (audited by the handle as ``policy_set``); every signing
checks the policy file it reads against it.

The state key MACs the velocity counters; it comes from the manifest's state secret
(:meth:`~anyhsm.hsm.Hsm.state_key`), sealed under the master key and sealed again by every
rotation, so it outlives master-key rotations.

The active policy's file is kept beside the state under its hash's name
(``policy-<sha256>.toml``): the copy a binding names is written before the binding moves
to it, so signers never see a binding without its file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from anyhsm.errors import HsmError, PolicyNotAuthenticated
from anyhsm.policy.state import STATE_RULE

if TYPE_CHECKING:
    from collections.abc import Mapping

    from anyhsm.hsm import Hsm

BINDING_RULE = "policy-authenticated"
STATE_PURPOSE = "spending-policy"


def policy_file(directory: Path, sha256: str) -> Path:
    """The active policy's copy for the binding ``sha256``."""
    return directory / f"policy-{sha256}.toml"


@dataclass(frozen=True)
class Binding:
    """The active policy: the SHA-256 of its file and how many times one was set."""

    sha256: str
    version: int


class PolicyAnchor(Protocol):
    def binding(self) -> Binding | None:
        """The active binding; None when no policy is set."""
        ...

    def bind(self, sha256: str, detail: Mapping[str, str]) -> Binding:
        """Make ``sha256`` the active policy (version + 1), audited with ``detail``."""
        ...

    def state_key(self) -> bytes:
        """The key MAC-ing the policy state."""
        ...


class ManifestAnchor:
    """:class:`PolicyAnchor` in the keystore manifest, through the handle."""

    def __init__(self, hsm: Hsm) -> None:
        self._hsm = hsm

    def binding(self) -> Binding | None:
        try:
            found = self._hsm.policy_binding()
        except HsmError:
            return None  # no keystore: no policy can have been set (setting one needs it)
        return None if found is None else Binding(*found)

    def bind(self, sha256: str, detail: Mapping[str, str]) -> Binding:
        return Binding(sha256, self._hsm.set_policy_binding(sha256, detail))

    def state_key(self) -> bytes:
        with self._hsm.state_key(STATE_PURPOSE) as key:
            return bytes(key.buffer)


STATE_SEQ = "state_seq"  # the detail member of every state commit's audit entry


class AuditStateAnchor:
    """:class:`~anyhsm.policy.state.StateAnchor` in the audit chain: the newest
    ``detail.state_seq`` the handle's audit log records. Every state commit's entry
    carries it (``policy_decision``, ``policy_compensate``, ``policy_approval``,
    ``policy_freeze``/``unfreeze``, ``policy_state``), written while the state's lock is
    held, so the last one in the log is the newest commit; the chain is anchored in the
    keystore manifest (and a TPM where enrolled), so the log cannot be put back with the
    state directory (up to its last checkpoint, see docs/policy.md section 6).

    Read through :meth:`anyhsm.hsm.Hsm.audit_latest`: every line it relies on is
    MAC-verified, other processes' entries included; an edited line fails closed."""

    def __init__(self, hsm: Hsm) -> None:
        self._hsm = hsm

    def newest(self) -> int | None:
        value = self._hsm.audit_latest(STATE_SEQ)
        if value is None:
            return None
        if not value.isdigit() or len(value) > 19:
            raise PolicyNotAuthenticated(
                f"the audit log records a malformed policy state number {value[:32]!r}",
                hint="run 'anyhsm audit verify'",
                rules=[STATE_RULE],
            )
        return int(value)


__all__ = [
    "BINDING_RULE",
    "STATE_SEQ",
    "AuditStateAnchor",
    "Binding",
    "ManifestAnchor",
    "PolicyAnchor",
    "policy_file",
]
