"""The typed per-input and per-output maps of a PSBT, and how each reads and writes its fields.

A map is read from its raw key-value records (``from_records``) and written back as
records (``records``) in Bitcoin Core's order (``PSBTInput``/``PSBTOutput::Serialize`` in
Core's ``psbt.h``), so a PSBT Core wrote comes back byte for byte and any other comes out
as Core would write it:

- fields in the sequence Core's serialiser writes them (mostly ascending key type; the
  final scriptSig/witness and the v2 transaction fields of an input come after its
  taproot and MuSig2 fields; an output's proprietary pairs come before its taproot fields);
- within one key type, the entries in the order of Core's ``std::map`` key: partial
  signatures by the HASH160 of their key, derivations by key, preimages by hash, taproot
  script signatures by (x-only key, leaf hash), leaf scripts by (script, leaf version,
  then the shorter control block first), MuSig2 nonces and partial signatures by
  (aggregate key, leaf hash, participant key); a taproot derivation's leaf hashes sorted;
- proprietary pairs, then unknown pairs, each sorted by key and kept byte for byte
  (PSBT_IN_POR_COMMITMENT, which Core does not know, sorted among the unknown pairs).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields

from anyhsm.bitcoin.bip32 import KeyOrigin
from anyhsm.bitcoin.encoding import hash160, sha256, sha256d
from anyhsm.bitcoin.psbt_fields import (
    LOCKTIME_THRESHOLD,
    V2_ONLY_INPUT,
    V2_ONLY_OUTPUT,
    InputType,
    LeafScript,
    MuSig2Key,
    OutputType,
    ProprietaryField,
    TapKeyOrigin,
    TapTreeLeaf,
    UnknownField,
    check_compressed_pubkey,
    check_control_block,
    check_musig2_partial_sig,
    check_musig2_pubnonce,
    check_pubkey,
    check_schnorr_sig,
    check_xonly,
    decode_musig2_key,
    decode_musig2_participants,
    decode_origin,
    decode_tap_origin,
    decode_tap_tree,
    decode_witness,
    encode_origin,
    encode_tap_origin,
    encode_tap_tree,
    encode_witness,
    input_name,
    output_name,
    parse_proprietary,
    split_key,
    u32,
)
from anyhsm.bitcoin.tx import MAX_MONEY, OutPoint, Transaction, TxIn, TxOut
from anyhsm.crypto.secp256k1 import CurveError, der_decode
from anyhsm.errors import BitcoinError, PsbtError

Record = tuple[bytes, bytes]
SEQUENCE_FINAL = 0xFFFFFFFF


def _ripemd160(data: bytes) -> bytes:
    return hashlib.new("ripemd160", data).digest()


_PREIMAGE_HASHES: dict[int, tuple[int, Callable[[bytes], bytes]]] = {
    InputType.RIPEMD160: (20, _ripemd160),
    InputType.SHA256: (32, sha256),
    InputType.HASH160: (20, hash160),
    InputType.HASH256: (32, sha256d),
}


_PREIMAGE_FIELDS: dict[int, str] = {
    InputType.RIPEMD160: "ripemd160_preimages",
    InputType.SHA256: "sha256_preimages",
    InputType.HASH160: "hash160_preimages",
    InputType.HASH256: "hash256_preimages",
}


class _FieldContext:
    """See :func:`field_context` (a class: entered twice per field of every PSBT read, a
    generator-based context manager cost more than most fields' decoding)."""

    __slots__ = ("name", "where")

    def __init__(self, name: str, where: str) -> None:
        self.name = name
        self.where = where

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, e: BaseException | None, tb: object) -> None:
        if e is None:
            return
        name, where = self.name, self.where
        if isinstance(e, PsbtError):
            if e.field is not None:
                return
            raise PsbtError(f"{name}: {e.message} ({where})", field=name) from None
        if isinstance(e, (BitcoinError, ValueError, IndexError, OverflowError)):
            detail = e.message if isinstance(e, BitcoinError) else str(e)
            raise PsbtError(f"{name}: {detail} ({where})", field=name) from None


def field_context(name: str, where: str) -> _FieldContext:
    """Turn any decoding failure inside the block into PsbtError naming ``name`` at ``where``."""
    return _FieldContext(name, where)


