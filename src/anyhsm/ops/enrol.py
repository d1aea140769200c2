"""Unlock paths of the keystore: the TPM seal and the PKCS#11 token wrap; enrol, unenrol,
status. Each is one audited operation of the handle (:class:`anyhsm.hsm.Hsm`).

Enrolment needs the passphrase once; on a deployment whose chain cannot reach its floor
until a path is enrolled (a fresh production mainnet one) open the handle with
``enrolment=True`` (:func:`anyhsm.ops.session.open_handle`): the keystore opened with
the passphrase, audited as such, every key operation refused. Unenrolling rotates to a
fresh master key without the blob, so a saved copy of it opens nothing; that needs the
current passphrase when the path was enrolled (:func:`needs_passphrase`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from anyhsm.config import Config
    from anyhsm.hsm import Hsm
    from anyhsm.secret import SecretBytes

TPM = "tpm"
TOKEN_WRAP = "pkcs11-wrap"  # noqa: S105 (a path name, as Anchor.enrolled() names them)


@dataclass(frozen=True)
class Summary:
    """What an enrolment step reports (its members are documented in docs/cli.md)."""

    data: Mapping[str, object]

    def get(self, name: str) -> object:
        return self.data.get(name)

    def to_dict(self) -> dict[str, object]:
        return dict(self.data)


@dataclass(frozen=True)
class TpmStatus(Summary):
    @property
    def ok(self) -> bool:
        """Enrolled, and the sealed key really opens this keystore."""
        return bool(self.data.get("enrolled")) and bool(self.data.get("opens_keystore"))


@dataclass(frozen=True)
class Unenrolment(Summary):
    """``unenrolled`` false when the path was not enrolled (nothing rotated); else the
    rotation's ``epoch``, ``generation``, ``keys``..."""

    @property
    def unenrolled(self) -> bool:
        return bool(self.data.get("unenrolled"))


def check_configured(config: Config, path: str) -> None:
    """ConfigError, before any handle is opened (so no passphrase is asked for a
    refusal), when ``path`` (:data:`TPM`, :data:`TOKEN_WRAP`) is not configured:
    ``[providers.tpm] tcti``, ``[providers.pkcs11] wrap_key_label``."""
    from anyhsm.anchor import token_sealer, tpm_sealer

    if path == TPM:
        tpm_sealer(config)
    else:
        token_sealer(config, None)


def needs_passphrase(hsm: Hsm, path: str) -> bool:
    """Whether unenrolling ``path`` (:data:`TPM` or :data:`TOKEN_WRAP`) rotates the master
    key, and so needs the current passphrase."""
    return path in hsm.anchor.enrolled()


def enrol_tpm(hsm: Hsm, *, force: bool = False) -> Summary:
    """Seal the keystore's master key to the configured TPM (``tpm_enroll``); ``force``
    re-enrols from a keystore the TPM itself opened."""
    return Summary(hsm.enrol_tpm(force=force))


def tpm_status(hsm: Hsm) -> TpmStatus:
    """Enrolment, TPM reachability, unsealability; TPM trouble is reported, not raised."""
    return TpmStatus(hsm.tpm_status())


def unenrol_tpm(hsm: Hsm, current: SecretBytes | None) -> Unenrolment:
    """Revoke the TPM unlock path (``tpm_unenroll``); ``current``: the passphrase (None
    only when not enrolled)."""
    return Unenrolment(hsm.unenrol_tpm(current))


def enrol_token_wrap(hsm: Hsm) -> Summary:
    """Wrap the master key with the token's AES key ``wrap_key_label``
    (``pkcs11_wrap_enroll``); ConfigError naming the setting when it is not configured."""
    return Summary(hsm.enrol_token_wrap())


def unenrol_token_wrap(hsm: Hsm, current: SecretBytes | None) -> Unenrolment:
    """Revoke the token unlock path (``pkcs11_wrap_unenroll``), as :func:`unenrol_tpm`."""
    return Unenrolment(hsm.unenrol_token_wrap(current))
