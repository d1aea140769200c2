"""Standard single-key account layouts: BIP44 (P2PKH), BIP49 (P2SH-P2WPKH), BIP84 (P2WPKH),
BIP86 (P2TR key path).

An account lives at ``m / purpose' / coin_type' / account'`` and its addresses at
``.../change/index`` (change 0 = receiving, 1 = change). Coin type is 0 on mainnet and 1 on
every test network (SLIP-44).
"""

from __future__ import annotations

import enum

from anyhsm.bitcoin.networks import params
from anyhsm.errors import Bip32Error
from anyhsm.types import Network

HARDENED = 0x80000000


class OutputType(enum.Enum):
    """What kind of output script a wallet account uses (Bitcoin Core's "output type").

    Not to be confused with :class:`anyhsm.bitcoin.script.ScriptType`, which classifies an
    arbitrary scriptPubKey.
    """

    P2PKH = "p2pkh"
    P2SH_P2WPKH = "p2sh-p2wpkh"
    P2WPKH = "p2wpkh"
    P2TR = "p2tr"
    P2SH_P2WSH = "p2sh-p2wsh"  # multisig; only implied by SLIP-132 Ypub/Upub
    P2WSH = "p2wsh"  # multisig; only implied by SLIP-132 Zpub/Vpub


class Purpose(enum.IntEnum):
    """BIP43 purpose numbers of the single-key account layouts."""

    BIP44 = 44
    BIP49 = 49
    BIP84 = 84
    BIP86 = 86

    @property
    def output_type(self) -> OutputType:
        return _SCRIPT_TYPES[self]

    @classmethod
    def parse(cls, text: str | int) -> Purpose:
        """Accept 84, "84", "bip84", "BIP-84", or a script type name such as "p2wpkh"."""
        if isinstance(text, int):
            try:
                return cls(text)
            except ValueError:
                raise Bip32Error(
                    f"unknown account purpose {text}", hint="use 44, 49, 84 or 86"
                ) from None
        norm = text.strip().lower().replace("-", "").replace("_", "")
        if norm.startswith("bip"):
            norm = norm[3:]
        if norm.isascii() and norm.isdigit() and len(norm) <= 3:
            return cls.parse(int(norm))
        for purpose, stype in _SCRIPT_TYPES.items():
            if stype.value.replace("-", "") == norm:
                return purpose
        raise Bip32Error(
            f"unknown account purpose {text!r}",
            hint="use 44, 49, 84, 86 or p2pkh, p2sh-p2wpkh, p2wpkh, p2tr",
        )


_SCRIPT_TYPES = {
    Purpose.BIP44: OutputType.P2PKH,
    Purpose.BIP49: OutputType.P2SH_P2WPKH,
    Purpose.BIP84: OutputType.P2WPKH,
    Purpose.BIP86: OutputType.P2TR,
}


def script_type(purpose: Purpose) -> OutputType:
    """The output type a purpose's accounts use (BIP44 P2PKH ... BIP86 P2TR)."""
    return _SCRIPT_TYPES[Purpose(purpose)]


def purpose_for(output_type: OutputType) -> Purpose:
    """The purpose whose accounts use ``output_type`` (single-key types only)."""
    for purpose, st in _SCRIPT_TYPES.items():
        if st is output_type:
            return purpose
    raise Bip32Error(f"no single-key account purpose uses {output_type.value}")


def coin_type(network: Network) -> int:
    """SLIP-44 coin type: 0 for mainnet, 1 for every test network."""
    return params(network).coin_type


def _check_index(value: int, what: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < HARDENED:
        raise Bip32Error(f"{what} must be an integer in 0..2^31-1, not {value!r}")


def account_path(purpose: Purpose, network: Network, account: int = 0) -> tuple[int, ...]:
    """``purpose' / coin_type' / account'`` as BIP32 indexes."""
    _check_index(account, "account number")
    p = Purpose(purpose)
    return (p | HARDENED, coin_type(network) | HARDENED, account | HARDENED)


def address_path(
    purpose: Purpose, network: Network, account: int = 0, change: int = 0, index: int = 0
) -> tuple[int, ...]:
    """Full path of one address: ``account_path / change / index``."""
    if change not in (0, 1):
        raise Bip32Error(f"change must be 0 (receiving) or 1 (change), not {change!r}")
    _check_index(index, "address index")
    return (*account_path(purpose, network, account), change, index)
