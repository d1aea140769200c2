"""What every operation result shares: its ``to_dict`` is its fields, made plain for JSON.

The JSON conventions (docs/cli.md, "JSON output") are made here, once: numbers stay
numbers, enums become their value, bytes become hex, paths become strings, nested results
their own ``to_dict``; a value that is not there is ``null`` (never ``""``), and a
collection with nothing in it is ``[]`` (never ``null``, never absent).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, cast, runtime_checkable

if TYPE_CHECKING:
    from _typeshed import DataclassInstance


@runtime_checkable
class HasToDict(Protocol):
    def to_dict(self) -> dict[str, object]: ...


def plain(value: object) -> object:
    """``value`` as JSON can hold it (see the module's conventions)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, enum.Enum):
        return plain(value.value)
    if isinstance(value, bytes | bytearray):
        return bytes(value).hex()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, HasToDict):
        return value.to_dict()
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [plain(v) for v in value]
    raise TypeError(f"no JSON form for {type(value).__name__}")


class Data:
    """Base of the frozen dataclasses operations return."""

    def to_dict(self) -> dict[str, object]:
        me = cast("DataclassInstance", self)
        return {f.name: plain(getattr(self, f.name)) for f in fields(me)}


def hex_bytes(text: str, what: str) -> bytes:
    """Hexadecimal text (a digest, a signature) as bytes; :class:`InvalidDigest` naming
    ``what`` otherwise (never quoting the text)."""
    from anyhsm.errors import InvalidDigest

    try:
        return bytes.fromhex(text.strip())
    except ValueError:
        raise InvalidDigest(f"{what} is not valid hexadecimal") from None
