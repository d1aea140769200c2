"""Showing a new seed's mnemonic is an export of the seed.

``key create --type bip32 --mnemonic-words N`` makes an HD key from a fresh BIP39
mnemonic. Whoever reads the words owns the key, so displaying them obeys the same policy
as ``key export``: the configuration must allow export (``[policy] allow_export``) and
the key must be recorded exportable; the display is asked for explicitly
(``--show-mnemonic-once``) and audited as an ``export_key`` entry with
``what=mnemonic`` (never the words). Without the request the words are not shown: the
seed exists only in the store. The decision lives here, not in the CLI, so every front
end applies it.
"""

from __future__ import annotations

from dataclasses import dataclass

from anyhsm.config import Config
from anyhsm.errors import ExportNotAllowed
from anyhsm.hsm import Hsm
from anyhsm.types import KeyInfo, KeyType


@dataclass(frozen=True)
class NewMnemonicKey:
    """A key made from a fresh mnemonic; ``mnemonic`` is set only when it may be shown."""

    info: KeyInfo
    mnemonic: str | None

    def __repr__(self) -> str:  # the words never reach a repr or a log line
        shown = "shown" if self.mnemonic is not None else "not shown"
        return f"<NewMnemonicKey {self.info.label} ({self.info.id}) mnemonic {shown}>"


def seed_display_refusal(config: Config, *, exportable: bool) -> str | None:
    """Why the words of a new seed may not be shown, or None when they may: the rules of
    ``export_key`` (policy and the key's exportable flag), checked before the key exists."""
    reasons: list[str] = []
    if not config.policy.allow_export:
        reasons.append(
            f"the configuration ({config.environment.value}) does not allow export "
            "([policy] allow_export = false)"
        )
    if not exportable:
        reasons.append("the key would be recorded as non-exportable (create it --exportable)")
    return "; ".join(reasons) or None


def create_mnemonic_key(
    hsm: Hsm, label: str, words: int, *, exportable: bool, show_once: bool
) -> NewMnemonicKey:
    """Create an HD key from a new ``words``-word mnemonic; return the words only when
    ``show_once`` asks for the backup display and :func:`seed_display_refusal` allows it.

    A refused display fails before any key is made, and is audited as a refused
    ``export_key``; an allowed one is audited after the key is stored.
    """
    from anyhsm.bitcoin.bip39 import generate_mnemonic, mnemonic_to_seed

    detail = {"what": "mnemonic", "via": "backup_display", "label": label[:128]}
    if show_once:
        refusal = seed_display_refusal(hsm.config, exportable=exportable)
        if refusal is not None:
            err = ExportNotAllowed(
                f"showing the mnemonic of a new key is an export, and it is refused: {refusal}",
                hint="set [policy] allow_export = true and add --exportable for a one-time "
                "backup display, or create the key without --show-mnemonic-once",
            )
            hsm.record_event("export_key", "refused", {**detail, "reason": refusal[:300]},
                             error=err.code)  # fmt: skip
            raise err
    mnemonic = generate_mnemonic(words)
    with mnemonic_to_seed(mnemonic) as seed:
        info = hsm.import_key(label, seed, KeyType.BIP32, exportable=exportable)
    if not show_once:
        return NewMnemonicKey(info, None)
    hsm.record_event("export_key", "ok", detail, key_id=info.id)
    return NewMnemonicKey(info, mnemonic)
