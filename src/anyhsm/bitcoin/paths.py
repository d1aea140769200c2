"""Path policy: under which BIP32 paths an HD key signs inputs, and which outputs are change.

A PSBT names the paths of its keys, and nothing stops it naming the master key ``m``,
another coin type (a testnet key on mainnet), another account, or index 2,000,000,000.
A signature at such a path is one the wallet never meant to make; a "change" output at
such a path is one the wallet will never look for. Two rules, each named in the
refusal or warning it causes:

``input-path``
    An HD key signs an input only at a path under one of its allowed account prefixes:
    ``policy.key_input_paths.<label>`` if set for the key, else ``policy.allowed_input_paths``,
    else the network's defaults: the accounts of BIP44/49/84/86 and BIP48
    (``m/<purpose>'/<coin>'/*'`` with the network's coin type: 0 on mainnet, 1 on the
    test networks). On the test networks the default also accepts any path whose first
    step is not one of those purposes (non-BIP44 layouts such as the ``m/0'/0'/k'`` of
    Bitcoin Core's legacy wallets and of the BIP174 test vectors); mainnet accepts them
    only when configured. The master key itself (``m``) never signs an input, whatever
    is configured. Single (non-HD) keys have no path and are not affected.

``change-path``
    An output paying one of our keys is change only when its path is the path of an
    input the same key signs with the branch (second-to-last step) set to 1 and an
    unhardened index below ``policy.max_change_index``: same purpose, coin type,
    account (and BIP48 script type) as the inputs. For a non-BIP44 layout (accepted
    as above) a hardened branch 1' or a sibling of a signed input's path (same parent)
    is also change. Anything else paying our key is shown as an outgoing payment, with
    a warning naming the rule.

Patterns are written as paths whose steps may be ``*`` (any unhardened index) or
``*'`` (any hardened index); a path is under a pattern when its first steps match it,
and it is at least as long.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from anyhsm.bitcoin.bip32 import HARDENED, format_path
from anyhsm.bitcoin.networks import params
from anyhsm.config import PolicyConfig
from anyhsm.errors import ConfigError
from anyhsm.types import Network

INPUT_PATH_RULE = "input-path"
CHANGE_PATH_RULE = "change-path"

# purposes whose account layout is m/purpose'/coin'/account'/... (BIP44, 49, 84, 86; 48)
SINGLE_KEY_PURPOSES = (44, 49, 84, 86)
ACCOUNT_PURPOSES = (*SINGLE_KEY_PURPOSES, 48)
_PURPOSE_STEPS = frozenset(p | HARDENED for p in ACCOUNT_PURPOSES)

_ANY_HARDENED = -2  # a pattern step "*'"
_ANY = -1  # a pattern step "*"

Pattern = tuple[int, ...]


def parse_pattern(text: str) -> Pattern:
    """``m/84'/0'/*'`` to steps (wildcards as negative markers); ValueError if invalid."""
    parts = text.strip().split("/")
    if not parts or parts[0] not in ("m", "M"):
        raise ValueError("a path pattern starts with m/")
    steps: list[int] = []
    for part in parts[1:]:
        hardened = part[-1:] in ("'", "h", "H")
        body = part[:-1] if hardened else part
        if body == "*":
            steps.append(_ANY_HARDENED if hardened else _ANY)
            continue
        if not body.isdigit() or not body.isascii() or int(body) >= HARDENED:
            raise ValueError(f"step {part!r} is not an index below 2^31 or a wildcard")
        steps.append(int(body) | (HARDENED if hardened else 0))
    if not steps:
        raise ValueError("the master key (m) itself never signs an input")
    return tuple(steps)


def pattern_problem(text: str) -> str | None:
    """Why ``text`` is not a valid path pattern (None when it is)."""
    try:
        parse_pattern(text)
    except ValueError as e:
        return str(e)
    return None


def format_pattern(p: Pattern) -> str:
    return "m/" + "/".join(
        "*'" if s == _ANY_HARDENED else "*" if s == _ANY else format_path((s,), prefix="")
        for s in p
    )


def default_patterns(network: Network) -> tuple[Pattern, ...]:
    """The accounts of BIP44/49/84/86 and BIP48 for the network's coin type."""
    coin = params(network).coin_type | HARDENED
    return tuple((p | HARDENED, coin, _ANY_HARDENED) for p in ACCOUNT_PURPOSES)


def _matches(pattern: Pattern, path: Sequence[int]) -> bool:
    if len(path) < len(pattern):
        return False
    for want, got in zip(pattern, path, strict=False):
        if want == _ANY_HARDENED:
            if got < HARDENED:
                return False
        elif want == _ANY:
            if got >= HARDENED:
                return False
        elif want != got:
            return False
    return True


@dataclass(frozen=True)
class KeyPaths:
    """The input-path rule for one key."""

    patterns: tuple[Pattern, ...]
    other_layouts: bool  # default on a test network: non-BIP44 layouts are accepted
    source: str  # the setting the patterns come from, for messages

    def input_problem(self, path: Sequence[int], network: Network) -> str | None:
        """Why this key must not sign at ``path`` (None when it may)."""
        if not path:
            return (
                "the master key itself (m) never signs an input; sign with a key derived "
                "under an account"
            )
        if any(_matches(p, path) for p in self.patterns):
            return None
        if self.other_layouts and path[0] not in _PURPOSE_STEPS:
            return None
        shown = ", ".join(format_pattern(p) for p in self.patterns) or "none"
        why = f"{format_path(path)} is not under an allowed account ({self.source}: {shown})"
        coin = params(network).coin_type
        if len(path) >= 2 and path[0] in _PURPOSE_STEPS and path[1] != coin | HARDENED:
            other = path[1] & ~HARDENED if path[1] >= HARDENED else path[1]
            why += f"; coin type {other} is not the one of {network.value} ({coin})"
        return why


def _parse_all(patterns: Sequence[str], setting: str) -> tuple[Pattern, ...]:
    out = []
    for text in patterns:
        try:
            out.append(parse_pattern(text))
        except ValueError as e:
            raise ConfigError(
                f"{setting}: {text!r} is not a path pattern: {e}",
                hint="write account prefixes such as \"m/84'/0'/*'\"; see 'anyhsm config check'",
            ) from None
    return tuple(out)


class PathRules:
    """The path policy of one signing: input paths per key, and the change rule."""

    def __init__(self, network: Network, policy: PolicyConfig) -> None:
        self.network = network
        self.max_change_index = policy.max_change_index
        self._by_key = dict(policy.key_input_paths)
        self._keys: dict[str, KeyPaths] = {}
        self._allowed: set[tuple[str, tuple[int, ...]]] = set()  # (label, allowed prefix)
        configured = _parse_all(policy.allowed_input_paths, "policy.allowed_input_paths")
        if configured:
            self._default = KeyPaths(configured, False, "policy.allowed_input_paths")
        else:
            self._default = KeyPaths(
                default_patterns(network),
                network is not Network.MAINNET,
                f"the defaults for {network.value}",
            )

    def for_key(self, label: str) -> KeyPaths:
        known = self._keys.get(label)
        if known is not None:
            return known
        patterns = self._by_key.get(label)
        if patterns is None:
            kp = self._default
        else:
            setting = f"policy.key_input_paths.{label}"
            kp = KeyPaths(_parse_all(patterns, setting), False, setting)
        self._keys[label] = kp
        return kp

    def input_problem(self, label: str, path: Sequence[int]) -> str | None:
        """Why key ``label`` must not sign at ``path``. Whether a path is allowed depends
        only on its first D steps once it has D, D the longest pattern's length (a
        pattern matches a prefix; the other-layouts rule looks at the first step), so
        an allowed prefix is remembered: the inputs of one account are judged once."""
        kp = self.for_key(label)
        depth = max((len(p) for p in kp.patterns), default=1) or 1
        if len(path) < depth:
            return kp.input_problem(path, self.network)
        head = (label, tuple(path[:depth]))
        if head in self._allowed:
            return None
        why = kp.input_problem(path, self.network)
        if why is None:
            self._allowed.add(head)
        return why

    def change_problem(
        self,
        label: str,
        path: Sequence[int],
        signed: Mapping[str, Sequence[Sequence[int]]],
        confirmed: Callable[[str, tuple[int, ...]], bool] | None = None,
    ) -> str | None:
        """Why an output paying key ``label`` at ``path`` is not change (None when it is).
        ``signed`` maps each key label to the paths of the inputs it would sign;
        ``confirmed`` says whether the key at such a path really is the one the input
        names (asked only of the input that makes the output change: an input naming
        our fingerprint at another account, with a key not ours, must not make an
        output at that account look like change)."""
        inputs = [p for p in signed.get(label, ()) if len(p) >= 2]
        where = f"{format_path(path)} of key {label}"
        if not inputs:
            return f"{where}: no input of this PSBT is signed by that key under an account"
        if len(path) < 2:
            return f"{where} is not under the account of any input"
        strict = path[0] in _PURPOSE_STEPS  # an account layout: branch 1, unhardened index
        for inp in inputs:
            if len(inp) != len(path) or tuple(inp[:-2]) != tuple(path[:-2]):
                continue
            if strict:
                branch_ok = path[-2] == 1
                index = path[-1]
            else:  # a non-BIP44 layout: branch 1 or 1', or a sibling of the input
                branch_ok = path[-2] in (1, 1 | HARDENED) or path[-2] == inp[-2]
                index = path[-1] & ~HARDENED
            if not branch_ok:
                continue
            if index >= self.max_change_index:
                shown_index = format_path(path[-1:], prefix="")
                return (
                    f"{where}: index {shown_index} is not below policy.max_change_index = "
                    f"{self.max_change_index}"
                )
            if confirmed is not None and not confirmed(label, tuple(inp)):
                continue
            return None
        shown = ", ".join(sorted({format_path(p) for p in inputs})[:3])
        return (
            f"{where} is not on the change branch (1) of the account of an input it signs ({shown})"
        )


__all__ = [
    "CHANGE_PATH_RULE",
    "INPUT_PATH_RULE",
    "KeyPaths",
    "PathRules",
    "default_patterns",
    "format_pattern",
    "parse_pattern",
    "pattern_problem",
]
