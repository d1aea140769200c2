"""A TPM 2.0 NV monotonic counter that anchors the keystore's generation.

Every file of the keystore can be put back from an earlier copy, and no file
inside the directory can prove it is the newest. A TPM NV counter can: it only
ever grows, it lives outside the directory, and not even deleting and
re-creating it lowers it (a counter index is initialised, on its first
increment, to the largest value any counter on this TPM has ever held). The
keystore keeps its generation equal to the counter (see
:class:`anyhsm.keystore.anchor.GenerationAnchor`), so a keystore whose
generation is below the counter was rolled back, whatever its files say.

Index: a random handle in ``0x01a40000..0x01a4ffff``, a sub-range anyhsm
takes (by convention, as the TCG registry intends) inside the owner range
``0x01800000..0x01bfffff`` and away from the ranges of systemd
(``0x01800400..0x018005ff``) and the EK certificates (``0x01c0xxxx``). Random,
so that two keystores on one TPM do not collide; a taken index is retried.

Attributes (exactly these, checked on every use, see :data:`COUNTER_ATTRIBUTES`):

- ``TPM_NT_COUNTER``: the TPM itself refuses anything but +1, so neither we nor
  anyone else can lower or set it.
- ``OWNERWRITE`` (not ``AUTHWRITE``): increments need the owner hierarchy's
  authorisation, as enrolment does (anyhsm uses it empty, like the storage key).
  If an owner password is ever set, nobody without it can push the counter
  ahead of the store (which would only make the store look rolled back).
- ``OWNERREAD | AUTHREAD``: the value is not secret; reading it with the
  index's own empty authorisation works even where the owner has a password.
- ``NO_DA``: the index authorisation is empty and public, so dictionary-attack
  counting protects nothing, and without it anyone could lock the TPM out by
  sending wrong passwords for this index (the same reasoning as the sealed key
  in sealing.py).
- NOT ``ORDERLY``: an orderly counter lives in TPM RAM and is written to NV only
  every few increments; after a non-orderly shutdown (a power cut, a crash
  without TPM2_Shutdown) the TPM restores it *jumped forward* by that interval to
  stay monotonic. The counter would then be above the keystore's generation,
  which is exactly what a rolled-back keystore looks like: every power cut
  would lock the store. A non-orderly counter writes NV on every increment;
  that is affordable because the keystore advances it only when its key set,
  master key or audit recovery changes, never per signature (docs/tpm.md, wear).

Every TPM call runs through :func:`anyhsm.tpm.connection.run`, on a fresh
connection, bounded by ``settings.timeout_s`` like every other TPM call.
"""

from __future__ import annotations

import contextlib
import functools
import secrets
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from anyhsm.errors import (
    AnchorMismatch,
    AnchorMissing,
    HsmError,
    KeystoreRolledBack,
    ProviderUnavailable,
)
from anyhsm.tpm import connection
from anyhsm.tpm.connection import Connection
from anyhsm.tpm.errors import TpmCommandFailed
from anyhsm.tpm.settings import TpmSettings

if TYPE_CHECKING:
    from anyhsm.keystore.anchor import GenerationAnchor

KIND = "tpm-nv-counter"

NV_INDEX_FIRST = 0x01000000  # TPM_HT_NV_INDEX handles
NV_INDEX_LAST = 0x01FFFFFF
ANYHSM_RANGE_FIRST = 0x01A40000
ANYHSM_RANGE_LAST = 0x01A4FFFF

COUNTER_SIZE = 8  # a TPM counter is a UINT64
MAX_JUMP = 1_000_000
DEFINE_ATTEMPTS = 16

# TPMA_NV bits (TPM 2.0 Part 2, 13.4).
_OWNERWRITE = 0x00000002
_OWNERREAD = 0x00020000
_AUTHREAD = 0x00040000
_NO_DA = 0x02000000
_ORDERLY = 0x04000000
_WRITTEN = 0x20000000
_NT_SHIFT = 4
_NT_COUNTER = 0x1
_ALG_SHA256 = 0x000B

COUNTER_ATTRIBUTES = (_NT_COUNTER << _NT_SHIFT) | _OWNERWRITE | _OWNERREAD | _AUTHREAD | _NO_DA
"""The attributes anyhsm defines its counter with; any other set is not ours."""

# TPM response codes this module tells apart (after connection.tpm_response_code).
_RC_HANDLE = 0x08B
_RC_AUTH_FAIL = 0x08E
_RC_BAD_AUTH = 0x0A2
_RC_NV_UNINITIALIZED = 0x14A
_RC_NV_SPACE = 0x14B
_RC_NV_DEFINED = 0x14C
_RC_NV_RATE = 0x920

