"""Whether a key's provider can make the signatures an output type needs.

One answer for the signer (why an input is left unsigned) and for the commands that
hand out addresses and descriptors: an address whose coins the key can never spend
(a taproot address for a PKCS#11 key, which signs ECDSA only) is refused, not given.
"""

from __future__ import annotations

from anyhsm.errors import UnsupportedOperation
from anyhsm.types import Capabilities, SigScheme


def signing_refusal(
    caps: Capabilities, provider: str, scheme: SigScheme, tweak: bool
) -> str | None:
    """Why ``provider`` cannot make a ``scheme`` signature (with the BIP341 tweak when
    ``tweak``), or None when it can."""
    if scheme not in caps.schemes:
        what = "BIP340 (Schnorr)" if scheme is SigScheme.SCHNORR else "ECDSA"
        return f"provider {provider} cannot make {what} signatures"
    if tweak and not caps.can_tweak:
        return f"provider {provider} cannot apply the BIP341 taproot tweak"
    return None


def require_spendable(caps: Capabilities, provider: str, label: str, taproot: bool) -> None:
    """UnsupportedOperation unless the key can spend the outputs it would be given: a
    key-path taproot output needs a tweaked BIP340 signature, the others ECDSA."""
    scheme = SigScheme.SCHNORR if taproot else SigScheme.ECDSA
    why = signing_refusal(caps, provider, scheme, tweak=taproot)
    if why is not None:
        kind = "taproot (P2TR)" if taproot else "ECDSA"
        raise UnsupportedOperation(
            provider,
            f"{kind} outputs for key {label!r}: {why}, so coins sent there could never be spent",
            hint="use another output type (p2wpkh, wpkh), or a key in a provider that can sign it",
        )
