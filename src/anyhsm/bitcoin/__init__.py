"""The Bitcoin layer of anyhsm: keys, scripts, sighashes, PSBTs, signing policy, messages.

Public API (kept stable)::

    from anyhsm.bitcoin import Psbt, PsbtError, ExtendedKey, sign_psbt, finalize_psbt

    psbt = Psbt.parse(data)                 # raw bytes, base64 or hex
    result = sign_psbt(hsm, psbt, "wallet", policy=hsm.config.policy, network=hsm.network,
                       environment=hsm.config.environment)   # result.psbt, result.inputs
    final = finalize_psbt(result.psbt)       # final.psbt, final.complete, final.tx

With the handle, ``anyhsm.ops.psbt.sign_psbt(hsm, psbt, "wallet")`` passes those three
for you. The signer's first argument is any :class:`SigningBackend` (keys by reference,
their public data, batches of digest signatures, an event log), as Bitcoin Core's
``SigningProvider``: :class:`anyhsm.hsm.Hsm` is one, and this package never holds a
private key. The policy and the network are the caller's arguments, never read from the
backend. The submodules (``bip32``, ``address``, ``script``, ``sighash``, ``psbt``,
``descriptor``, ``message``...) hold the rest of the API.
"""

from __future__ import annotations

from anyhsm.bitcoin.address import AddressKind, address_for_pubkey, script_from_address
from anyhsm.bitcoin.backend import SigningBackend
from anyhsm.bitcoin.bip32 import ExtendedKey, KeyOrigin, format_path, parse_path
from anyhsm.bitcoin.finalizer import FinalizeInputReport, FinalizeResult, finalize_psbt
from anyhsm.bitcoin.policy import OutputReport, PolicyReport
from anyhsm.bitcoin.psbt import Psbt, PsbtInput, PsbtOutput
from anyhsm.bitcoin.signer import (
    InputReport,
    SignatureKind,
    SignatureReport,
    SignResult,
    sign_psbt,
)
from anyhsm.bitcoin.tx import OutPoint, Transaction, TxIn, TxOut
from anyhsm.errors import NothingSigned, PsbtError, SigningPolicyError

__all__ = [
    "AddressKind",
    "ExtendedKey",
    "FinalizeInputReport",
    "FinalizeResult",
    "InputReport",
    "KeyOrigin",
    "NothingSigned",
    "OutPoint",
    "OutputReport",
    "PolicyReport",
    "Psbt",
    "PsbtError",
    "PsbtInput",
    "PsbtOutput",
    "SignResult",
    "SignatureKind",
    "SignatureReport",
    "SigningBackend",
    "SigningPolicyError",
    "Transaction",
    "TxIn",
    "TxOut",
    "address_for_pubkey",
    "finalize_psbt",
    "format_path",
    "parse_path",
    "script_from_address",
    "sign_psbt",
]
