"""BIP39: the 24 English vectors (entropy -> mnemonic -> seed -> xprv), invalid mnemonics, fuzz."""

from __future__ import annotations

import contextlib
import hashlib
from importlib import resources

import pytest
from embit import bip39 as embit_bip39
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.vectors import load_json

from anyhsm.bitcoin.bip32 import ExtendedKey
from anyhsm.bitcoin.bip39 import (
    WORDLIST_SHA256,
    entropy_to_mnemonic,
    generate_mnemonic,
    mnemonic_to_entropy,
    mnemonic_to_seed,
    suggest_words,
    validate_mnemonic,
    wordlist,
)
from anyhsm.errors import MnemonicError
from anyhsm.secret import SecretBytes

_DATA = load_json("bip39")
assert isinstance(_DATA, dict)
VECTORS = [tuple(v) for v in _DATA["english"]]


def test_vector_count() -> None:
    assert len(VECTORS) == 24


@pytest.mark.parametrize(("entropy", "mnemonic", "seed", "xprv"), VECTORS)
def test_official_vector(entropy: str, mnemonic: str, seed: str, xprv: str) -> None:
    assert entropy_to_mnemonic(bytes.fromhex(entropy)) == mnemonic
    words = len(mnemonic.split())
    assert generate_mnemonic(words, bytes.fromhex(entropy)) == mnemonic
    assert validate_mnemonic(mnemonic) == mnemonic
    with mnemonic_to_entropy(mnemonic) as ent:
        assert ent.reveal().hex() == entropy
    with mnemonic_to_seed(mnemonic, "TREZOR") as s:
        assert isinstance(s, SecretBytes)
        assert s.reveal().hex() == seed
        assert str(ExtendedKey.from_seed(s)) == xprv


def test_wordlist_package_data() -> None:
    data = resources.files("anyhsm.bitcoin").joinpath("wordlist_english.txt").read_bytes()
    assert hashlib.sha256(data).hexdigest() == WORDLIST_SHA256
    words = wordlist()
    assert len(words) == 2048 and words[0] == "abandon" and words[-1] == "zoo"
    assert len({w[:4] for w in words}) == 2048  # unique four-letter prefixes


@pytest.mark.parametrize("words", [12, 15, 18, 21, 24])
def test_generate(words: int) -> None:
    m = generate_mnemonic(words)
    assert len(m.split()) == words
    assert validate_mnemonic(m) == m
    assert generate_mnemonic(words) != m  # os.urandom, not a constant
    # embit agrees the mnemonic is valid and gives the same seed
    assert embit_bip39.mnemonic_is_valid(m)
    with mnemonic_to_seed(m, "pw") as s:
        assert s.reveal() == embit_bip39.mnemonic_to_seed(m, "pw")


def test_normalisation() -> None:
    m = "abandon " * 11 + "about"
    canonical = m.strip()
    assert (
        validate_mnemonic(
            "  ABANDON  abandon\tabandon abandon abandon abandon abandon abandon "
            "abandon abandon abandon\nAbout "
        )
        == canonical
    )
    messy = "  " + canonical.upper().replace(" ", "\u3000", 1) + "\n"
    with mnemonic_to_seed(messy) as a, mnemonic_to_seed(canonical) as b:
        assert a.equals(b)
    # NFKD of the passphrase: composed and decomposed forms give one seed
    with (
        mnemonic_to_seed(canonical, "caf\u00e9") as a,
        mnemonic_to_seed(canonical, "cafe\u0301") as b,
    ):
        assert a.equals(b)
        # (embit does not normalise passphrases, so compare with PBKDF2 directly)
        salt = b"mnemonic" + "cafe\u0301".encode()
        assert a.reveal() == hashlib.pbkdf2_hmac("sha512", canonical.encode(), salt, 2048)


def test_unvalidated_seed_matches_bip39_reference() -> None:
    text = "this is not a bip39 mnemonic"
    with mnemonic_to_seed(text, "x", validate=False) as s:
        expected = hashlib.pbkdf2_hmac("sha512", text.encode(), b"mnemonicx", 2048)
        assert s.reveal() == expected
    with pytest.raises(MnemonicError):
        mnemonic_to_seed(text)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("abandon " * 11 + "abandon", "checksum"),
        ("abandon " * 11 + "abot", "word 12 is not a BIP39"),
        ("abandon " * 10 + "abandn about", "word 11"),
        ("abandon " * 11, "not 11"),
        ("abandon " * 12 + "about", "not 13"),
        ("", "not 0"),
        ("zoo " * 24, "checksum"),
        ("about " * 25, "not 25"),
        ("abandon " * 11 + "ab0ut", "not a BIP39"),
        ("x" * 2000, "too long"),
    ],
)
def test_invalid_mnemonics(text: str, words: str) -> None:
    with pytest.raises(MnemonicError, match=words.replace("(", r"\(").replace(")", r"\)")):
        validate_mnemonic(text)
    with pytest.raises(MnemonicError):
        mnemonic_to_seed(text)
    with pytest.raises(MnemonicError):
        mnemonic_to_entropy(text)


def test_unknown_word_is_named_by_position_only() -> None:
    # the word is part of a secret: neither it nor suggestions appear in the error
    for typo in ("abot", "zebrr", "abou"):
        with pytest.raises(MnemonicError) as info:
            validate_mnemonic("abandon " * 11 + typo)
        text = str(info.value)
        assert "word 12" in text
        assert typo not in text and "about" not in text and "zebra" not in text


def test_suggest_words() -> None:
    assert "about" in suggest_words("abot")
    assert "zebra" in suggest_words("zebrr")
    assert "about" in suggest_words("abou")


def test_entropy_errors() -> None:
    with pytest.raises(MnemonicError, match="16, 20, 24, 28 or 32"):
        entropy_to_mnemonic(b"\0" * 17)
    with pytest.raises(MnemonicError, match="need 16 bytes"):
        generate_mnemonic(12, b"\0" * 32)
    with pytest.raises(MnemonicError, match="not 13"):
        generate_mnemonic(13)
    with SecretBytes(bytes(32)) as ent:
        assert entropy_to_mnemonic(ent).split()[-1] == "art"


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=16, max_size=32).filter(lambda b: len(b) % 4 == 0))
def test_round_trip_and_embit(entropy: bytes) -> None:
    m = entropy_to_mnemonic(entropy)
    assert m == embit_bip39.mnemonic_from_bytes(entropy)
    with mnemonic_to_entropy(m) as e:
        assert e.reveal() == entropy


_WORDS = [*wordlist()[:40], "about", "abot", "zoo", "", " ", "\u3000", "ABOUT", "é"]


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200) | st.lists(st.sampled_from(_WORDS), max_size=26).map(" ".join))
def test_fuzz_validate(text: str) -> None:
    with contextlib.suppress(MnemonicError):
        assert embit_bip39.mnemonic_is_valid(validate_mnemonic(text))
