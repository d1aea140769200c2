"""BIP39 mnemonic sentences (English wordlist): generate, validate, and turn into a seed.

The English wordlist is package data (``wordlist_english.txt``, source noted below); its
SHA-256 is checked against the published value every time the list is loaded.

A mnemonic is a secret, and Python strings cannot be wiped: callers should keep mnemonics in
memory as briefly as they can. Entropy and seeds are returned as :class:`SecretBytes`.
"""

from __future__ import annotations

import difflib
import hashlib
import hmac
import os
import re
import unicodedata
from functools import lru_cache
from importlib import resources

from anyhsm.errors import MnemonicError
from anyhsm.secret import SecretBytes, wipe

# Wordlist source: embit 0.8.0 ``embit/wordlists/bip39.py`` WORDLIST (MIT licence), which is the
# bitcoin/bips ``bip-0039/english.txt`` list (BSD-2-Clause), one word a line + final newline.
WORDLIST_SHA256 = "2f5eed53a4727b4bf8880d8f3f199efc90e58503646d9ff8eff3a2ed3b24dbda"
PBKDF2_ROUNDS = 2048
WORD_COUNTS = (12, 15, 18, 21, 24)
_MAX_TEXT = 1024  # 24 words of at most 8 letters need far less; anything longer is not a mnemonic
_SPLIT = re.compile(r"[\s\u3000]+")


@lru_cache(maxsize=1)
def _wordlist() -> tuple[tuple[str, ...], dict[str, int]]:
    data = resources.files("anyhsm.bitcoin").joinpath("wordlist_english.txt").read_bytes()
    if hashlib.sha256(data).hexdigest() != WORDLIST_SHA256:
        raise MnemonicError(
            "the installed BIP39 English wordlist is corrupted (SHA-256 mismatch)",
            hint="reinstall anyhsm",
        )
    words = tuple(data.decode("ascii").split("\n")[:-1])
    return words, {w: i for i, w in enumerate(words)}


def wordlist() -> tuple[str, ...]:
    """The 2048 English BIP39 words, in order."""
    return _wordlist()[0]


def _entropy_bytes_for(words: int) -> int:
    if words not in WORD_COUNTS:
        raise MnemonicError(
            f"a BIP39 mnemonic has 12, 15, 18, 21 or 24 words, not {words}",
            hint="check that no word is missing or doubled",
        )
    return words * 4 // 3