def iter_fields(
    records: Sequence[Record], namer: Callable[[int], str], scope: str, where: str
) -> Iterator[tuple[int, str, bytes, bytes, bytes]]:
    """Yield (key type, field name, key data, full key, value), rejecting duplicate keys."""
    seen: set[bytes] = set()
    for key, value in records:
        with field_context(f"{scope} key", where):
            key_type, key_data = split_key(key)
        name = namer(key_type)
        if key in seen:
            raise PsbtError(f"{name}: duplicate key ({where})", field=name)
        seen.add(key)
        yield key_type, name, key_data, key, value


def no_key_data(key_data: bytes) -> None:
    if key_data:
        raise PsbtError(f"key has {len(key_data)} extra bytes; this field takes no key data")


def tail_records(
    proprietary: Sequence[ProprietaryField], unknown: Sequence[UnknownField]
) -> tuple[list[Record], list[Record]]:
    """(proprietary, unknown) pairs of a map, each sorted by key as Bitcoin Core writes them
    (its ``std::set<PSBTProprietary>`` and ``std::map`` of unknown keys)."""
    return (
        sorted((p.key, p.value) for p in proprietary),
        sorted((u.key, u.value) for u in unknown),
    )


def keyed(key_type: int, entries: Iterable[tuple[bytes, bytes]]) -> list[Record]:
    """Records of one keyed field type, in the order of their key data."""
    prefix = bytes([key_type])
    return [(prefix + k, v) for k, v in sorted(entries)]


def encode_musig2_participants(participants: Sequence[bytes]) -> bytes:
    return b"".join(participants)


def _musig2_records(key_type: int, entries: dict[MuSig2Key, bytes]) -> list[Record]:
    prefix = bytes([key_type])
    return [
        (prefix + k.key_data, v)
        for k, v in sorted(entries.items(), key=lambda kv: kv[0].core_order())
    ]


def _tap_origin_sorted(value: TapKeyOrigin) -> bytes:
    """A taproot derivation with its leaf hashes sorted and unique, as Core's std::set."""
    return encode_tap_origin(TapKeyOrigin(tuple(sorted(set(value.leaf_hashes))), value.origin))


_IDENTITY_FIELDS = frozenset({"previous_txid", "output_index", "amount", "script"})


def merge_maps(mine: PsbtInput | PsbtOutput, theirs: PsbtInput | PsbtOutput) -> None:
    """Union of two maps of the same kind, field by field; ``mine`` wins where both have a
    value. Lists (proprietary, unknown) are joined by key, keeping our order first."""
    for f in fields(mine):
        if f.name in _IDENTITY_FIELDS:
            continue
        ours, other = getattr(mine, f.name), getattr(theirs, f.name)
        if ours is None:
            setattr(mine, f.name, other)
        elif isinstance(ours, dict):
            for k, v in other.items():
                ours.setdefault(k, v)
        elif isinstance(ours, list) and f.name in ("proprietary", "unknown"):
            keys = {item.key for item in ours}
            ours.extend(item for item in other if item.key not in keys)
            ours.sort(key=lambda item: item.key)


# --- inputs -------------------------------------------------------------------------------