MISSING_HINT = (
    "if this TPM was cleared or replaced on purpose, the keystore must be re-anchored "
    "through its explicit recovery step (docs/tpm.md, 'Generation counter'); otherwise "
    "someone removed the counter: treat the keystore directory as suspect"
)
ROLLBACK_HINT = (
    "the keystore directory was put back from an older copy: restore the newest copy "
    "of the keystore; if this older copy must be used, run the keystore's explicit, "
    "audited recovery step (docs/tpm.md, 'Generation counter')"
)


class _IndexTaken(Exception):
    """Internal: the random index is in use already; define picks another."""


class _Throttled(Exception):
    """Internal: TPM_RC_NV_RATE, the TPM refuses NV writes for a moment."""


def _format_ref(index: int) -> str:
    return f"0x{index:08x}"


def _parse_ref(ref: object) -> int:
    """The NV index of a ref written by :attr:`TpmCounter.ref` (exact form only)."""
    if isinstance(ref, str) and len(ref) == 10 and ref.startswith("0x"):
        try:
            index = int(ref[2:], 16)
        except ValueError:
            index = -1
        if NV_INDEX_FIRST <= index <= NV_INDEX_LAST and _format_ref(index) == ref:
            return index
    raise AnchorMismatch(
        f"{ref!r} is not a TPM NV index reference (expected '0x01xxxxxx', lower-case hex)",
        hint="the keystore manifest names an anchor this anyhsm cannot use",
    )


@contextlib.contextmanager
def _step(
    conn: Connection,
    what: str,
    ref: str,
    *,
    throttled_ok: bool = False,
    index_auth: bool = False,
) -> Iterator[None]:
    """Like Connection.step, but with the NV answers that mean something for a counter.
    ``throttled_ok``: raise _Throttled on TPM_RC_NV_RATE (the caller retries later).
    ``index_auth``: the command authorises with the index's own (empty) authValue, so
    an authorisation failure means the index is not the one anyhsm defined."""
    try:
        yield
    except HsmError:
        raise
    except Exception as exc:  # TSS2_Exception and a few built-ins from tpm2-pytss
        code = connection.tpm_response_code(exc)
        if code == _RC_NV_DEFINED:
            raise _IndexTaken from None
        if code == _RC_NV_RATE and throttled_ok:
            raise _Throttled from None
        if code == _RC_HANDLE:
            raise AnchorMissing(
                f"the TPM has no NV index {ref}: the counter anchoring the keystore's "
                "generation is gone (TPM cleared or replaced, or the index undefined)",
                hint=MISSING_HINT,
            ) from None
        if code == _RC_NV_UNINITIALIZED:
            raise AnchorMismatch(
                f"NV index {ref} was never incremented, so it is not a counter anyhsm "
                "defined (anyhsm increments its counter as it defines it)",
                hint=MISSING_HINT,
            ) from None
        if code in (_RC_AUTH_FAIL, _RC_BAD_AUTH) and index_auth:
            raise AnchorMismatch(
                f"NV index {ref} has an authorisation value; the counter anyhsm defines "
                "has none, so this index was redefined by someone else",
                hint=MISSING_HINT,
            ) from None
        if code in (_RC_AUTH_FAIL, _RC_BAD_AUTH):
            raise ProviderUnavailable(
                f"the TPM refused the authorisation while {what} for NV index {ref}; "
                "anyhsm uses the owner hierarchy and the counter with empty authorisation",
                hint="clear the owner password (tpm2_changeauth -c owner), or the index "
                "is not the counter anyhsm defined",
            ) from None
        if code == _RC_NV_SPACE:
            raise TpmCommandFailed(
                f"the TPM has no NV memory left for a counter ({exc})",
                hint="undefine unused NV indices (tpm2_getcap handles-nv-index, "
                "tpm2_nvundefine) and try again",
            ) from None
        raise connection.translate(exc, what, conn.settings.tcti) from None


def _open(conn: Connection, index: int) -> Any:
    """An ESYS handle of ``index`` after checking it is a counter as anyhsm defines it."""
    ref = _format_ref(index)
    with _step(conn, f"look up NV index {ref}", ref):
        handle = conn.esys.tr_from_tpmpublic(index)
        public, _name = conn.esys.nv_read_public(handle)
    area = public.nvPublic
    attrs = int(area.attributes)
    nv_type = (attrs >> _NT_SHIFT) & 0xF
    problems: list[str] = []
    if int(area.nvIndex) != index:
        problems.append(f"the TPM describes index 0x{int(area.nvIndex):08x}")
    if nv_type != _NT_COUNTER:
        problems.append(f"it is of NV type {nv_type}, not a counter ({_NT_COUNTER})")
    if attrs & _ORDERLY:
        problems.append("it is ORDERLY (its value jumps forward after a power cut)")
    if attrs & ~_WRITTEN != COUNTER_ATTRIBUTES:
        problems.append(
            f"its attributes are 0x{attrs & ~_WRITTEN:08x}, not 0x{COUNTER_ATTRIBUTES:08x}"
        )
    if int(area.dataSize) != COUNTER_SIZE:
        problems.append(f"its size is {int(area.dataSize)} bytes, not {COUNTER_SIZE}")
    if int(area.nameAlg) != _ALG_SHA256:
        problems.append(f"its name algorithm is 0x{int(area.nameAlg):04x}, not sha256")
    if not problems and not attrs & _WRITTEN:
        problems.append("it was never incremented")
    if problems:
        raise AnchorMismatch(
            f"NV index {ref} is not the counter anyhsm defines: " + "; ".join(problems),
            hint="another program uses this NV index, or it was redefined; the keystore's "
            "generation is not anchored by it (docs/tpm.md, 'Generation counter')",
        )
    return handle


