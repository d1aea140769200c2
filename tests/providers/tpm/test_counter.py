"""The TPM NV counter that anchors the keystore's generation, against a real swtpm.

The attacks: put an older keystore back (the counter says it is older), lower the
counter (impossible, even by undefining and redefining it), swap in an ordinary
or orderly NV index at the recorded handle, remove the counter or wipe the TPM
(typed AnchorMissing, never a silent pass), stop or freeze the TPM (typed
unavailable or timeout, never a hang)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest
from tests.providers.tpm.tpmtools import (
    define_nv,
    nv_attributes,
    nv_indices,
    set_owner_password,
    undefine_nv,
)
from tests.support.swtpm import Swtpm

from anyhsm.errors import (
    AnchorMismatch,
    AnchorMissing,
    KeystoreError,
    KeystoreRolledBack,
    ProviderTimeout,
    ProviderUnavailable,
)
from anyhsm.keystore.anchor import GenerationAnchor
from anyhsm.tpm import TpmCounter, TpmSettings, tpm_info
from anyhsm.tpm.counter import (
    ANYHSM_RANGE_FIRST,
    ANYHSM_RANGE_LAST,
    COUNTER_ATTRIBUTES,
    DEFINE_ATTEMPTS,
    MAX_JUMP,
)
from anyhsm.tpm.errors import TpmCommandFailed

pytestmark = pytest.mark.tpm

# TPMA_NV bits used to build foreign indices
OWNERWRITE = 0x2
AUTHWRITE = 0x4
OWNERREAD = 0x20000
AUTHREAD = 0x40000
NO_DA = 0x2000000
ORDERLY = 0x4000000
WRITTEN = 0x20000000
NT_COUNTER = 0x10


@pytest.fixture
def counter(settings: TpmSettings) -> Iterator[TpmCounter]:
    """A fresh counter on the shared swtpm, undefined afterwards."""
    c = TpmCounter.define(settings)
    yield c
    c.undefine()


def _free_index(tcti: str) -> int:
    taken = set(nv_indices(tcti))
    while True:
        index = ANYHSM_RANGE_FIRST + secrets.randbelow(ANYHSM_RANGE_LAST - ANYHSM_RANGE_FIRST)
        if index not in taken:
            return index


def test_errors_are_keystore_errors_with_exit_8() -> None:
    for cls, code in (
        (AnchorMissing, "anchor_missing"),
        (AnchorMismatch, "anchor_mismatch"),
        (KeystoreRolledBack, "keystore_rolled_back"),
    ):
        assert issubclass(cls, KeystoreError)
        assert cls.code == code
        assert cls.exit_code == 8


def test_define_read_increment(counter: TpmCounter, swtpm: Swtpm) -> None:
    assert counter.kind == "tpm-nv-counter"
    ref = counter.ref
    assert ref.startswith("0x01a4") and len(ref) == 10 and ref == ref.lower()
    index = int(ref, 16)
    assert ANYHSM_RANGE_FIRST <= index <= ANYHSM_RANGE_LAST
    # On the TPM: a written counter with exactly the documented attributes, not ORDERLY.
    attrs = nv_attributes(swtpm.tcti, index)
    assert attrs == COUNTER_ATTRIBUTES | WRITTEN
    assert attrs is not None and not attrs & ORDERLY
    assert (attrs >> 4) & 0xF == 1  # TPM_NT_COUNTER

    first = counter.read()
    assert first >= 1  # incremented once by define, so it reads
    assert counter.increment() == first + 1
    assert counter.read() == first + 1
    # Another handle on the same index (what the keystore builds from its manifest).
    again = TpmCounter.at(TpmSettings(tcti=swtpm.tcti), ref)
    assert again.ref == ref
    assert again.read() == first + 1
    again.close()
    counter.close()
    counter.close()  # idempotent


def test_satisfies_the_anchor_protocol(counter: TpmCounter) -> None:
    anchor: GenerationAnchor = counter
    assert anchor.advance_to(anchor.read() + 1) == anchor.read()


def test_advance_to(counter: TpmCounter) -> None:
    now = counter.read()
    assert counter.advance_to(now) == now  # already there: no increment
    assert counter.read() == now
    assert counter.advance_to(now + 7) == now + 7
    assert counter.read() == now + 7


def test_advance_in_several_bounded_rounds(private_swtpm: Swtpm) -> None:
    """An advance longer than one timeout's worth of increments is split into rounds,
    each bounded like every TPM call, and still lands exactly on the target."""
    s = TpmSettings(tcti=private_swtpm.tcti, timeout_s=0.5)
    c = TpmCounter.define(s)
    target = c.read() + 3000
    assert c.advance_to(target) == target
    assert c.read() == target


def test_rollback_is_detected(counter: TpmCounter) -> None:
    """The attack: the keystore directory put back from an older copy names a lower
    generation than the TPM counter holds. Refused, naming both values."""
    old = counter.read()
    counter.advance_to(old + 3)
    with pytest.raises(KeystoreRolledBack) as info:
        counter.advance_to(old)
    err = info.value
    assert f"generation {old}" in err.message
    assert str(old + 3) in err.message
    assert err.store_generation == old
    assert err.anchor_generation == old + 3
    assert err.hint and "recovery" in err.hint
    assert err.exit_code == 8
    assert counter.read() == old + 3  # nothing moved


def test_huge_jump_is_refused(counter: TpmCounter) -> None:
    now = counter.read()
    with pytest.raises(AnchorMismatch) as info:
        counter.advance_to(now + MAX_JUMP + 1)
    assert str(MAX_JUMP) in info.value.message
    with pytest.raises(AnchorMismatch):
        counter.advance_to(now + 3, max_jump=2)
    assert counter.read() == now  # refused before any increment
    for bad in (-1, True, 1 << 64):
        with pytest.raises(AnchorMismatch):
            counter.advance_to(bad)


def test_counter_cannot_be_lowered_by_redefining(private_swtpm: Swtpm) -> None:
    """The attack on the anchor itself: undefine the counter and define it again at
    the same index with the same attributes. The TPM starts a new counter above the
    largest value any counter held, so the rolled-back store is still detected."""
    s = TpmSettings(tcti=private_swtpm.tcti)
    c = TpmCounter.define(s)
    high = c.advance_to(c.read() + 50)
    index = int(c.ref, 16)
    undefine_nv(private_swtpm.tcti, index)
    define_nv(private_swtpm.tcti, index, COUNTER_ATTRIBUTES, 8)
    assert c.read() > high
    with pytest.raises(KeystoreRolledBack):
        c.advance_to(high)


def test_at_validates_ref_without_touching_the_tpm() -> None:
    dead = TpmSettings(tcti="swtpm:host=127.0.0.1,port=9", timeout_s=0.2)
    assert TpmCounter.at(dead, "0x01a4c3f2").ref == "0x01a4c3f2"
    for bad in (
        "0x1a4c3f2",
        "0x01A4C3F2",
        "01a4c3f2xx",
        "0x81000001",
        "0x00000001",
        "",
        "0x01a4c3fg",
    ):
        with pytest.raises(AnchorMismatch):
            TpmCounter.at(dead, bad)


def test_undefined_index_is_anchor_missing(settings: TpmSettings, swtpm: Swtpm) -> None:
    c = TpmCounter.at(settings, f"0x{_free_index(swtpm.tcti):08x}")
    for call in (c.read, c.increment, lambda: c.advance_to(5)):
        with pytest.raises(AnchorMissing) as info:
            call()
        assert c.ref in info.value.message
        assert info.value.exit_code == 8
    c.undefine()  # nothing there: no error


def test_undefine_is_idempotent(settings: TpmSettings, swtpm: Swtpm) -> None:
    c = TpmCounter.define(settings)
    index = int(c.ref, 16)
    c.undefine()
    assert nv_attributes(swtpm.tcti, index) is None
    c.undefine()
    with pytest.raises(AnchorMissing):
        c.read()


@pytest.mark.parametrize(
    ("attributes", "data", "words"),
    [
        (OWNERWRITE | OWNERREAD | AUTHREAD | NO_DA, b"\x00" * 7 + b"\x09", "not a counter"),
        (COUNTER_ATTRIBUTES | ORDERLY, None, "ORDERLY"),
        (COUNTER_ATTRIBUTES | AUTHWRITE, None, "attributes"),
        (NT_COUNTER | OWNERWRITE | OWNERREAD | AUTHREAD, None, "attributes"),  # DA on
    ],
    ids=["ordinary", "orderly-counter", "authwrite-counter", "da-counter"],
)
def test_foreign_index_is_anchor_mismatch(
    settings: TpmSettings, swtpm: Swtpm, attributes: int, data: bytes | None, words: str
) -> None:
    """Another NV index at the recorded handle (defined by someone else on the host,
    or planted): never read as the anchor, and never undefined by anyhsm."""
    index = _free_index(swtpm.tcti)
    define_nv(swtpm.tcti, index, attributes, 8, data=data)
    try:
        c = TpmCounter.at(settings, f"0x{index:08x}")
        for call in (c.read, c.increment, lambda: c.advance_to(10), c.undefine):
            with pytest.raises(AnchorMismatch) as info:
                call()
            assert words in info.value.message
        assert nv_attributes(swtpm.tcti, index) is not None  # not removed
    finally:
        undefine_nv(swtpm.tcti, index)


def test_unwritten_counter_is_anchor_mismatch(settings: TpmSettings, swtpm: Swtpm) -> None:
    """Our attributes but never incremented: not a counter anyhsm defined (define
    increments before it returns)."""
    from tpm2_pytss import ESAPI, ESYS_TR, TPM2_ALG, TPM2B_NV_PUBLIC, TPMS_NV_PUBLIC

    index = _free_index(swtpm.tcti)
    public = TPM2B_NV_PUBLIC(
        nvPublic=TPMS_NV_PUBLIC(
            nvIndex=index, nameAlg=TPM2_ALG.SHA256, attributes=COUNTER_ATTRIBUTES, dataSize=8
        )
    )
    with ESAPI(swtpm.tcti) as esys:
        esys.nv_define_space(None, public, auth_handle=ESYS_TR.OWNER)
    try:
        with pytest.raises(AnchorMismatch) as info:
            TpmCounter.at(settings, f"0x{index:08x}").read()
        assert "never incremented" in info.value.message
    finally:
        undefine_nv(swtpm.tcti, index)


def test_define_retries_a_taken_index(
    settings: TpmSettings, swtpm: Swtpm, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault injection: the random choice first hits an index in use (TPM_RC_NV_DEFINED)."""
    taken = TpmCounter.define(settings)
    offsets = iter([int(taken.ref, 16) - ANYHSM_RANGE_FIRST, 17])
    monkeypatch.setattr(
        "anyhsm.tpm.counter.secrets.randbelow", lambda n: next(offsets, 0) if n else 0
    )
    try:
        fresh = TpmCounter.define(settings)
        assert fresh.ref == f"0x{ANYHSM_RANGE_FIRST + 17:08x}"
        assert fresh.read() >= 1
        fresh.undefine()
    finally:
        taken.undefine()