@dataclass
class PsbtInput:
    """One PSBT input map. ``previous_txid`` is in internal byte order (as serialised)."""

    previous_txid: bytes
    output_index: int
    sequence_number: int | None = None  # PSBT_IN_SEQUENCE; None means final (0xffffffff)
    required_time_locktime: int | None = None
    required_height_locktime: int | None = None
    non_witness_utxo: Transaction | None = None
    witness_utxo: TxOut | None = None
    partial_sigs: dict[bytes, bytes] = field(default_factory=dict)  # pubkey -> DER sig + hashtype
    sighash_type: int | None = None
    redeem_script: bytes | None = None
    witness_script: bytes | None = None
    bip32_derivations: dict[bytes, KeyOrigin] = field(default_factory=dict)  # pubkey -> origin
    final_scriptsig: bytes | None = None
    final_scriptwitness: list[bytes] | None = None
    por_commitment: bytes | None = None
    ripemd160_preimages: dict[bytes, bytes] = field(default_factory=dict)  # hash -> preimage
    sha256_preimages: dict[bytes, bytes] = field(default_factory=dict)
    hash160_preimages: dict[bytes, bytes] = field(default_factory=dict)
    hash256_preimages: dict[bytes, bytes] = field(default_factory=dict)
    tap_key_sig: bytes | None = None
    tap_script_sigs: dict[tuple[bytes, bytes], bytes] = field(default_factory=dict)
    tap_leaf_scripts: dict[bytes, LeafScript] = field(default_factory=dict)  # control block ->
    tap_bip32_derivations: dict[bytes, TapKeyOrigin] = field(default_factory=dict)
    tap_internal_key: bytes | None = None
    tap_merkle_root: bytes | None = None
    # BIP373: aggregate key -> participant keys (KeyAgg order); public nonces and partial
    # signatures by (participant, aggregate, leaf hash)
    musig2_participants: dict[bytes, tuple[bytes, ...]] = field(default_factory=dict)
    musig2_pub_nonces: dict[MuSig2Key, bytes] = field(default_factory=dict)
    musig2_partial_sigs: dict[MuSig2Key, bytes] = field(default_factory=dict)
    proprietary: list[ProprietaryField] = field(default_factory=list)
    unknown: list[UnknownField] = field(default_factory=list)

    # --- accessors ---

    @classmethod
    def from_outpoint(cls, prevout: OutPoint, sequence: int | None = None) -> PsbtInput:
        return cls(prevout.txid, prevout.vout, sequence)

    @property
    def prevout(self) -> OutPoint:
        return OutPoint(self.previous_txid, self.output_index)

    @property
    def sequence(self) -> int:
        """The nSequence the transaction uses (PSBT_IN_SEQUENCE, else 0xffffffff)."""
        return SEQUENCE_FINAL if self.sequence_number is None else self.sequence_number

    def spent_output(self) -> TxOut | None:
        """The output this input spends: from NON_WITNESS_UTXO (checked against the txid at
        parse time) if present, else WITNESS_UTXO, else None."""
        utxo = self.non_witness_utxo
        if utxo is not None and self.output_index < len(utxo.outputs):
            return utxo.outputs[self.output_index]
        return self.witness_utxo

    @property
    def is_finalized(self) -> bool:
        return self.final_scriptsig is not None or self.final_scriptwitness is not None

    # --- mutators for signers and finalizers ---

    def add_partial_sig(self, pubkey: bytes, signature: bytes) -> None:
        """Record an ECDSA signature: strict DER followed by the sighash-type byte."""
        with field_context(input_name(InputType.PARTIAL_SIG), "partial signature"):
            check_pubkey(pubkey)
            if len(signature) < 9:
                raise PsbtError("signature is too short to be DER plus a sighash byte")
            try:
                der_decode(signature[:-1])
            except CurveError as e:
                raise PsbtError(f"signature is not strict DER: {e}") from None
        self.partial_sigs[pubkey] = signature

    def add_tap_key_sig(self, signature: bytes) -> None:
        with field_context(input_name(InputType.TAP_KEY_SIG), "key-path signature"):
            check_schnorr_sig(signature)
        self.tap_key_sig = signature

    def add_tap_script_sig(self, xonly_pubkey: bytes, leaf_hash: bytes, signature: bytes) -> None:
        with field_context(input_name(InputType.TAP_SCRIPT_SIG), "script-path signature"):
            check_xonly(xonly_pubkey)
            if len(leaf_hash) != 32:
                raise PsbtError("leaf hash must be 32 bytes")
            check_schnorr_sig(signature)
        self.tap_script_sigs[(xonly_pubkey, leaf_hash)] = signature

    def set_final_scriptsig(self, script_sig: bytes) -> None:
        self.final_scriptsig = bytes(script_sig)

    def set_final_scriptwitness(self, witness: Sequence[bytes]) -> None:
        self.final_scriptwitness = [bytes(item) for item in witness]

    def clear_finalized_fields(self) -> None:
        """BIP174 finalizer: drop everything but the UTXOs, the final scripts, the
        transaction fields (v2), proprietary and unknown pairs."""
        self.partial_sigs.clear()
        self.sighash_type = None
        self.redeem_script = None
        self.witness_script = None
        self.bip32_derivations.clear()
        self.por_commitment = None
        self.ripemd160_preimages.clear()
        self.sha256_preimages.clear()
        self.hash160_preimages.clear()
        self.hash256_preimages.clear()
        self.tap_key_sig = None
        self.tap_script_sigs.clear()
        self.tap_leaf_scripts.clear()
        self.tap_bip32_derivations.clear()
        self.tap_internal_key = None
        self.tap_merkle_root = None
        self.musig2_participants.clear()
        self.musig2_pub_nonces.clear()
        self.musig2_partial_sigs.clear()

    def finalize(
        self, script_sig: bytes | None = None, witness: Sequence[bytes] | None = None
    ) -> None:
        """Set the final scriptSig and/or witness and clear what a finalizer must remove."""
        if script_sig is None and witness is None:
            raise PsbtError("finalize needs a scriptSig, a witness or both", field="PSBT_IN_FINAL")
        if script_sig is not None:
            self.set_final_scriptsig(script_sig)
        if witness is not None:
            self.set_final_scriptwitness(witness)
        self.clear_finalized_fields()

    # --- (de)serialisation ---

    @classmethod
    def from_records(
        cls, records: Sequence[Record], *, version: int, index: int, tx_in: TxIn | None
    ) -> PsbtInput:
        where = f"input {index}"
        inp = cls(previous_txid=b"\x00" * 32, output_index=0)
        seen: set[int] = set()
        utxo_bytes: bytes | None = None
        for key_type, name, key_data, key, value in iter_fields(
            records, input_name, "PSBT_IN", where
        ):
            if version == 0 and key_type in V2_ONLY_INPUT:
                raise PsbtError(f"{name}: not allowed in PSBT version 0 ({where})", field=name)
            with field_context(name, where):
                inp._read_field(key_type, key_data, key, value)
            if key_type == InputType.NON_WITNESS_UTXO:
                utxo_bytes = value
            seen.add(key_type)
        if tx_in is not None:
            inp.previous_txid = tx_in.prevout.txid
            inp.output_index = tx_in.prevout.vout
            inp.sequence_number = tx_in.sequence
        else:
            for required in (InputType.PREVIOUS_TXID, InputType.OUTPUT_INDEX):
                if required not in seen:
                    name = input_name(required)
                    raise PsbtError(
                        f"{name}: missing (required in PSBT version 2) ({where})", field=name
                    )
        inp._check_utxos(where, utxo_bytes)
        inp.proprietary.sort(key=lambda p: p.key)  # held in the order they are written
        inp.unknown.sort(key=lambda u: u.key)
        return inp

    def _check_utxos(self, where: str, utxo_bytes: bytes | None = None) -> None:
        """``utxo_bytes``: the field's value the transaction was parsed from. Without the
        segwit marker (byte 4 is an input count, not 0) it is the transaction's
        serialisation without witness, byte for byte (the reader takes canonical
        encodings only), so its hash is the txid without serialising again."""
        utxo = self.non_witness_utxo
        if utxo is None:
            return
        name = input_name(InputType.NON_WITNESS_UTXO)
        if utxo_bytes is not None and len(utxo_bytes) > 4 and utxo_bytes[4] != 0:
            txid = sha256d(utxo_bytes)
        else:
            txid = utxo.txid()
        if txid != self.previous_txid:
            raise PsbtError(
                f"{name}: transaction id {utxo.txid_hex()} does not match the input's "
                f"previous txid {self.previous_txid[::-1].hex()} ({where})",
                field=name,
            )
        if self.output_index >= len(utxo.outputs):
            raise PsbtError(
                f"{name}: the input spends output {self.output_index} but the transaction "
                f"has {len(utxo.outputs)} outputs ({where})",
                field=name,
            )
        if self.witness_utxo is not None and self.witness_utxo != utxo.outputs[self.output_index]:
            name = input_name(InputType.WITNESS_UTXO)
            raise PsbtError(
                f"{name}: does not match the spent output in PSBT_IN_NON_WITNESS_UTXO ({where})",
                field=name,
            )

    def _read_field(self, key_type: int, key_data: bytes, key: bytes, value: bytes) -> None:
        T = InputType
        if key_type in _PREIMAGE_HASHES:
            size, fn = _PREIMAGE_HASHES[key_type]
            if len(key_data) != size:
                raise PsbtError(f"key holds a {len(key_data)}-byte hash, expected {size} bytes")
            if fn(value) != key_data:
                raise PsbtError("preimage does not hash to the hash in the key")
            self._preimages(key_type)[key_data] = value
        elif key_type == T.PARTIAL_SIG:
            check_pubkey(key_data)
            if not value:
                raise PsbtError("signature is empty")
            self.partial_sigs[key_data] = value
        elif key_type == T.BIP32_DERIVATION:
            check_pubkey(key_data)
            self.bip32_derivations[key_data] = decode_origin(value)
        elif key_type == T.TAP_SCRIPT_SIG:
            if len(key_data) != 64:
                raise PsbtError(
                    f"key data is {len(key_data)} bytes, expected a 32-byte x-only key "
                    "and a 32-byte leaf hash"
                )
            check_xonly(key_data[:32])
            self.tap_script_sigs[(key_data[:32], key_data[32:])] = check_schnorr_sig(value)
        elif key_type == T.TAP_LEAF_SCRIPT:
            check_control_block(key_data)
            if not value:
                raise PsbtError("value must hold a script followed by a leaf version byte")
            self.tap_leaf_scripts[key_data] = LeafScript(value[:-1], value[-1])
        elif key_type == T.TAP_BIP32_DERIVATION:
            check_xonly(key_data)
            self.tap_bip32_derivations[key_data] = decode_tap_origin(value)
        elif key_type == T.MUSIG2_PARTICIPANT_PUBKEYS:
            check_compressed_pubkey(key_data, "aggregate key")
            self.musig2_participants[key_data] = decode_musig2_participants(value)
        elif key_type == T.MUSIG2_PUB_NONCE:
            self.musig2_pub_nonces[decode_musig2_key(key_data)] = check_musig2_pubnonce(value)
        elif key_type == T.MUSIG2_PARTIAL_SIG:
            musig_key = decode_musig2_key(key_data)
            self.musig2_partial_sigs[musig_key] = check_musig2_partial_sig(value)
        elif key_type == T.PROPRIETARY:
            self.proprietary.append(parse_proprietary(key_data, value))
        elif key_type in _INPUT_SCALARS:
            no_key_data(key_data)
            _INPUT_SCALARS[key_type](self, value)
        else:
            self.unknown.append(UnknownField(key, value))

    def _preimages(self, key_type: int) -> dict[bytes, bytes]:
        found: dict[bytes, bytes] = getattr(self, _PREIMAGE_FIELDS[key_type])
        return found

    def records(self, version: int) -> list[Record]:
        """This map's records in Bitcoin Core's order (see the module docstring)."""
        T = InputType
        out: list[Record] = []

        def one(key_type: int, value: bytes | None) -> None:
            if value is not None:
                out.append((bytes([key_type]), value))

        def u32le(n: int | None) -> bytes | None:
            return None if n is None else n.to_bytes(4, "little")

        if self.non_witness_utxo is not None:
            one(T.NON_WITNESS_UTXO, self.non_witness_utxo.serialize())
        if self.witness_utxo is not None:
            one(T.WITNESS_UTXO, self.witness_utxo.serialize())
        sigs = list(self.partial_sigs.items())
        if len(sigs) > 1:  # Core's std::map<CKeyID, SigPair>: by HASH160 of the key
            sigs.sort(key=lambda kv: hash160(kv[0]))
        out += [(b"\x02" + k, v) for k, v in sigs]
        one(T.SIGHASH_TYPE, u32le(self.sighash_type))
        one(T.REDEEM_SCRIPT, self.redeem_script)
        one(T.WITNESS_SCRIPT, self.witness_script)
        # (each keyed field only when present: most are empty, and this runs per input of
        # every PSBT written)
        if self.bip32_derivations:
            out += keyed(
                T.BIP32_DERIVATION,
                ((k, encode_origin(v)) for k, v in self.bip32_derivations.items()),
            )
        for key_type in _PREIMAGE_HASHES:
            preimages = self._preimages(key_type)
            if preimages:
                out += keyed(key_type, preimages.items())
        one(T.TAP_KEY_SIG, self.tap_key_sig)
        if self.tap_script_sigs:
            out += keyed(
                T.TAP_SCRIPT_SIG, ((x + h, s) for (x, h), s in self.tap_script_sigs.items())
            )
        if self.tap_leaf_scripts:
            leaves = sorted(
                self.tap_leaf_scripts.items(),
                key=lambda kv: (kv[1].script, kv[1].leaf_version, len(kv[0]), kv[0]),
            )
            out += [(b"\x15" + cb, ls.script + bytes([ls.leaf_version])) for cb, ls in leaves]
        if self.tap_bip32_derivations:
            out += keyed(
                T.TAP_BIP32_DERIVATION,
                ((k, _tap_origin_sorted(v)) for k, v in self.tap_bip32_derivations.items()),
            )
        one(T.TAP_INTERNAL_KEY, self.tap_internal_key)
        one(T.TAP_MERKLE_ROOT, self.tap_merkle_root)
        if self.musig2_participants:
            out += keyed(
                T.MUSIG2_PARTICIPANT_PUBKEYS,
                ((k, encode_musig2_participants(v)) for k, v in self.musig2_participants.items()),
            )
        if self.musig2_pub_nonces:
            out += _musig2_records(T.MUSIG2_PUB_NONCE, self.musig2_pub_nonces)
        if self.musig2_partial_sigs:
            out += _musig2_records(T.MUSIG2_PARTIAL_SIG, self.musig2_partial_sigs)
        one(T.FINAL_SCRIPTSIG, self.final_scriptsig)
        if self.final_scriptwitness is not None:
            one(T.FINAL_SCRIPTWITNESS, encode_witness(self.final_scriptwitness))
        if version == 2:
            one(T.PREVIOUS_TXID, self.previous_txid)
            one(T.OUTPUT_INDEX, u32le(self.output_index))
            one(T.SEQUENCE, u32le(self.sequence_number))
            one(T.REQUIRED_TIME_LOCKTIME, u32le(self.required_time_locktime))
            one(T.REQUIRED_HEIGHT_LOCKTIME, u32le(self.required_height_locktime))
        proprietary, unknown = tail_records(self.proprietary, self.unknown)
        if self.por_commitment is not None:  # unknown to Bitcoin Core: sorted with those
            unknown = sorted([*unknown, (bytes([T.POR_COMMITMENT]), self.por_commitment)])
        return out + proprietary + unknown

    def merge(self, other: PsbtInput) -> None:
        """BIP174 combiner for one input: keep every field of either; ours wins on a clash."""
        merge_maps(self, other)


