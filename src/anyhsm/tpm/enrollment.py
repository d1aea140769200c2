"""Enrolling a keystore with a TPM: the library side of ``anyhsm tpm enroll|unenroll|status``.

Enrolment seals the keystore's master key to the TPM (:class:`~anyhsm.tpm.sealing.TpmSealer`
through the one sealed-master-key path, :mod:`anyhsm.unlock_blobs`) and writes the blob
beside the keystore (``tpm-sealed.json``, atomically). The passphrase-wrapped copy of the
master key in the keystore header is never touched, so the recovery passphrase keeps
opening the same keys whatever happens to the TPM.

What only a TPM adds: enrolment also anchors the keystore's generation in a TPM NV
counter (:class:`~anyhsm.tpm.counter.TpmCounter`), so that a rollback of the whole
keystore directory is detected; unenrolment removes the anchor from the keystore first,
then the counter from the TPM.
"""

from __future__ import annotations

import contextlib

from anyhsm import unlock_blobs
from anyhsm.errors import AnchorMismatch, AnchorMissing, HsmError
from anyhsm.keystore import Keystore
from anyhsm.tpm.counter import TpmCounter
from anyhsm.tpm.device import tpm_info
from anyhsm.tpm.sealing import NOT_ENROLLED_HINT, SIDE_FILE, TpmSealer, not_enrolled
from anyhsm.tpm.settings import TpmSettings

__all__ = [
    "NOT_ENROLLED_HINT",
    "SIDE_FILE",
    "enroll",
    "read_blob",
    "status",
    "unenroll",
    "unenroll_anchor",
]


def enroll(keystore: Keystore, settings: TpmSettings) -> dict[str, object]:
    """Seal the (unlocked) keystore's master key to the TPM, anchor the keystore's
    generation in a TPM counter, and store the blob.

    The new blob is unsealed and compared before it replaces any previous one,
    so a failed enrolment never leaves a keystore that the TPM cannot open.
    Returns a summary without secrets.
    """

    def anchor() -> dict[str, object]:
        counter, how = _anchor(keystore, settings)
        return {
            "tcti": settings.tcti,
            "anchor": {"kind": counter.kind, "ref": counter.ref, "counter": how},
        }

    return unlock_blobs.enrol(keystore, TpmSealer(settings), before_store=anchor)


def _anchor(keystore: Keystore, settings: TpmSettings) -> tuple[TpmCounter, str]:
    """Anchor the keystore's generation in a TPM counter: keep the one the manifest
    names if it is still there (checking the store against it, so re-enrolling never
    hides a rollback), else define a new one. Returns it and "kept" or "defined"."""
    named = keystore.generation_anchor_ref()
    if named is not None and named[0] == TpmCounter.kind:
        existing = TpmCounter.at(settings, named[1])
        try:
            keystore.attach_generation_anchor(existing)  # KeystoreRolledBack propagates
            return existing, "kept"
        except (AnchorMissing, AnchorMismatch):
            pass  # TPM cleared or replaced, index gone or taken: re-anchor below
    counter = TpmCounter.define(settings)
    try:
        keystore.set_generation_anchor(counter)
    except BaseException:
        with contextlib.suppress(HsmError):
            counter.undefine()
        raise
    return counter, "defined"


def unenroll_anchor(keystore: Keystore, settings: TpmSettings | None) -> None:
    """Stop anchoring the keystore's generation in a TPM counter: the anchor leaves the
    manifest first, then (with ``settings``) the counter leaves the TPM, so a crash in
    between leaves an unused NV index, never a keystore naming a missing anchor. A
    counter that cannot be removed (TPM unreachable, no ``settings``) stays behind
    (``tpm2_nvundefine`` removes it)."""
    named = keystore.generation_anchor_ref()
    if named is None or named[0] != TpmCounter.kind:
        return
    keystore.set_generation_anchor(None)
    if settings is not None:
        with contextlib.suppress(HsmError):
            TpmCounter.at(settings, named[1]).undefine()


def unenroll(keystore: Keystore, settings: TpmSettings | None = None) -> bool:
    """Remove the generation anchor (:func:`unenroll_anchor`), then the sealed blob; True
    if there was a blob. The passphrase path is unaffected. Removing the file revokes
    nothing a saved copy opens: :meth:`anyhsm.hsm.Hsm.unenrol_tpm` also rotates."""
    unenroll_anchor(keystore, settings)
    return bool(keystore.remove_side_file(SIDE_FILE))


def read_blob(keystore: Keystore) -> bytes:
    """The sealed blob beside the keystore, or TpmNotEnrolled."""
    return unlock_blobs.read_named(keystore, SIDE_FILE, not_enrolled)


def status(keystore: Keystore, settings: TpmSettings) -> dict[str, object]:
    """Enrolment and TPM state for ``anyhsm tpm status``: never raises for TPM trouble,
    reports it. ``opens_keystore`` means the unsealed key really opens this keystore."""
    sealer = TpmSealer(settings)
    out: dict[str, object] = {"settings": settings.describe(), "enrolled": False}
    try:
        out["tpm"] = tpm_info(settings)
        out["reachable"] = True
    except HsmError as exc:
        out["reachable"] = False
        out["tpm_error"] = exc.to_dict()
    out["generation_counter"] = _counter_status(keystore, settings)
    raw = keystore.read_side_file(SIDE_FILE)
    if raw is None:
        out["reason"] = "not enrolled"
        return out
    out["enrolled"] = True
    try:
        out.update(sealer.blob_facts(raw))
        unlock_blobs.opens_keystore(keystore, sealer, raw)
    except HsmError as exc:
        out["unsealable"] = False
        out["opens_keystore"] = False
        out["reason"] = exc.message
        out["error"] = exc.to_dict()
        out.update(sealer.failure_facts(exc))
        return out
    out["unsealable"] = True
    out["opens_keystore"] = True
    return out


def _counter_status(keystore: Keystore, settings: TpmSettings) -> dict[str, object]:
    """The TPM counter the keystore names: its live value against the value the
    keystore recorded (the counter above it means the keystore was rolled back)."""
    try:  # the manifest is authenticated: readable only once the keystore is unlocked
        named = keystore.generation_anchor_ref()
        recorded = keystore.anchor_status().get("value")
    except HsmError as exc:
        return {"state": "unknown", "note": exc.message}
    if named is None or named[0] != TpmCounter.kind:
        return {"state": "none", "note": "the keystore names no TPM counter"}
    out: dict[str, object] = {"ref": named[1]}
    out["recorded"] = recorded
    try:
        value = TpmCounter.at(settings, named[1]).read()
    except HsmError as exc:
        out["state"] = "error"
        out["error"] = exc.to_dict()
        return out
    out["value"] = value
    if not isinstance(recorded, int):
        out["state"] = "unknown"
    elif value > recorded:
        out["state"] = "ahead of the keystore (rolled back)"
    elif value < recorded:
        out["state"] = "behind the keystore (advanced on the next open)"
    else:
        out["state"] = "ok"
    return out
