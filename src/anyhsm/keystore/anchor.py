"""What the keystore needs from an anchor of its generation (e.g. a TPM NV counter).

An anchor is a value outside the keystore directory that only ever grows. The
keystore's manifest carries a generation that grows with every change; keeping
the anchor at that generation means a copy of the whole directory put back from
earlier (whose generation is lower) is detected, which no file inside the
directory can prove on its own. The keystore stores ``kind`` and ``ref`` in its
authenticated manifest and finds the anchor again by them.
"""

from __future__ import annotations

from typing import Protocol


class GenerationAnchor(Protocol):
    """A monotonic counter outside the keystore (structural: TpmCounter is one)."""

    kind: str
    """Stable name of the anchor type, e.g. ``"tpm-nv-counter"``."""

    @property
    def ref(self) -> str:
        """Where the anchor lives (for a TPM counter its NV index, ``"0x%08x"``)."""
        ...

    def read(self) -> int:
        """The anchored generation now (AnchorMissing / AnchorMismatch / unavailable)."""
        ...

    def advance_to(self, value: int) -> int:
        """Grow the anchor to ``value`` and return it; KeystoreRolledBack if it is
        already above ``value`` (the store is older than the anchor)."""
        ...

    def close(self) -> None:
        """Release whatever the anchor holds open (idempotent)."""
        ...