def _set_non_witness_utxo(inp: PsbtInput, value: bytes) -> None:
    inp.non_witness_utxo = Transaction.parse(value)


def _set_witness_utxo(inp: PsbtInput, value: bytes) -> None:
    inp.witness_utxo = TxOut.parse(value)


def _set_sighash(inp: PsbtInput, value: bytes) -> None:
    inp.sighash_type = u32(value)


def _set_redeem(inp: PsbtInput, value: bytes) -> None:
    inp.redeem_script = value


def _set_witness_script(inp: PsbtInput, value: bytes) -> None:
    inp.witness_script = value


def _set_final_scriptsig(inp: PsbtInput, value: bytes) -> None:
    inp.final_scriptsig = value


def _set_final_witness(inp: PsbtInput, value: bytes) -> None:
    inp.final_scriptwitness = decode_witness(value)


def _set_por(inp: PsbtInput, value: bytes) -> None:
    inp.por_commitment = value


def _set_previous_txid(inp: PsbtInput, value: bytes) -> None:
    if len(value) != 32:
        raise PsbtError(f"value is {len(value)} bytes, a txid is 32 bytes")
    inp.previous_txid = value


def _set_output_index(inp: PsbtInput, value: bytes) -> None:
    inp.output_index = u32(value)


def _set_sequence(inp: PsbtInput, value: bytes) -> None:
    inp.sequence_number = u32(value)


