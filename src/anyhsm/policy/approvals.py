"""Approvals: an approver's signature over a transaction and the policy version.

The format (docs/policy.md, "Approvals"): the approver signs, as a Bitcoin signed message,
the UTF-8 text of four lines joined by ``\\n`` (no trailing newline)::

    anyhsm spending approval v1
    txid: <the PSBT's unsigned transaction id, 64 hex digits as block explorers show it>
    policy: <SHA-256 of the active policy file, 64 hex digits>
    expires: <Unix time in seconds after which the approval is void>

with the key declared in the policy (a 33-byte compressed public key), either as

- a BIP137 signature (``signmessage``; 65 bytes base64, any header of a compressed key,
  31-42): the public key recovered from it must be the declared key; or
- a BIP322 simple signature for the declared key's P2WPKH address.

Either proves the holder of the declared key approved exactly that transaction under
exactly that policy until that time; any change of the policy file changes its hash and
so voids every approval made under the old one. An approval is used once: the engine
records its id (SHA-256 of the message and the key) until it expires.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import re

from anyhsm.errors import ApprovalRejected, HsmError
from anyhsm.types import Network

HEADER = "anyhsm spending approval v1"
_HEX64 = re.compile(r"[0-9a-f]{64}")
APPROVAL_RULE = "approval"


def approval_message(txid: str, policy_sha256: str, expires: int) -> str:
    """The exact text an approver signs."""
    if not _HEX64.fullmatch(txid) or not _HEX64.fullmatch(policy_sha256):
        raise ApprovalRejected(
            "an approval names a transaction id and a policy hash of 64 lower-case hex digits",
            rules=[APPROVAL_RULE],
        )
    if expires <= 0:
        raise ApprovalRejected("an approval's expiry is a Unix time", rules=[APPROVAL_RULE])
    return f"{HEADER}\ntxid: {txid}\npolicy: {policy_sha256}\nexpires: {expires}"


def approval_id(message: str, pubkey: bytes) -> str:
    return hashlib.sha256(message.encode() + b"\x00" + pubkey).hexdigest()


def verify_approval(message: str, pubkey: bytes, signature: str, network: Network) -> bool:
    """Whether ``signature`` (BIP137 or BIP322 simple, see the module doc) is ``pubkey``'s
    over ``message``. Malformed signatures are False, never an exception."""
    from anyhsm.bitcoin import message as msg
    from anyhsm.bitcoin.address import address_for_pubkey

    text = signature.strip()
    raw = b""
    if len(text) <= 200 and text[:3] not in ("smp", "ful", "pof"):
        with contextlib.suppress(binascii.Error, ValueError):
            raw = base64.b64decode(text, validate=True)
    try:
        if len(raw) == 65 and 27 <= raw[0] <= 42:
            if raw[0] < 31:
                return False  # an uncompressed key is never a declared (compressed) one
            recovered, _ = msg.recover_bip137(message, text)
            return recovered == pubkey
        address = address_for_pubkey(pubkey, "p2wpkh", network)
        return msg.verify_message_bip322(address, message, text, network)
    except HsmError:
        return False


__all__ = ["HEADER", "approval_id", "approval_message", "verify_approval"]
