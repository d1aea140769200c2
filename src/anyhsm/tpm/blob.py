"""The sealed-blob file format (``tpm-sealed.json`` beside the keystore).

JSON with hex fields. Nothing in it is secret: the private part is encrypted
by the TPM under its storage primary key and only that TPM can load it. The
parser is strict (fuzzed in tests): any malformed field is TpmBlobInvalid.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from anyhsm.tpm.errors import TpmBlobInvalid
from anyhsm.tpm.policy import policy_pcr_digest
from anyhsm.tpm.settings import PCR_BANKS, PCR_COUNT

FORMAT = "anyhsm-tpm-sealed"
VERSION = 1
MAX_TPM2B = 2048  # far above any sealed object's public or private area
_HEX = re.compile(r"^(?:[0-9a-f]{2})*$")
_BLOB_HINT = (
    "the file tpm-sealed.json beside the keystore is damaged; open the keystore with the "
    "recovery passphrase and run 'anyhsm tpm enroll' again"
)


@dataclass(frozen=True)
class SealedBlob:
    """A master key sealed under a TPM storage primary, optionally bound to PCRs."""

    primary_template: str  # which primary key template re-creates the parent
    primary_name: bytes  # that primary's TPM name, to recognise another TPM or a cleared one
    pcr_bank: str
    pcrs: tuple[int, ...]
    pcr_values: tuple[bytes, ...]  # the values sealed to, in the order of ``pcrs``
    policy_digest: bytes  # the sealed object's authPolicy (empty without PCRs)
    public: bytes  # marshalled TPM2B_PUBLIC
    private: bytes  # marshalled TPM2B_PRIVATE (encrypted by the TPM)
    sealed_at: str = ""
    version: int = VERSION

    def expected_policy(self) -> bytes:
        """The policy digest the recorded PCR selection and values imply."""
        if not self.pcrs:
            return b""
        return policy_pcr_digest(self.pcr_bank, self.pcrs, self.pcr_values)

    def to_json(self) -> bytes:
        body = {
            "format": FORMAT,
            "version": self.version,
            "primary_template": self.primary_template,
            "primary_name": self.primary_name.hex(),
            "pcr_bank": self.pcr_bank,
            "pcrs": list(self.pcrs),
            "pcr_values": {
                str(p): v.hex() for p, v in zip(self.pcrs, self.pcr_values, strict=True)
            },
            "policy_digest": self.policy_digest.hex(),
            "public": self.public.hex(),
            "private": self.private.hex(),
            "sealed_at": self.sealed_at,
        }
        return json.dumps(body, indent=1, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, raw: bytes) -> SealedBlob:
        """Parse and check a blob file; raises TpmBlobInvalid on anything unexpected."""
        try:
            d = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise TpmBlobInvalid("the sealed blob is not valid JSON", hint=_BLOB_HINT) from None
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise TpmBlobInvalid("the sealed blob is not an anyhsm TPM blob", hint=_BLOB_HINT)
        version = d.get("version")
        if isinstance(version, bool) or not isinstance(version, int) or version != VERSION:
            raise TpmBlobInvalid(
                f"the sealed blob has format version {version!r}; this anyhsm reads {VERSION}",
                hint="upgrade anyhsm, or open with the recovery passphrase and enroll again",
            )
        template = _text(d, "primary_template")
        bank = _text(d, "pcr_bank")
        if bank not in PCR_BANKS:
            raise TpmBlobInvalid(f"the sealed blob names an unknown PCR bank {bank!r}")
        raw_pcrs = d.get("pcrs")
        if not isinstance(raw_pcrs, list) or not all(
            isinstance(p, int) and not isinstance(p, bool) and 0 <= p < PCR_COUNT for p in raw_pcrs
        ):
            raise TpmBlobInvalid("the sealed blob's 'pcrs' is not a list of PCR numbers")
        pcrs = tuple(int(p) for p in raw_pcrs)
        if list(pcrs) != sorted(set(pcrs)):
            raise TpmBlobInvalid("the sealed blob's 'pcrs' is not ascending and distinct")
        raw_values = d.get("pcr_values")
        if not isinstance(raw_values, dict) or set(raw_values) != {str(p) for p in pcrs}:
            raise TpmBlobInvalid("the sealed blob's 'pcr_values' does not match its 'pcrs'")
        size = PCR_BANKS[bank][1]
        values = tuple(_hex_value(raw_values[str(p)], f"pcr_values[{p}]", size) for p in pcrs)
        policy = _hex(d, "policy_digest")
        if len(policy) not in ((32,) if pcrs else (0,)):
            raise TpmBlobInvalid("the sealed blob's policy digest has the wrong length")
        blob = cls(
            primary_template=template,
            primary_name=_hex(d, "primary_name"),
            pcr_bank=bank,
            pcrs=pcrs,
            pcr_values=values,
            policy_digest=policy,
            public=_hex(d, "public"),
            private=_hex(d, "private"),
            sealed_at=str(d.get("sealed_at", "")),
            version=version,
        )
        if not blob.public or not blob.private or len(blob.primary_name) != 34:
            raise TpmBlobInvalid("the sealed blob lacks its TPM objects", hint=_BLOB_HINT)
        if blob.expected_policy() != blob.policy_digest:
            raise TpmBlobInvalid(
                "the sealed blob's PCR selection or values do not match its policy digest (edited)",
                hint=_BLOB_HINT,
            )
        return blob


def _text(d: dict[str, object], name: str) -> str:
    v = d.get(name)
    if not isinstance(v, str) or not v or len(v) > 64:
        raise TpmBlobInvalid(f"the sealed blob's {name!r} is missing or not a short string")
    return v


def _hex(d: dict[str, object], name: str) -> bytes:
    return _hex_value(d.get(name), name, None)


def _hex_value(v: object, name: str, size: int | None) -> bytes:
    if not isinstance(v, str) or len(v) > 2 * MAX_TPM2B or not _HEX.match(v):
        raise TpmBlobInvalid(f"the sealed blob's {name!r} is missing or not lowercase hex")
    data = bytes.fromhex(v)
    if size is not None and len(data) != size:
        raise TpmBlobInvalid(f"the sealed blob's {name!r} is not {size} bytes")
    return data