def _set_time_locktime(inp: PsbtInput, value: bytes) -> None:
    n = u32(value)
    if n < LOCKTIME_THRESHOLD:
        raise PsbtError(f"{n} is below 500000000, so it is not a time-based lock time")
    inp.required_time_locktime = n


def _set_height_locktime(inp: PsbtInput, value: bytes) -> None:
    n = u32(value)
    if not 0 < n < LOCKTIME_THRESHOLD:
        raise PsbtError(f"{n} is not a block height (must be 1..499999999)")
    inp.required_height_locktime = n


def _set_tap_key_sig(inp: PsbtInput, value: bytes) -> None:
    inp.tap_key_sig = check_schnorr_sig(value)


def _set_tap_internal_key(inp: PsbtInput, value: bytes) -> None:
    inp.tap_internal_key = check_xonly(value, "internal key")


def _set_tap_merkle_root(inp: PsbtInput, value: bytes) -> None:
    if len(value) != 32:
        raise PsbtError(f"value is {len(value)} bytes, a Merkle root is 32 bytes")
    inp.tap_merkle_root = value


_INPUT_SCALARS: dict[int, Callable[[PsbtInput, bytes], None]] = {
    InputType.NON_WITNESS_UTXO: _set_non_witness_utxo,
    InputType.WITNESS_UTXO: _set_witness_utxo,
    InputType.SIGHASH_TYPE: _set_sighash,
    InputType.REDEEM_SCRIPT: _set_redeem,
    InputType.WITNESS_SCRIPT: _set_witness_script,
    InputType.FINAL_SCRIPTSIG: _set_final_scriptsig,
    InputType.FINAL_SCRIPTWITNESS: _set_final_witness,
    InputType.POR_COMMITMENT: _set_por,
    InputType.PREVIOUS_TXID: _set_previous_txid,
    InputType.OUTPUT_INDEX: _set_output_index,
    InputType.SEQUENCE: _set_sequence,
    InputType.REQUIRED_TIME_LOCKTIME: _set_time_locktime,
    InputType.REQUIRED_HEIGHT_LOCKTIME: _set_height_locktime,
    InputType.TAP_KEY_SIG: _set_tap_key_sig,
    InputType.TAP_INTERNAL_KEY: _set_tap_internal_key,
    InputType.TAP_MERKLE_ROOT: _set_tap_merkle_root,
}


