"""The sealed-blob format and the offline PCR policy computation (no TPM needed)."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from anyhsm.tpm import SealedBlob, TpmBlobInvalid
from anyhsm.tpm.policy import pcr_selection, policy_pcr_digest

# Computed by swtpm 0.7.1 (TPM2_PolicyPCR in a trial session, then PolicyGetDigest)
# for PCR 7 of the sha256 bank holding 32 zero bytes: an independent reference.
SWTPM_POLICY_PCR7_ZERO = "8b5682d81b29435d08d79278150611dc7e5923b2fefcce684a09577b40130a8b"


def test_policy_digest_matches_the_tpm() -> None:
    assert policy_pcr_digest("sha256", (7,), (bytes(32),)).hex() == SWTPM_POLICY_PCR7_ZERO
    # marshalled TPML_PCR_SELECTION as tpm2-pytss produces it for "sha256:7"
    assert pcr_selection("sha256", (7,)).hex() == "00000001000b03800000"
    assert pcr_selection("sha1", (0, 16, 23)).hex() == "000000010004030100" + "81"


def _blob(pcrs: tuple[int, ...] = (7,)) -> SealedBlob:
    values = tuple(bytes([p]) * 32 for p in pcrs)
    return SealedBlob(
        primary_template="tcg-srk-ecc-p256-aes128cfb",
        primary_name=b"\x00\x0b" + bytes(range(32)),
        pcr_bank="sha256",
        pcrs=pcrs,
        pcr_values=values,
        policy_digest=policy_pcr_digest("sha256", pcrs, values) if pcrs else b"",
        public=b"\x00\x2e" + bytes(46),
        private=b"\x00\x10" + bytes(16),
        sealed_at="2026-01-01T00:00:00+00:00",
    )


@pytest.mark.parametrize("pcrs", [(), (7,), (0, 2, 4, 7, 16)])
def test_round_trip(pcrs: tuple[int, ...]) -> None:
    blob = _blob(pcrs)
    assert SealedBlob.from_json(blob.to_json()) == blob


def _edit(field: str, value: object) -> bytes:
    d = json.loads(_blob().to_json())
    d[field] = value
    return json.dumps(d).encode()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("format", "something-else"),
        ("version", 2),
        ("version", True),
        ("pcrs", [8]),  # selection edited: no longer matches the policy digest
        ("pcrs", [7, 7]),
        ("pcrs", "7"),
        ("pcr_values", {"7": "00" * 32}),  # values edited
        ("pcr_values", {"7": "00" * 31}),
        ("pcr_bank", "sha1"),
        ("pcr_bank", "md5"),
        ("policy_digest", "00" * 32),
        ("policy_digest", ""),
        ("public", ""),
        ("public", "zz"),
        ("private", "ABCD"),  # upper-case hex is not what anyhsm writes
        ("primary_name", "00"),
        ("primary_template", ""),
        ("primary_template", 5),
    ],
)
def test_edited_fields_are_refused(field: str, value: object) -> None:
    with pytest.raises(TpmBlobInvalid):
        SealedBlob.from_json(_edit(field, value))


@pytest.mark.parametrize("raw", [b"", b"{", b"[]", b"null", b"\xff\xfe", b'{"format": 1}'])
def test_garbage_is_refused(raw: bytes) -> None:
    with pytest.raises(TpmBlobInvalid):
        SealedBlob.from_json(raw)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_fuzz_bytes(raw: bytes) -> None:
    with contextlib.suppress(TpmBlobInvalid):
        SealedBlob.from_json(raw)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_fuzz_mutated_blob(data: st.DataObject) -> None:
    raw = bytearray(_blob((0, 7)).to_json())
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    try:
        parsed = SealedBlob.from_json(bytes(raw))
    except TpmBlobInvalid:
        return
    # A mutation that still parses must be self-consistent (policy matches PCR data).
    assert parsed.expected_policy() == parsed.policy_digest
