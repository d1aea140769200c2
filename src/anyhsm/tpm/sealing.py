"""Seal a 32-byte secret (the keystore master key) to a TPM, and unseal it.

Design (the one disk-encryption tools use, since TPMs have no secp256k1):

- Parent: the TCG storage root key template (ECC NIST P-256, AES-128-CFB,
  restricted decrypt, noDA) created as a *primary* in the owner hierarchy. A
  primary is derived from the hierarchy seed and the template, so the same TPM
  re-creates the same key every time and nothing is written to TPM NV memory.
  Its name is stored in the blob: another TPM, or this one after TPM2_Clear,
  yields another name and unseal says so plainly (TpmForeignBlob).
- Child: a keyedhash "sealed data object" holding the secret, fixedTPM and
  fixedParent (it can never be duplicated off this TPM). With PCRs configured
  its authPolicy is PolicyPCR over their values and userWithAuth is clear, so
  only a policy session whose PCRs match can unseal; without PCRs anyone
  who can talk to this TPM can unseal (TPM-only mode, as with a TPM-only LUKS
  slot: it protects a stolen disk, not a running machine).
- noDA is SET on the sealed object (and on the primary, per the TCG template).
  The object's authValue is empty and public, so dictionary-attack counting
  protects nothing here: its protection is the PCR policy and the TPM-bound
  parent, and PolicyPCR failures never count as failed authorisations anyway.
  Leaving DA on would only let anyone with TPM access push the whole TPM into
  lockout by sending wrong passwords for this object, and would make this
  keystore unopenable whenever some other software locked the TPM out. (A PIN
  would change this: a PIN-protected object must clear noDA.)
- Parameter encryption: the secret crosses the bus to the TPM (create) and
  back (unseal) inside an AES-128-CFB encrypted session salted to the primary
  key, so a passive sniffer of the LPC/SPI bus does not see it.
- Every transient object and session is flushed (see connection.Connection).
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any

from anyhsm.errors import HsmError
from anyhsm.secret import SecretBytes
from anyhsm.tpm import connection
from anyhsm.tpm.blob import SealedBlob
from anyhsm.tpm.connection import Connection
from anyhsm.tpm.errors import (
    RECOVERY_HINT,
    TpmBlobInvalid,
    TpmCommandFailed,
    TpmForeignBlob,
    TpmNotEnrolled,
    TpmPolicyMismatch,
)
from anyhsm.tpm.policy import pcr_values_digest, policy_pcr_digest
from anyhsm.tpm.settings import PCR_BANKS, TpmSettings
from anyhsm.types import SecurityLevel

if TYPE_CHECKING:
    from anyhsm.keystore import Keystore

PRIMARY_TEMPLATE = "tcg-srk-ecc-p256-aes128cfb"
MAX_SECRET = 128  # TPM2B_SENSITIVE_DATA holds at most 128 bytes

# TPMA_OBJECT bits
_FIXEDTPM = 0x00000002
_FIXEDPARENT = 0x00000010
_SENSITIVEDATAORIGIN = 0x00000020
_USERWITHAUTH = 0x00000040
_NODA = 0x00000400
_RESTRICTED = 0x00010000
_DECRYPT = 0x00020000

PRIMARY_ATTRIBUTES = (
    _FIXEDTPM | _FIXEDPARENT | _SENSITIVEDATAORIGIN | _USERWITHAUTH | _NODA | _RESTRICTED | _DECRYPT
)
SEALED_ATTRIBUTES = _FIXEDTPM | _FIXEDPARENT | _NODA  # plus USERWITHAUTH when no PCR policy

_ALG_SHA256 = 0x000B
_ALG_KEYEDHASH = 0x0008
_ALG_NULL = 0x0010


def _primary_template(lib: Any) -> Any:
    """TCG "Storage Root Key" template, ECC NIST P-256 with AES-128-CFB."""
    pub = lib.TPMT_PUBLIC(
        type=lib.TPM2_ALG.ECC,
        nameAlg=lib.TPM2_ALG.SHA256,
        objectAttributes=PRIMARY_ATTRIBUTES,
    )
    detail = pub.parameters.eccDetail
    detail.symmetric.algorithm = lib.TPM2_ALG.AES
    detail.symmetric.keyBits.aes = 128
    detail.symmetric.mode.aes = lib.TPM2_ALG.CFB
    detail.scheme.scheme = lib.TPM2_ALG.NULL
    detail.curveID = lib.TPM2_ECC.NIST_P256
    detail.kdf.scheme = lib.TPM2_ALG.NULL
    return lib.TPM2B_PUBLIC(publicArea=pub)


def _aes_cfb(lib: Any) -> Any:
    return lib.TPMT_SYM_DEF(
        algorithm=lib.TPM2_ALG.AES,
        keyBits=lib.TPMU_SYM_KEY_BITS(aes=128),
        mode=lib.TPMU_SYM_MODE(aes=lib.TPM2_ALG.CFB),
    )


def _selection(lib: Any, bank: str, pcrs: tuple[int, ...]) -> Any:
    return lib.TPML_PCR_SELECTION.parse(f"{bank}:{','.join(str(p) for p in pcrs)}")


def _create_primary(conn: Connection) -> tuple[Any, bytes]:
    """Re-create the storage primary; returns its handle (tracked) and TPM name."""
    lib = conn.lib
    with conn.step("create the storage primary key"):
        handle, *_ = conn.esys.create_primary(
            None, _primary_template(lib), lib.ESYS_TR.OWNER, session1=lib.ESYS_TR.PASSWORD
        )
    conn.track(handle)
    with conn.step("read the storage primary key's name"):
        name = bytes(conn.esys.tr_get_name(handle))
    return handle, name


def _encrypt_session(conn: Connection, primary: Any, *, decrypt: bool, encrypt: bool) -> Any:
    """An HMAC session salted to the primary that encrypts the first command
    parameter (``decrypt``) and/or the first response parameter (``encrypt``)."""
    lib = conn.lib
    with conn.step("start an encrypted session"):
        session = conn.track(
            conn.esys.start_auth_session(
                primary, lib.ESYS_TR.NONE, lib.TPM2_SE.HMAC, _aes_cfb(lib), lib.TPM2_ALG.SHA256
            )
        )
        attrs = lib.TPMA_SESSION.CONTINUESESSION
        if decrypt:
            attrs |= lib.TPMA_SESSION.DECRYPT
        if encrypt:
            attrs |= lib.TPMA_SESSION.ENCRYPT
        conn.esys.trsess_set_attributes(session, attrs)
    return session


def read_pcrs(conn: Connection, bank: str, pcrs: tuple[int, ...]) -> tuple[bytes, ...]:
    """Current values of ``pcrs`` in ``bank`` (a TPM returns at most 8 per read)."""
    lib = conn.lib
    size = PCR_BANKS[bank][1]
    values: dict[int, bytes] = {}
    remaining = list(pcrs)
    while remaining:
        with conn.step(f"read PCRs {remaining} ({bank})"):
            _, sel_out, digests = conn.esys.pcr_read(_selection(lib, bank, tuple(remaining)))
        got: list[int] = []
        for sel in sel_out.pcrSelections[: sel_out.count]:
            bitmap = bytes(sel.pcrSelect)[: sel.sizeofSelect]
            got.extend(p for p in remaining if p // 8 < len(bitmap) and bitmap[p // 8] >> p % 8 & 1)
        got.sort()
        digest_list = [bytes(d) for d in digests]
        if not got or len(got) != len(digest_list):
            raise TpmCommandFailed(
                f"the TPM returned no values for PCRs {remaining} in the {bank} bank",
                hint="that PCR bank is probably not allocated on this TPM; set "
                "[providers.tpm] pcr_bank to an allocated bank (usually sha256)",
            )
        for p, v in zip(got, digest_list, strict=True):
            if len(v) != size:
                raise TpmCommandFailed(f"the TPM returned a {len(v)}-byte value for PCR {p}")
            values[p] = v
        remaining = [p for p in remaining if p not in values]
    return tuple(values[p] for p in pcrs)


def _trial_policy(
    conn: Connection, bank: str, pcrs: tuple[int, ...], values: tuple[bytes, ...]
) -> bytes:
    """Have the TPM compute the PolicyPCR digest for exactly these values."""
    lib = conn.lib
    with conn.step("build the PCR policy"):
        trial = conn.track(
            conn.esys.start_auth_session(
                lib.ESYS_TR.NONE,
                lib.ESYS_TR.NONE,
                lib.TPM2_SE.TRIAL,
                lib.TPMT_SYM_DEF(algorithm=lib.TPM2_ALG.NULL),
                lib.TPM2_ALG.SHA256,
            )
        )
        conn.esys.policy_pcr(
            trial, lib.TPM2B_DIGEST(pcr_values_digest(values)), _selection(lib, bank, pcrs)
        )
        digest = bytes(conn.esys.policy_get_digest(trial))
    conn.flush(trial)
    return digest


def _sensitive(lib: Any, secret: SecretBytes) -> Any:
    """A TPM2B_SENSITIVE_CREATE holding the secret, copied into C memory directly."""
    sens = lib.TPM2B_SENSITIVE_CREATE()
    data = sens._cdata.sensitive.data
    n = len(secret)
    tss_ffi = connection.ffi()
    tss_ffi.memmove(data.buffer, tss_ffi.from_buffer(secret.buffer), n)
    data.size = n
    return sens


def _wipe_tpm2b(tpm2b_cdata: Any) -> None:
    n = int(tpm2b_cdata.size)
    if n:
        connection.ffi().memmove(tpm2b_cdata.buffer, bytes(n), n)
    tpm2b_cdata.size = 0


def seal(settings: TpmSettings, secret: SecretBytes) -> bytes:
    """Seal ``secret`` (1..128 bytes) to the TPM; returns the opaque blob (JSON bytes).

    With ``settings.pcrs`` the blob opens only while those PCRs hold the values
    they hold now. Nothing secret is in the blob: only this TPM can load it.
    """
    if not 0 < len(secret) <= MAX_SECRET:
        raise TpmCommandFailed(f"a sealed secret must be 1..{MAX_SECRET} bytes")

    def op(conn: Connection) -> SealedBlob:
        lib = conn.lib
        primary, name = _create_primary(conn)
        values: tuple[bytes, ...] = ()
        policy = b""
        attributes = SEALED_ATTRIBUTES
        if settings.pcrs:
            values = read_pcrs(conn, settings.pcr_bank, settings.pcrs)
            policy = _trial_policy(conn, settings.pcr_bank, settings.pcrs, values)
            if policy != policy_pcr_digest(settings.pcr_bank, settings.pcrs, values):
                raise TpmCommandFailed("the TPM computed an unexpected PCR policy digest")
        else:
            attributes |= _USERWITHAUTH
        template = lib.TPMT_PUBLIC(
            type=lib.TPM2_ALG.KEYEDHASH,
            nameAlg=lib.TPM2_ALG.SHA256,
            objectAttributes=attributes,
            authPolicy=lib.TPM2B_DIGEST(policy),
        )
        template.parameters.keyedHashDetail.scheme.scheme = lib.TPM2_ALG.NULL
        session = _encrypt_session(conn, primary, decrypt=True, encrypt=False)
        sens = _sensitive(lib, secret)
        try:
            with conn.step("seal the secret"):
                private, public, *_ = conn.esys.create(
                    primary,
                    sens,
                    lib.TPM2B_PUBLIC(publicArea=template),
                    session1=lib.ESYS_TR.PASSWORD,
                    session2=session,
                )
        finally:
            _wipe_tpm2b(sens._cdata.sensitive.data)
        conn.flush(session)
        conn.flush(primary)
        return SealedBlob(
            primary_template=PRIMARY_TEMPLATE,
            primary_name=name,
            pcr_bank=settings.pcr_bank,
            pcrs=settings.pcrs,
            pcr_values=values,
            policy_digest=policy,
            public=public.marshal(),
            private=private.marshal(),
            sealed_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        )

    return connection.run(settings, "sealing", op).to_json()


def _parse_objects(lib: Any, blob: SealedBlob) -> tuple[Any, Any]:
    """Unmarshal the blob's TPM2B_PUBLIC/TPM2B_PRIVATE and check the public area
    is a sealed data object with the policy the blob records."""
    try:
        public, used = lib.TPM2B_PUBLIC.unmarshal(blob.public)
        private, used_priv = lib.TPM2B_PRIVATE.unmarshal(blob.private)
    except Exception as exc:  # TSS2_Exception from the MU layer
        raise connection.translate(exc, "parse the sealed blob", "") from None
    if used != len(blob.public) or used_priv != len(blob.private):
        raise TpmBlobInvalid("the sealed blob's TPM objects have trailing bytes (edited)")
    # The MU layer tolerates some framing it then ignores (a TPM2B size field it
    # re-derives): insist the bytes are exactly what these objects marshal to.
    if bytes(public.marshal()) != blob.public or bytes(private.marshal()) != blob.private:
        raise TpmBlobInvalid("the sealed blob's TPM objects are not in canonical form (edited)")
    area = public.publicArea
    attrs = int(area.objectAttributes)
    want_user = 0 if blob.pcrs else _USERWITHAUTH
    if (
        int(area.type) != _ALG_KEYEDHASH
        or int(area.nameAlg) != _ALG_SHA256
        or attrs & (SEALED_ATTRIBUTES | _USERWITHAUTH) != SEALED_ATTRIBUTES | want_user
        or attrs & _SENSITIVEDATAORIGIN
        or bytes(area.authPolicy) != blob.policy_digest
    ):
        raise TpmBlobInvalid(
            "the sealed blob's public area is not the sealed object anyhsm creates, or does "
            "not carry the recorded policy (edited)"
        )
    return public, private


def _secret_from(lib: Any, data: Any) -> SecretBytes:
    """Copy a TPM2B_SENSITIVE_DATA into a SecretBytes and wipe the C buffer."""
    cdata = data._cdata
    n = int(cdata.size)
    out = SecretBytes(connection.ffi().buffer(cdata.buffer, n))
    _wipe_tpm2b(cdata)
    return out


def unseal(settings: TpmSettings, blob: bytes) -> SecretBytes:
    """Unseal a blob made by :func:`seal` on this TPM. Typed failures:

    TpmBlobInvalid (damaged/edited), TpmForeignBlob (another TPM or a cleared
    one), TpmPolicyMismatch (PCRs changed), ProviderUnavailable/ProviderTimeout
    (TPM unreachable or silent), TpmLockout, TpmCommandFailed.
    """
    sealed = SealedBlob.from_json(blob)
    if sealed.primary_template != PRIMARY_TEMPLATE:
        raise TpmBlobInvalid(
            f"the sealed blob uses primary template {sealed.primary_template!r}, "
            "unknown to this anyhsm",
            hint="upgrade anyhsm, or open with the recovery passphrase and enroll again",
        )
    lib = connection.pytss()
    public, private = _parse_objects(lib, sealed)

    def op(conn: Connection) -> SecretBytes:
        primary, name = _create_primary(conn)
        if name != sealed.primary_name:
            raise TpmForeignBlob(
                "the master key was sealed by another TPM, or this TPM was cleared since "
                "(its storage primary key differs)",
                hint=RECOVERY_HINT,
            )
        if sealed.pcrs:
            now = read_pcrs(conn, sealed.pcr_bank, sealed.pcrs)
            changed = tuple(
                p for p, a, b in zip(sealed.pcrs, sealed.pcr_values, now, strict=True) if a != b
            )
            if changed:
                listed = ", ".join(str(p) for p in changed)
                raise TpmPolicyMismatch(
                    f"PCR {listed} ({sealed.pcr_bank}) changed since the master key was sealed "
                    "(firmware, Secure Boot or boot loader update?); the TPM will not unseal it",
                    changed_pcrs=changed,
                )
        with conn.step("load the sealed master key"):
            item = conn.track(conn.esys.load(primary, private, public))
        encsession = _encrypt_session(conn, primary, decrypt=False, encrypt=True)
        auth = lib.ESYS_TR.PASSWORD
        if sealed.pcrs:
            with conn.step("satisfy the PCR policy"):
                auth = conn.track(
                    conn.esys.start_auth_session(
                        lib.ESYS_TR.NONE,
                        lib.ESYS_TR.NONE,
                        lib.TPM2_SE.POLICY,
                        lib.TPMT_SYM_DEF(algorithm=lib.TPM2_ALG.NULL),
                        lib.TPM2_ALG.SHA256,
                    )
                )
                # An empty pcrDigest makes the TPM use the PCRs' current values.
                conn.esys.policy_pcr(
                    auth, lib.TPM2B_DIGEST(), _selection(lib, sealed.pcr_bank, sealed.pcrs)
                )
        conn.flush(primary)
        with conn.step("unseal the master key"):
            data = conn.esys.unseal(item, session1=auth, session2=encsession)
        try:
            return _secret_from(lib, data)
        finally:
            conn.flush(item)

    return connection.run(settings, "unsealing", op, discard=lambda s: s.wipe())


SIDE_FILE = "tpm-sealed.json"
NOT_ENROLLED_HINT = (
    "run 'anyhsm tpm enroll' (it needs the passphrase once), or open the keystore with the "
    "passphrase"
)


def not_enrolled(keystore: Keystore) -> TpmNotEnrolled:
    """The error for a keystore without a TPM-sealed master key."""
    return TpmNotEnrolled(
        f"TPM not enrolled: run anyhsm tpm enroll (no {SIDE_FILE} in {keystore.path})",
        hint=NOT_ENROLLED_HINT,
    )


class TpmSealer:
    """The keystore's master key sealed to this TPM: the TPM's
    :class:`~anyhsm.unlock_blobs.MasterKeySealer`."""

    name = "tpm"
    device = "the TPM"
    blob_file = SIDE_FILE
    level = SecurityLevel.TPM

    def __init__(self, settings: TpmSettings) -> None:
        self.settings = settings

    def seal(self, master: SecretBytes) -> bytes:
        return seal(self.settings, master)

    def unseal(self, blob: bytes) -> SecretBytes:
        return unseal(self.settings, blob)

    def not_enrolled(self, keystore: Keystore) -> HsmError:
        return not_enrolled(keystore)

    def blob_facts(self, blob: bytes) -> dict[str, object]:
        parsed = SealedBlob.from_json(blob)
        return {
            "pcrs": list(parsed.pcrs),
            "pcr_bank": parsed.pcr_bank,
            "policy_digest": parsed.policy_digest.hex(),
            "primary_template": parsed.primary_template,
            "primary_name": parsed.primary_name.hex(),
            "sealed_at": parsed.sealed_at,
            "no_da": True,
        }

    def device_health(self) -> tuple[dict[str, object], str]:
        from anyhsm.tpm.device import tpm_info

        s = self.settings
        details: dict[str, object] = {
            "tcti": s.tcti,
            "pcrs": ",".join(str(p) for p in s.pcrs) or "none",
            "pcr_bank": s.pcr_bank,
            "tpm_rng": "mixed into new keys" if s.use_rng else "not used",
        }
        try:
            info = tpm_info(s)
        except HsmError as exc:
            details["tpm_reachable"] = "no"
            return details, f"TPM unreachable: {exc.message}"
        details["tpm_reachable"] = "yes"
        details["tpm_manufacturer"] = info["manufacturer"]
        details["tpm_vendor"] = info["vendor"]
        details["tpm_firmware"] = info["firmware_version"]
        details["tpm_in_lockout"] = info["in_lockout"]
        return details, ""

    def failure_facts(self, error: HsmError) -> dict[str, object]:
        if isinstance(error, TpmPolicyMismatch):
            return {"changed_pcrs": list(error.changed_pcrs)}
        return {}
