"""The one translation table from TSS return codes to anyhsm errors, fed real
tpm2-pytss exceptions, and the noDA decision checked on a real TPM."""

from __future__ import annotations

import pytest
from tests.support.swtpm import Swtpm

from anyhsm.errors import HsmError, ProviderUnavailable
from anyhsm.secret import SecretBytes
from anyhsm.tpm import (
    SealedBlob,
    TpmBlobInvalid,
    TpmCommandFailed,
    TpmLockout,
    TpmPolicyMismatch,
    TpmSettings,
    seal,
    tpm_info,
    unseal,
)
from anyhsm.tpm.connection import pytss, translate

pytestmark = pytest.mark.tpm


@pytest.mark.parametrize(
    ("rc", "step", "expected", "words"),
    [
        (0x000A000A, "connect", ProviderUnavailable, "not reachable"),  # TCTI I/O error
        (0x00070008, "unseal", ProviderUnavailable, "not reachable"),  # ESYS no connection
        (0x0000099D, "unseal the master key", TpmPolicyMismatch, "PCRs"),  # session 1 policy
        (0x00000167, "unseal the master key", TpmPolicyMismatch, "PCRs"),  # PCR_CHANGED
        (0x00000921, "unseal the master key", TpmLockout, "lockout"),
        (0x00000902, "load the sealed master key", ProviderUnavailable, "no room"),
        (0x00000922, "seal the secret", ProviderUnavailable, "busy"),
        (0x00000100, "create the storage primary key", ProviderUnavailable, "not been started"),
        (0x00000101, "seal the secret", ProviderUnavailable, "failure mode"),
        (0x000001DF, "load the sealed master key", TpmBlobInvalid, "refused to load"),
        (0x000002D5, "load the sealed master key", TpmBlobInvalid, "refused to load"),
        (0x000009A2, "create the storage primary key", ProviderUnavailable, "owner hierarchy"),
        (0x0000009F, "seal the secret", TpmBlobInvalid, "integrity"),
        (0x000001C4, "seal the secret", TpmCommandFailed, "seal the secret"),
        (0x00090008, "parse the sealed blob", TpmBlobInvalid, "do not parse"),
        (0x00060001, "seal the secret", TpmCommandFailed, "software stack"),
    ],
)
def test_translation_table(rc: int, step: str, expected: type[HsmError], words: str) -> None:
    exc = pytss().TSS2_Exception(rc)
    err = translate(exc, step, "swtpm:host=127.0.0.1,port=9")
    assert type(err) is expected
    assert words in err.message
    if expected not in (TpmPolicyMismatch, TpmLockout):
        assert f"0x{rc:x}" in err.message


def test_non_tss_exception_is_typed() -> None:
    err = translate(ValueError("boom"), "seal the secret", "x")
    assert isinstance(err, TpmCommandFailed)


def _lockout_counter(tcti: str) -> str:
    return tpm_info(TpmSettings(tcti=tcti))["lockout_counter"]


def test_no_da_wrong_passwords_never_lock_the_tpm(private_swtpm: Swtpm) -> None:
    """The sealed object is noDA: wrong passwords sent for it (here 10; the TPM locks
    out after 3) neither count nor lock the TPM; and when other software does lock the
    TPM out, the master key still unseals (see docs/tpm.md, "noDA")."""
    lib = pytss()
    s = TpmSettings(tcti=private_swtpm.tcti)
    secret = SecretBytes(b"\x42" * 32)
    blob = SealedBlob.from_json(seal(s, secret))
    assert _lockout_counter(private_swtpm.tcti) == "0/3"
    public, _ = lib.TPM2B_PUBLIC.unmarshal(blob.public)
    private, _ = lib.TPM2B_PRIVATE.unmarshal(blob.private)
    assert int(public.publicArea.objectAttributes) & lib.TPMA_OBJECT.NODA

    from anyhsm.tpm.sealing import _primary_template

    with lib.ESAPI(private_swtpm.tcti) as esys:
        primary, *_ = esys.create_primary(None, _primary_template(lib), lib.ESYS_TR.OWNER)
        item = esys.load(primary, private, public)
        esys.flush_context(primary)
        esys.tr_set_auth(item, b"wrong password")
        for _ in range(10):
            with pytest.raises(lib.TSS2_Exception) as info:
                esys.unseal(item)
            assert info.value.error in (0x8E, 0xA2)  # AUTH_FAIL / BAD_AUTH, never LOCKOUT
        esys.flush_context(item)

    info_now = tpm_info(s)
    assert info_now["in_lockout"] == "no"
    assert info_now["lockout_counter"] == "0/3"

    # Contrast: a DA-protected object (noDA clear) with a PIN locks the TPM out after 3.
    with lib.ESAPI(private_swtpm.tcti) as esys:
        primary, *_ = esys.create_primary(None, _primary_template(lib), lib.ESYS_TR.OWNER)
        tmpl = lib.TPMT_PUBLIC(
            type=lib.TPM2_ALG.KEYEDHASH,
            nameAlg=lib.TPM2_ALG.SHA256,
            objectAttributes=lib.TPMA_OBJECT.FIXEDTPM
            | lib.TPMA_OBJECT.FIXEDPARENT
            | lib.TPMA_OBJECT.USERWITHAUTH,
        )
        tmpl.parameters.keyedHashDetail.scheme.scheme = lib.TPM2_ALG.NULL
        sens = lib.TPM2B_SENSITIVE_CREATE(
            sensitive=lib.TPMS_SENSITIVE_CREATE(
                userAuth=lib.TPM2B_AUTH(b"1234"), data=lib.TPM2B_SENSITIVE_DATA(b"x")
            )
        )
        priv, pub, *_ = esys.create(primary, sens, lib.TPM2B_PUBLIC(publicArea=tmpl))
        other = esys.load(primary, priv, pub)
        esys.flush_context(primary)
        esys.tr_set_auth(other, b"0000")
        for _ in range(3):
            with pytest.raises(lib.TSS2_Exception):
                esys.unseal(other)
        esys.flush_context(other)
    assert tpm_info(s)["in_lockout"] == "yes"

    # ...and even with the TPM locked out by someone else, the noDA master key unseals.
    with unseal(s, blob.to_json()) as back:
        assert back.equals(secret)