def entropy_to_mnemonic(entropy: bytes | bytearray | SecretBytes) -> str:
    """Encode 16, 20, 24, 28 or 32 bytes of entropy as a mnemonic sentence."""
    ent = entropy.buffer if isinstance(entropy, SecretBytes) else entropy
    if len(ent) not in (16, 20, 24, 28, 32):
        raise MnemonicError(
            f"BIP39 entropy must be 16, 20, 24, 28 or 32 bytes, not {len(ent)}",
        )
    words = wordlist()
    checksum_bits = len(ent) // 4
    digest = hashlib.sha256(ent).digest()
    acc = int.from_bytes(ent, "big") << checksum_bits | digest[0] >> (8 - checksum_bits)
    total = len(ent) * 8 + checksum_bits
    out = [words[(acc >> (total - 11 * (i + 1))) & 0x7FF] for i in range(total // 11)]
    return " ".join(out)


def generate_mnemonic(words: int = 12, entropy: bytes | bytearray | None = None) -> str:
    """A new mnemonic of ``words`` words from ``entropy`` (``os.urandom`` when not given)."""
    size = _entropy_bytes_for(words)
    if entropy is not None:
        if len(entropy) != size:
            raise MnemonicError(
                f"{words} words need {size} bytes of entropy, {len(entropy)} were given"
            )
        return entropy_to_mnemonic(entropy)
    buf = bytearray(os.urandom(size))
    try:
        return entropy_to_mnemonic(buf)
    finally:
        wipe(buf)


def _split_words(text: str) -> list[str]:
    if not isinstance(text, str):
        raise MnemonicError("a mnemonic must be text")
    if len(text) > _MAX_TEXT:
        raise MnemonicError(f"text of {len(text)} characters is too long to be a BIP39 mnemonic")
    norm = unicodedata.normalize("NFKD", text).lower()
    return [w for w in _SPLIT.split(norm.strip()) if w]


def suggest_words(word: str) -> list[str]:
    """Close BIP39 words, for an interactive UI that shows them to the word's owner."""
    words, _ = _wordlist()
    out: list[str] = []
    # Every BIP39 English word is identified by its first four letters.
    if len(word) >= 3:
        out.extend(w for w in words if w.startswith(word[:4]))
    for w in difflib.get_close_matches(word, words, n=4, cutoff=0.6):
        if w not in out:
            out.append(w)
    return out[:4]


def _indexes(words: list[str]) -> list[int]:
    _entropy_bytes_for(len(words))
    _, index = _wordlist()
    out: list[int] = []
    for pos, w in enumerate(words, start=1):
        i = index.get(w)
        if i is None:
            # The word itself is part of a secret: name its position, never the word
            # (nor suggestions, which reveal it); suggest_words() is there for a UI.
            raise MnemonicError(
                f"word {pos} is not a BIP39 English word",
                hint="check its spelling against the BIP39 English wordlist "
                "(each word is identified by its first four letters)",
            )
        out.append(i)
    return out


def mnemonic_to_entropy(mnemonic: str) -> SecretBytes:
    """Decode and check a mnemonic; return its entropy (the caller wipes it)."""
    words = _split_words(mnemonic)
    idx = _indexes(words)
    total = 11 * len(idx)
    checksum_bits = total // 33
    acc = 0
    for i in idx:
        acc = acc << 11 | i
    ent = bytearray((acc >> checksum_bits).to_bytes((total - checksum_bits) // 8, "big"))
    try:
        expected = hashlib.sha256(ent).digest()[0] >> (8 - checksum_bits)
        if not hmac.compare_digest(bytes([expected]), bytes([acc & ((1 << checksum_bits) - 1)])):
            raise MnemonicError(
                "mnemonic checksum does not match",
                hint="a word is wrong or words are out of order; check each word and its position",
            )
        return SecretBytes(ent)
    finally:
        wipe(ent)


def validate_mnemonic(text: str) -> str:
    """Check a mnemonic (word count, words, checksum); return it in canonical form.

    The canonical form is lower case, NFKD, words separated by single spaces. On error the
    message names the problem; for an unknown word it names the word and its position and
    suggests close words (the word shown is not a valid BIP39 word, but it is likely a typo
    of one: such messages should not be logged where a secret could not be).
    """
    mnemonic_to_entropy(text).wipe()
    return " ".join(_split_words(text))


def mnemonic_to_seed(mnemonic: str, passphrase: str = "", *, validate: bool = True) -> SecretBytes:
    """The 64-byte BIP39 seed: PBKDF2-HMAC-SHA512(NFKD mnemonic, "mnemonic" + NFKD passphrase).

    With ``validate`` (the default) the mnemonic must be a valid English BIP39 mnemonic and is
    used in canonical form; with ``validate=False`` any text is accepted as BIP39 allows and
    used exactly as given after NFKD normalisation (for mnemonics of other wordlists).
    """
    if not isinstance(passphrase, str):
        raise MnemonicError("the BIP39 passphrase must be text")
    if validate:
        text = validate_mnemonic(mnemonic)
    else:
        if not isinstance(mnemonic, str):
            raise MnemonicError("a mnemonic must be text")
        text = unicodedata.normalize("NFKD", mnemonic)
    password = bytearray(text.encode("utf-8"))
    salt = bytearray(("mnemonic" + unicodedata.normalize("NFKD", passphrase)).encode("utf-8"))
    try:
        return SecretBytes(hashlib.pbkdf2_hmac("sha512", password, salt, PBKDF2_ROUNDS))
    finally:
        wipe(password)
        wipe(salt)