# --- outputs ------------------------------------------------------------------------------


@dataclass
class PsbtOutput:
    """One PSBT output map."""

    amount: int
    script: bytes
    redeem_script: bytes | None = None
    witness_script: bytes | None = None
    bip32_derivations: dict[bytes, KeyOrigin] = field(default_factory=dict)
    tap_internal_key: bytes | None = None
    tap_tree: tuple[TapTreeLeaf, ...] | None = None
    tap_bip32_derivations: dict[bytes, TapKeyOrigin] = field(default_factory=dict)
    musig2_participants: dict[bytes, tuple[bytes, ...]] = field(default_factory=dict)  # BIP373
    proprietary: list[ProprietaryField] = field(default_factory=list)
    unknown: list[UnknownField] = field(default_factory=list)

    @classmethod
    def from_txout(cls, txout: TxOut) -> PsbtOutput:
        return cls(txout.value, txout.script_pubkey)

    def txout(self) -> TxOut:
        return TxOut(self.amount, self.script)

    @classmethod
    def from_records(
        cls, records: Sequence[Record], *, version: int, index: int, tx_out: TxOut | None
    ) -> PsbtOutput:
        where = f"output {index}"
        out = cls(amount=0, script=b"")
        seen: set[int] = set()
        for key_type, name, key_data, key, value in iter_fields(
            records, output_name, "PSBT_OUT", where
        ):
            if version == 0 and key_type in V2_ONLY_OUTPUT:
                raise PsbtError(f"{name}: not allowed in PSBT version 0 ({where})", field=name)
            with field_context(name, where):
                out._read_field(key_type, key_data, key, value)
            seen.add(key_type)
        if tx_out is not None:
            out.amount, out.script = tx_out.value, tx_out.script_pubkey
        else:
            for required in (OutputType.AMOUNT, OutputType.SCRIPT):
                if required not in seen:
                    name = output_name(required)
                    raise PsbtError(
                        f"{name}: missing (required in PSBT version 2) ({where})", field=name
                    )
        out.proprietary.sort(key=lambda p: p.key)  # held in the order they are written
        out.unknown.sort(key=lambda u: u.key)
        return out

    def _read_field(self, key_type: int, key_data: bytes, key: bytes, value: bytes) -> None:
        T = OutputType
        if key_type == T.BIP32_DERIVATION:
            check_pubkey(key_data)
            self.bip32_derivations[key_data] = decode_origin(value)
        elif key_type == T.TAP_BIP32_DERIVATION:
            check_xonly(key_data)
            self.tap_bip32_derivations[key_data] = decode_tap_origin(value)
        elif key_type == T.MUSIG2_PARTICIPANT_PUBKEYS:
            check_compressed_pubkey(key_data, "aggregate key")
            self.musig2_participants[key_data] = decode_musig2_participants(value)
        elif key_type == T.PROPRIETARY:
            self.proprietary.append(parse_proprietary(key_data, value))
        elif key_type in _OUTPUT_SCALARS:
            no_key_data(key_data)
            _OUTPUT_SCALARS[key_type](self, value)
        else:
            self.unknown.append(UnknownField(key, value))

    def records(self, version: int) -> list[Record]:
        """This map's records in Bitcoin Core's order (see the module docstring)."""
        T = OutputType
        out: list[Record] = []

        def one(key_type: int, value: bytes | None) -> None:
            if value is not None:
                out.append((bytes([key_type]), value))

        one(T.REDEEM_SCRIPT, self.redeem_script)
        one(T.WITNESS_SCRIPT, self.witness_script)
        out += keyed(
            T.BIP32_DERIVATION, ((k, encode_origin(v)) for k, v in self.bip32_derivations.items())
        )
        if version == 2:
            one(T.AMOUNT, self.amount.to_bytes(8, "little", signed=True))
            one(T.SCRIPT, self.script)
        proprietary, unknown = tail_records(self.proprietary, self.unknown)
        out += proprietary  # Core writes an output's proprietary pairs before its taproot ones
        one(T.TAP_INTERNAL_KEY, self.tap_internal_key)
        if self.tap_tree is not None:
            one(T.TAP_TREE, encode_tap_tree(self.tap_tree))
        out += keyed(
            T.TAP_BIP32_DERIVATION,
            ((k, _tap_origin_sorted(v)) for k, v in self.tap_bip32_derivations.items()),
        )
        out += keyed(
            T.MUSIG2_PARTICIPANT_PUBKEYS,
            ((k, encode_musig2_participants(v)) for k, v in self.musig2_participants.items()),
        )
        return out + unknown

    def merge(self, other: PsbtOutput) -> None:
        """BIP174 combiner for one output: keep every field of either; ours wins on a clash."""
        merge_maps(self, other)