def test_define_gives_up_when_every_try_is_taken(
    settings: TpmSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    taken = TpmCounter.define(settings)
    calls: list[int] = []

    def same(n: int) -> int:
        calls.append(n)
        return int(taken.ref, 16) - ANYHSM_RANGE_FIRST

    monkeypatch.setattr("anyhsm.tpm.counter.secrets.randbelow", same)
    try:
        with pytest.raises(TpmCommandFailed) as info:
            TpmCounter.define(settings)
        assert "no free NV index" in info.value.message
        assert len(calls) == DEFINE_ATTEMPTS
    finally:
        taken.undefine()


def test_stopped_tpm_is_unavailable(private_swtpm: Swtpm) -> None:
    s = TpmSettings(tcti=private_swtpm.tcti, timeout_s=2.0)
    c = TpmCounter.define(s)
    value = c.read()
    private_swtpm.stop()
    for call in (c.read, c.increment, lambda: c.advance_to(value + 1), c.undefine):
        with pytest.raises(ProviderUnavailable) as info:
            call()
        assert "not reachable" in info.value.message
    with pytest.raises(ProviderUnavailable):
        TpmCounter.define(s)
    private_swtpm.start()
    assert c.read() == value


def test_paused_tpm_times_out_then_recovers(private_swtpm: Swtpm) -> None:
    """A TPM that accepts but never answers: ProviderTimeout, never a hang."""
    s = TpmSettings(tcti=private_swtpm.tcti, timeout_s=0.3)
    c = TpmCounter.define(s)
    value = c.read()
    private_swtpm.pause()
    try:
        with pytest.raises(ProviderTimeout):
            c.read()
        with pytest.raises(ProviderTimeout):  # the first worker still holds the TPM
            c.advance_to(value + 1)
    finally:
        private_swtpm.resume()
    assert TpmCounter.at(TpmSettings(tcti=private_swtpm.tcti, timeout_s=5.0), c.ref).read() == value


def test_value_survives_a_tpm_restart(private_swtpm: Swtpm) -> None:
    """Non-orderly: the value is in NV after every increment, so a TPM restart (here
    the process killed between increments, as a power cut) keeps it exactly."""
    s = TpmSettings(tcti=private_swtpm.tcti)
    c = TpmCounter.define(s)
    value = c.advance_to(c.read() + 5)
    private_swtpm.stop()
    private_swtpm.start()
    assert c.read() == value
    assert c.increment() == value + 1


def test_wiped_tpm_is_anchor_missing(private_swtpm: Swtpm) -> None:
    """A TPM whose state was wiped (cleared, replaced): the anchor is gone, typed."""
    s = TpmSettings(tcti=private_swtpm.tcti)
    c = TpmCounter.define(s)
    c.advance_to(c.read() + 2)
    private_swtpm.wipe()
    with pytest.raises(AnchorMissing):
        c.read()
    with pytest.raises(AnchorMissing):
        c.advance_to(10)


def test_owner_password_blocks_increments_not_reads(private_swtpm: Swtpm) -> None:
    """OWNERWRITE: once the owner has a password, nobody without it can push the
    counter ahead (anyhsm uses the empty owner authorisation, as for sealing);
    AUTHREAD: the value still reads."""
    s = TpmSettings(tcti=private_swtpm.tcti)
    c = TpmCounter.define(s)
    value = c.read()
    set_owner_password(private_swtpm.tcti, b"owner secret")
    with pytest.raises(ProviderUnavailable) as info:
        c.increment()
    assert "owner" in info.value.message
    assert "owner secret" not in str(info.value)
    assert c.read() == value


def test_wrong_index_passwords_never_lock_the_tpm(private_swtpm: Swtpm) -> None:
    """NO_DA: wrong passwords sent for the counter (10; the TPM locks out after 3)
    neither count nor lock the TPM, so nobody can lock the keystore out this way."""
    from tpm2_pytss import ESAPI, TSS2_Exception

    s = TpmSettings(tcti=private_swtpm.tcti)
    c = TpmCounter.define(s)
    with ESAPI(private_swtpm.tcti) as esys:
        handle = esys.tr_from_tpmpublic(int(c.ref, 16))
        esys.tr_set_auth(handle, b"wrong")
        for _ in range(10):
            with pytest.raises(TSS2_Exception):
                esys.nv_read(handle, 8, auth_handle=handle)
    info = tpm_info(s)
    assert info["in_lockout"] == "no"
    assert info["lockout_counter"] == "0/3"
    assert c.read() >= 1


def test_tpm_clear_removes_it_and_never_lowers_it(private_swtpm: Swtpm) -> None:
    """TPM2_Clear (possible with the default empty lockout authorisation) deletes the
    counter: AnchorMissing. A counter defined again at the same index after the clear
    starts above the old value, so an older store is still detected."""
    from tpm2_pytss import ESAPI, ESYS_TR

    s = TpmSettings(tcti=private_swtpm.tcti)
    c = TpmCounter.define(s)
    high = c.advance_to(c.read() + 20)
    with ESAPI(private_swtpm.tcti) as esys:
        esys.clear(ESYS_TR.RH_LOCKOUT)
    with pytest.raises(AnchorMissing):
        c.read()
    define_nv(private_swtpm.tcti, int(c.ref, 16), COUNTER_ATTRIBUTES, 8)
    assert c.read() > high
    with pytest.raises(KeystoreRolledBack):
        c.advance_to(high)


def test_redefined_with_a_password_is_anchor_mismatch(settings: TpmSettings, swtpm: Swtpm) -> None:
    """Our attributes, but an authValue anyhsm never sets (someone redefined the index):
    not our counter, and reading it never counts towards a lockout (NO_DA)."""
    index = _free_index(swtpm.tcti)
    define_nv(swtpm.tcti, index, COUNTER_ATTRIBUTES, 8, auth=b"planted")
    try:
        with pytest.raises(AnchorMismatch) as info:
            TpmCounter.at(settings, f"0x{index:08x}").read()
        assert "authorisation value" in info.value.message
    finally:
        undefine_nv(swtpm.tcti, index)