def _read(conn: Connection, handle: Any, ref: str) -> int:
    with _step(conn, f"read NV counter {ref}", ref, index_auth=True):
        data = bytes(conn.esys.nv_read(handle, COUNTER_SIZE, 0, auth_handle=handle))
    if len(data) != COUNTER_SIZE:
        raise AnchorMismatch(f"NV counter {ref} returned {len(data)} bytes, not {COUNTER_SIZE}")
    return int.from_bytes(data, "big")


def _increment(conn: Connection, handle: Any, ref: str, *, throttled_ok: bool = False) -> None:
    with _step(conn, f"increment NV counter {ref}", ref, throttled_ok=throttled_ok):
        conn.esys.nv_increment(handle, auth_handle=conn.lib.ESYS_TR.OWNER)


def _undefine_quietly(settings: TpmSettings, index: int) -> None:
    """Best effort: remove an index a timed-out :meth:`TpmCounter.define` created."""
    with contextlib.suppress(Exception):
        TpmCounter(settings, index).undefine()


class TpmCounter:
    """A TPM NV counter anchoring the keystore's generation (a GenerationAnchor).

    Holds no connection: every method opens one, bounded by the settings' timeout,
    and checks that the index is still a counter with :data:`COUNTER_ATTRIBUTES`.
    Note for callers: a new counter does not start at 1 but at one more than the
    largest value any counter on this TPM ever held, so after :meth:`define` the
    keystore's generation must be lifted to at least :meth:`read`.
    """

    kind: str = KIND

    __slots__ = ("_index", "_settings")

    def __init__(self, settings: TpmSettings, index: int) -> None:
        if not NV_INDEX_FIRST <= index <= NV_INDEX_LAST:
            raise AnchorMismatch(f"0x{index:x} is not a TPM NV index")
        self._settings = settings
        self._index = index

    @classmethod
    def define(cls, settings: TpmSettings) -> TpmCounter:
        """Define a new counter at a free random index in anyhsm's range, incremented
        once so that it is readable. A define that times out undefines what it made."""
        span = ANYHSM_RANGE_LAST - ANYHSM_RANGE_FIRST + 1
        for _ in range(DEFINE_ATTEMPTS):
            index = ANYHSM_RANGE_FIRST + secrets.randbelow(span)
            try:
                connection.run(
                    settings,
                    "defining an NV counter",
                    functools.partial(cls._define_at, index=index),
                    discard=lambda i: _undefine_quietly(settings, i),
                )
            except _IndexTaken:
                continue
            return cls(settings, index)
        raise TpmCommandFailed(
            f"no free NV index found in 0x{ANYHSM_RANGE_FIRST:08x}..0x{ANYHSM_RANGE_LAST:08x} "
            f"after {DEFINE_ATTEMPTS} tries",
            hint="list the TPM's NV indices (tpm2_getcap handles-nv-index) and undefine "
            "unused ones",
        )

    @staticmethod
    def _define_at(conn: Connection, index: int) -> int:
        lib = conn.lib
        ref = _format_ref(index)
        public = lib.TPM2B_NV_PUBLIC(
            nvPublic=lib.TPMS_NV_PUBLIC(
                nvIndex=index,
                nameAlg=lib.TPM2_ALG.SHA256,
                attributes=COUNTER_ATTRIBUTES,
                dataSize=COUNTER_SIZE,
            )
        )
        with _step(conn, f"define NV counter {ref}", ref):  # _IndexTaken if in use
            handle = conn.esys.nv_define_space(None, public, auth_handle=lib.ESYS_TR.OWNER)
        try:
            _increment(conn, handle, ref)
        except BaseException:
            with contextlib.suppress(Exception):  # leave no half-made index behind
                conn.esys.nv_undefine_space(handle, auth_handle=lib.ESYS_TR.OWNER)
            raise
        return index

    @classmethod
    def at(cls, settings: TpmSettings, ref: str) -> TpmCounter:
        """The counter at ``ref`` (as :attr:`ref` wrote it). Does not touch the TPM."""
        return cls(settings, _parse_ref(ref))

    @property
    def ref(self) -> str:
        """The NV index as ``0x%08x``, what the keystore records in its manifest."""
        return _format_ref(self._index)

    @property
    def settings(self) -> TpmSettings:
        return self._settings

    def __repr__(self) -> str:
        return f"TpmCounter({self.ref}, tcti={self._settings.tcti!r})"

    def _run(self, what: str, op: Callable[[Connection], int]) -> int:
        value: int = connection.run(self._settings, what, op)
        return value

    def read(self) -> int:
        """The counter's value. AnchorMissing: no such index; AnchorMismatch: not our
        counter; ProviderUnavailable/ProviderTimeout: TPM unreachable or silent."""
        ref = self.ref

        def op(conn: Connection) -> int:
            return _read(conn, _open(conn, self._index), ref)

        return self._run(f"reading NV counter {ref}", op)

    def increment(self) -> int:
        """Add one; returns the new value."""
        ref = self.ref

        def op(conn: Connection) -> int:
            handle = _open(conn, self._index)
            _increment(conn, handle, ref)
            return _read(conn, handle, ref)

        return self._run(f"incrementing NV counter {ref}", op)

    def advance_to(self, value: int, *, max_jump: int = MAX_JUMP) -> int:
        """Increment until the counter equals ``value``; returns it.

        KeystoreRolledBack if the counter is already above ``value`` (the store is
        older than its anchor); AnchorMismatch if ``value`` is more than ``max_jump``
        ahead (that many NV writes would wear the TPM, and no keystore gets that far
        ahead of its counter: the store and the counter do not belong together).
        Long advances run as several bounded rounds, each within the timeout.
        """
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise AnchorMismatch(f"a generation is a non-negative integer, not {value!r}")
        if value >= 1 << (8 * COUNTER_SIZE):
            raise AnchorMismatch(f"generation {value} does not fit a 64-bit TPM counter")
        ref = self.ref
        budget = self._settings.timeout_s / 2  # leave the rest of the bound to connect/read

        def op(conn: Connection) -> int:
            start = time.monotonic()
            handle = _open(conn, self._index)
            current = _read(conn, handle, ref)
            if current > value:
                raise KeystoreRolledBack(
                    f"the keystore is at generation {value} but its TPM counter {ref} is "
                    f"at {current}: the keystore is older than its anchor",
                    store_generation=value,
                    anchor_generation=current,
                    hint=ROLLBACK_HINT,
                )
            if value - current > max_jump:
                raise AnchorMismatch(
                    f"the keystore is at generation {value} but its TPM counter {ref} is "
                    f"only at {current}: {value - current} increments is more than the "
                    f"{max_jump} anyhsm will make; this counter does not belong to this "
                    "keystore (replaced, or on another TPM)",
                    hint=MISSING_HINT,
                )
            while current < value and time.monotonic() - start < budget:
                try:
                    _increment(conn, handle, ref, throttled_ok=True)
                except _Throttled:  # the TPM limits the NV write rate: next round
                    time.sleep(min(0.05, budget / 4))
                    break
                current += 1
            return _read(conn, handle, ref)

        last = -1
        while True:
            now = self._run(f"advancing NV counter {ref} to {value}", op)
            if now == value:
                return now
            if now > value:  # someone else incremented it meanwhile
                raise KeystoreRolledBack(
                    f"TPM counter {ref} passed generation {value} (now {now}) while anyhsm "
                    "advanced it: another process increments it",
                    store_generation=value,
                    anchor_generation=now,
                    hint="only one keystore may use a counter; " + ROLLBACK_HINT,
                )
            if now <= last:
                raise ProviderUnavailable(
                    f"the TPM did not advance NV counter {ref} (stuck at {now}, want {value})",
                    hint="the TPM is throttling NV writes (TPM_RC_NV_RATE); try again later",
                )
            last = now

    def undefine(self) -> None:
        """Remove the counter from the TPM; nothing to do if it is gone already. Refuses
        (AnchorMismatch) to remove an index that is not a counter as anyhsm defines it."""
        ref = self.ref

        def op(conn: Connection) -> int:
            try:
                handle = _open(conn, self._index)
            except AnchorMissing:
                return 0
            with _step(conn, f"undefine NV counter {ref}", ref):
                conn.esys.nv_undefine_space(handle, auth_handle=conn.lib.ESYS_TR.OWNER)
            return 1

        self._run(f"undefining NV counter {ref}", op)

    def close(self) -> None:
        """Nothing to release: no connection outlives a call."""


if TYPE_CHECKING:  # TpmCounter is a GenerationAnchor (checked by mypy, costs nothing)
    _IS_ANCHOR: type[GenerationAnchor] = TpmCounter