def _set_out_redeem(out: PsbtOutput, value: bytes) -> None:
    out.redeem_script = value


def _set_out_witness_script(out: PsbtOutput, value: bytes) -> None:
    out.witness_script = value


def _set_amount(out: PsbtOutput, value: bytes) -> None:
    if len(value) != 8:
        raise PsbtError(f"value is {len(value)} bytes, an amount is 8 bytes")
    amount = int.from_bytes(value, "little", signed=True)
    if not 0 <= amount <= MAX_MONEY:
        raise PsbtError(f"amount {amount} is out of range 0..{MAX_MONEY}")
    out.amount = amount


def _set_script(out: PsbtOutput, value: bytes) -> None:
    out.script = value


def _set_out_internal_key(out: PsbtOutput, value: bytes) -> None:
    out.tap_internal_key = check_xonly(value, "internal key")


def _set_tap_tree(out: PsbtOutput, value: bytes) -> None:
    out.tap_tree = decode_tap_tree(value)


_OUTPUT_SCALARS: dict[int, Callable[[PsbtOutput, bytes], None]] = {
    OutputType.REDEEM_SCRIPT: _set_out_redeem,
    OutputType.WITNESS_SCRIPT: _set_out_witness_script,
    OutputType.AMOUNT: _set_amount,
    OutputType.SCRIPT: _set_script,
    OutputType.TAP_INTERNAL_KEY: _set_out_internal_key,
    OutputType.TAP_TREE: _set_tap_tree,
}
