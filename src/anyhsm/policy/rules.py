"""The spending policy file: TOML ``[[rules]]`` tables, parsed and checked into values.

Public contract (issue 13): each ``[[rules]]`` table has a ``name`` and any of ``keys``
(labels or ids; omitted: every key), ``max_per_tx_sat``, ``max_per_period_sat`` with
``period`` ("10m", "1h", "24h", ...), ``destinations`` (addresses), ``approvals = { m,
approvers = [33-byte pubkey hex, ...] }`` and ``action = "refuse" | "warn"``. The other
fields (output shape, time windows, scripts and descriptors as destinations, raw digest
signing) extend it; docs/policy.md describes every one.

The built-in rules (``network``, ``path``, ``sighash``, ``change``, ``fee``: the signer's
checks under ``[policy]``, docs/policy.md "Built-in rules") are implicit; a rule of the
file tightens them with ``max_fee_sat``, ``max_fee_rate_sat_vb``, ``sighash_types``,
``input_paths``, ``max_change_index`` and ``coin_type`` (scoped by ``keys``, refusing or
warning). A value looser than ``[policy]`` is refused by :func:`looser_than` when the
policy is set: loosening is a change of ``[policy]`` itself.

Parsing reports every problem at once (a :class:`~anyhsm.errors.ConfigError` whose
``problems`` list them). Addresses are read for the deployment's network; descriptors are
expanded to their scripts over their range once, when the file is parsed.
"""

from __future__ import annotations

import enum
import hashlib
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from typing import TYPE_CHECKING

from anyhsm.errors import ConfigError, HsmError
from anyhsm.types import Network

if TYPE_CHECKING:
    from zoneinfo import ZoneInfo

    from anyhsm.bitcoin.paths import KeyPaths
    from anyhsm.config import PolicyConfig

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_DURATION_RE = re.compile(r"([1-9][0-9]{0,8})(s|m|h|d)")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_HOURS_RE = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])-([01][0-9]|2[0-4]):([0-5][0-9])")
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
DEFAULT_BUCKETS = 24
MAX_BUCKETS = 1440
DEFAULT_DESCRIPTOR_RANGE = (0, 999)
MAX_DESCRIPTOR_SCRIPTS = 100_000
DEFAULT_APPROVAL_MAX_AGE = 86_400
MAX_RULES = 1000

# names of the rules the engine itself adds to a decision (docs/policy.md, "Order")
FROZEN_RULE = "frozen"
NO_RULE = "no-rule-matched"
RAW_DIGEST_RULE = "raw-digest"
# the built-in rules, implicit from [policy] (anyhsm.bitcoin.policy.BUILTIN_RULES)
BUILTIN_RULES = ("network", "path", "sighash", "change", "fee")
RESERVED_NAMES = frozenset((FROZEN_RULE, NO_RULE, RAW_DIGEST_RULE, *BUILTIN_RULES))

_TOP_KEYS = {"rules", "principals", "description", "approval_max_age"}
_RULE_KEYS = {
    "name",
    "keys",
    "action",
    "max_per_tx_sat",
    "max_per_period_sat",
    "period",
    "buckets",
    "destinations",
    "destination_scripts",
    "destination_descriptors",
    "descriptor_range",
    "max_outside_sat",
    "script_types",
    "max_inputs",
    "max_outputs",
    "op_return",
    "own_outputs",
    "hours",
    "days",
    "timezone",
    "approvals",
    "raw_digests",
    # the built-in rules' conditions (tighten [policy])
    "max_fee_sat",
    "max_fee_rate_sat_vb",
    "sighash_types",
    "input_paths",
    "max_change_index",
    "coin_type",
}
_APPROVAL_KEYS = {"m", "approvers", "max_age"}


class Action(enum.StrEnum):
    """What a broken rule does: refuse the transaction, or only warn."""

    REFUSE = "refuse"
    WARN = "warn"


@dataclass(frozen=True)
class Approvals:
    """M of the declared approver keys (33-byte compressed public keys) must approve;
    an approval may not expire later than ``max_age_s`` after it is submitted."""

    m: int
    approvers: tuple[bytes, ...]
    max_age_s: int = DEFAULT_APPROVAL_MAX_AGE


@dataclass(frozen=True)
class TimeWindow:
    """Signing allowed on ``days`` (0 = Monday) between ``start`` and ``end`` minutes of
    the day in ``timezone`` (an interval that wraps midnight when end <= start)."""

    days: frozenset[int]
    start: int
    end: int
    timezone: str = "UTC"
    text: str = ""

    def contains(self, when: datetime) -> bool:
        local = when.astimezone(_zone(self.timezone))
        minute = local.hour * 60 + local.minute
        if self.start < self.end:
            return local.weekday() in self.days and self.start <= minute < self.end
        # wraps midnight: the part after midnight belongs to the previous day's window
        if minute >= self.start:
            return local.weekday() in self.days
        return minute < self.end and (local.weekday() - 1) % 7 in self.days


@dataclass(frozen=True)
class Rule:
    """One named rule (see the module doc and docs/policy.md)."""

    name: str
    keys: tuple[str, ...] | None = None
    action: Action = Action.REFUSE
    max_per_tx_sat: int | None = None
    max_per_period_sat: int | None = None
    period_s: int | None = None
    buckets: int = DEFAULT_BUCKETS
    destinations: frozenset[bytes] | None = None  # scriptPubKeys
    destination_count: int = 0
    max_outside_sat: int = 0
    script_types: frozenset[str] | None = None
    max_inputs: int | None = None
    max_outputs: int | None = None
    op_return: bool = True
    own_outputs: bool = True
    window: TimeWindow | None = None
    approvals: Approvals | None = None
    raw_digests: bool = False
    # the built-in rules' conditions (see the module doc)
    max_fee_sat: int | None = None
    max_fee_rate_sat_vb: float | None = None
    sighash_types: tuple[int, ...] | None = None
    input_paths: KeyPaths | None = None
    max_change_index: int | None = None
    coin_type: bool = False
    signing_checks: bool = False  # any of the above: the signer's facts are needed

    def applies_to(self, label: str, key_id: str) -> bool:
        return self.keys is None or label in self.keys or key_id in self.keys

    @cached_property
    def bucket_width_s(self) -> int:
        """Seconds per velocity bucket: the period split in ``buckets``, rounded up."""
        assert self.period_s is not None
        return -(-self.period_s // self.buckets)

    @cached_property
    def period_text(self) -> str:
        """The period as a reason shows it ("24h")."""
        assert self.period_s is not None
        return format_duration(self.period_s)

    def describe(self) -> dict[str, object]:
        """What the rule says, for ``policy show`` (no derived scripts)."""
        out: dict[str, object] = {"name": self.name, "action": self.action.value}
        out["keys"] = list(self.keys) if self.keys is not None else None
        for name in ("max_per_tx_sat", "max_per_period_sat", "max_inputs", "max_outputs"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.period_s is not None:
            out["period"] = format_duration(self.period_s)
            out["buckets"] = self.buckets
        if self.destinations is not None:
            out["destinations"] = self.destination_count
            out["max_outside_sat"] = self.max_outside_sat
        if self.script_types is not None:
            out["script_types"] = sorted(self.script_types)
        if not self.op_return:
            out["op_return"] = False
        if not self.own_outputs:
            out["own_outputs"] = False
        if self.window is not None:
            out["window"] = self.window.text
        if self.approvals is not None:
            out["approvals"] = {
                "m": self.approvals.m,
                "approvers": [a.hex() for a in self.approvals.approvers],
                "max_age": format_duration(self.approvals.max_age_s),
            }
        if self.raw_digests:
            out["raw_digests"] = True
        for name in ("max_fee_sat", "max_fee_rate_sat_vb", "max_change_index"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.sighash_types is not None:
            from anyhsm.bitcoin.sighash import sighash_name

            out["sighash_types"] = [sighash_name(t) for t in self.sighash_types]
        if self.input_paths is not None:
            from anyhsm.bitcoin.paths import format_pattern

            out["input_paths"] = [format_pattern(p) for p in self.input_paths.patterns]
        if self.coin_type:
            out["coin_type"] = True
        return out


@dataclass(frozen=True)
class SpendingPolicy:
    """A parsed policy file: its rules in order, who holds which approver keys, and the
    SHA-256 of the file's bytes (its version, which approvals sign)."""

    rules: tuple[Rule, ...]
    sha256: str
    network: Network
    principals: Mapping[str, frozenset[bytes]] = field(default_factory=dict)
    description: str = ""
    approval_max_age_s: int = DEFAULT_APPROVAL_MAX_AGE

    def rules_for(self, label: str, key_id: str) -> tuple[Rule, ...]:
        return tuple(r for r in self.rules if r.applies_to(label, key_id))

    def approver_keys(self) -> frozenset[bytes]:
        return frozenset(a for r in self.rules if r.approvals for a in r.approvals.approvers)

    def approval_max_age(self, pubkey: bytes) -> int:
        """The longest an approval by ``pubkey`` may live (the largest max_age among the
        rules it approves for, within the policy's own cap)."""
        ages = [
            r.approvals.max_age_s
            for r in self.rules
            if r.approvals is not None and pubkey in r.approvals.approvers
        ]
        return min(max(ages, default=0), self.approval_max_age_s)


def policy_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def parse_duration(text: object) -> int | None:
    """Seconds of "30s", "10m", "1h", "24h", "7d"; None when not such a text."""
    if not isinstance(text, str):
        return None
    m = _DURATION_RE.fullmatch(text.strip())
    return None if m is None else int(m.group(1)) * _UNITS[m.group(2)]


def format_duration(seconds: int) -> str:
    """ "30s", "10m", "1h", "24h", "7d" (days from two on, as people write periods)."""
    if seconds % _UNITS["d"] == 0 and seconds >= 2 * _UNITS["d"]:
        return f"{seconds // _UNITS['d']}d"
    for unit in ("h", "m"):
        if seconds % _UNITS[unit] == 0:
            return f"{seconds // _UNITS[unit]}{unit}"
    return f"{seconds}s"


def _zone(name: str) -> ZoneInfo:
    from zoneinfo import ZoneInfo

    return ZoneInfo(name)


# --- parsing -------------------------------------------------------------------------------


class _Problems:
    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, where: str, message: str) -> None:
        self.items.append(f"{where}: {message}")


def parse_policy(data: bytes, network: Network, *, source: str = "policy file") -> SpendingPolicy:
    """The policy in ``data`` (TOML), for ``network``; ConfigError listing every problem."""
    try:
        raw = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{source} is not valid TOML: {e}") from None
    problems = _Problems()
    for key in raw:
        if key not in _TOP_KEYS:
            problems.add(key, "unknown setting (known: " + ", ".join(sorted(_TOP_KEYS)) + ")")
    max_age = DEFAULT_APPROVAL_MAX_AGE
    if "approval_max_age" in raw:
        parsed = parse_duration(raw["approval_max_age"])
        if parsed is None:
            problems.add("approval_max_age", 'must be a duration such as "24h"')
        else:
            max_age = parsed
    principals = _principals(raw.get("principals", {}), problems)
    tables = raw.get("rules", [])
    rules: list[Rule] = []
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        problems.add("rules", "must be an array of tables ([[rules]])")
        tables = []
    if len(tables) > MAX_RULES:
        problems.add("rules", f"at most {MAX_RULES} rules")
    seen: set[str] = set()
    for n, table in enumerate(tables):
        rule = _rule(table, n, network, problems)
        if rule is None:
            continue
        if rule.name in seen:
            problems.add(f"rules[{n}].name", f"{rule.name!r} is used by an earlier rule")
        seen.add(rule.name)
        rules.append(rule)
    description = raw.get("description", "")
    if not isinstance(description, str):
        problems.add("description", "must be a string")
        description = ""
    if problems.items:
        raise ConfigError(
            f"{source} has {len(problems.items)} problem(s): " + "; ".join(problems.items[:5]),
            hint="see docs/policy.md for every setting",
            problems=problems.items,
        )
    return SpendingPolicy(
        tuple(rules), policy_sha256(data), network, principals, description, max_age
    )


def _pubkey(text: object, where: str, problems: _Problems) -> bytes | None:
    from anyhsm.crypto import secp256k1 as ec

    if isinstance(text, str) and re.fullmatch(r"0[23][0-9a-fA-F]{64}", text):
        pub = bytes.fromhex(text)
        if ec.valid_public_key(pub):
            return pub
    problems.add(where, "must be a 33-byte compressed public key in hex (02... or 03...)")
    return None


def _principals(raw: object, problems: _Problems) -> dict[str, frozenset[bytes]]:
    out: dict[str, frozenset[bytes]] = {}
    if not isinstance(raw, dict):
        problems.add("principals", "must be a table: name = [approver pubkeys]")
        return out
    for name, keys in raw.items():
        if not isinstance(keys, list):
            problems.add(f"principals.{name}", "must be a list of public keys")
            continue
        pubs = [_pubkey(k, f"principals.{name}", problems) for k in keys]
        out[str(name)] = frozenset(p for p in pubs if p is not None)
    return out


def _int(
    table: Mapping[str, object], key: str, where: str, problems: _Problems, low: int
) -> int | None:
    if key not in table:
        return None
    value = table[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        problems.add(f"{where}.{key}", f"must be an integer >= {low}")
        return None
    return value


def _bool(
    table: Mapping[str, object], key: str, where: str, problems: _Problems, default: bool
) -> bool:
    value = table.get(key, default)
    if not isinstance(value, bool):
        problems.add(f"{where}.{key}", "must be true or false")
        return default
    return value


def _strings(
    table: Mapping[str, object], key: str, where: str, problems: _Problems
) -> list[str] | None:
    if key not in table:
        return None
    value = table[key]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        problems.add(f"{where}.{key}", "must be a list of strings")
        return None
    return list(value)


def _rule(table: dict[str, object], n: int, network: Network, problems: _Problems) -> Rule | None:
    where = f"rules[{n}]"
    for key in table:
        if key not in _RULE_KEYS:
            problems.add(f"{where}.{key}", "unknown setting (see docs/policy.md)")
    name = table.get("name")
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        problems.add(f"{where}.name", "required: 1-64 of A-Z a-z 0-9 . _ - (starting alphanumeric)")
        return None
    where = f"rules.{name}"
    if name in RESERVED_NAMES:
        problems.add(f"{where}.name", f"{name!r} is the name of a rule the engine adds itself")
    keys = _strings(table, "keys", where, problems)
    if keys is not None and not keys:
        problems.add(f"{where}.keys", "an empty list names no key; omit it for every key")
    action = table.get("action", "refuse")
    if action not in ("refuse", "warn"):
        problems.add(f"{where}.action", 'must be "refuse" or "warn"')
        action = "refuse"
    per_tx = _int(table, "max_per_tx_sat", where, problems, 0)
    per_period = _int(table, "max_per_period_sat", where, problems, 0)
    period: int | None = None
    if "period" in table:
        period = parse_duration(table["period"])
        if period is None:
            problems.add(f"{where}.period", 'must be a duration such as "10m", "1h", "24h", "7d"')
    if ("max_per_period_sat" in table) != ("period" in table):
        problems.add(f"{where}", "max_per_period_sat and period go together")
    buckets = _int(table, "buckets", where, problems, 1) or DEFAULT_BUCKETS
    if buckets > MAX_BUCKETS:
        problems.add(f"{where}.buckets", f"at most {MAX_BUCKETS}")
        buckets = DEFAULT_BUCKETS
    if period is not None:
        buckets = min(buckets, period)  # at least one second per bucket
    destinations, count = _destinations(table, where, network, problems)
    max_outside = _int(table, "max_outside_sat", where, problems, 0)
    if max_outside is not None and destinations is None:
        problems.add(f"{where}.max_outside_sat", "needs destinations to be outside of")
    script_types = _script_types(table, where, problems)
    window = _window(table, where, problems)
    approvals = _approvals(table.get("approvals"), where, problems)
    if approvals is not None and action == "warn":
        problems.add(
            f"{where}.approvals", "a warn rule never refuses, so approvals would never be asked"
        )
    max_fee = _int(table, "max_fee_sat", where, problems, 1)
    max_rate = _number(table, "max_fee_rate_sat_vb", where, problems)
    sighash_types = _sighash_types(table, where, problems)
    input_paths = _input_paths(table, name, where, problems)
    max_change = _int(table, "max_change_index", where, problems, 1)
    coin_type = _bool(table, "coin_type", where, problems, False)
    if coin_type and action == "warn":
        problems.add(
            f"{where}.coin_type",
            'a network check never only warns: coin_type = true needs action = "refuse"',
        )
    if coin_type and approvals is not None:
        problems.add(f"{where}.coin_type", "a network check is never approved past")
    signing_checks = coin_type or any(
        v is not None for v in (max_fee, max_rate, sighash_types, input_paths, max_change)
    )
    return Rule(
        name=name,
        keys=None if keys is None else tuple(keys),
        action=Action(str(action)),
        max_per_tx_sat=per_tx,
        max_per_period_sat=per_period,
        period_s=period if per_period is not None else None,
        buckets=buckets,
        destinations=destinations,
        destination_count=count,
        max_outside_sat=max_outside or 0,
        script_types=script_types,
        max_inputs=_int(table, "max_inputs", where, problems, 1),
        max_outputs=_int(table, "max_outputs", where, problems, 1),
        op_return=_bool(table, "op_return", where, problems, True),
        own_outputs=_bool(table, "own_outputs", where, problems, True),
        window=window,
        approvals=approvals,
        raw_digests=_bool(table, "raw_digests", where, problems, False),
        max_fee_sat=max_fee,
        max_fee_rate_sat_vb=max_rate,
        sighash_types=sighash_types,
        input_paths=input_paths,
        max_change_index=max_change,
        coin_type=coin_type,
        signing_checks=signing_checks,
    )


def _number(table: Mapping[str, object], key: str, where: str, problems: _Problems) -> float | None:
    if key not in table:
        return None
    value = table[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        problems.add(f"{where}.{key}", "must be a number > 0")
        return None
    return float(value)


def _sighash_types(
    table: Mapping[str, object], where: str, problems: _Problems
) -> tuple[int, ...] | None:
    """``sighash_types = ["DEFAULT", "ALL", "ALL|ANYONECANPAY", ...]`` (or the numbers)."""
    from anyhsm.bitcoin.sighash import TAPROOT_SIGHASH_TYPES, sighash_name

    if "sighash_types" not in table:
        return None
    raw = table["sighash_types"]
    names = {sighash_name(t): t for t in TAPROOT_SIGHASH_TYPES}
    if not isinstance(raw, list):
        problems.add(f"{where}.sighash_types", "must be a list of sighash types")
        return None
    out: list[int] = []
    for item in raw:
        if isinstance(item, str) and item.strip().upper() in names:
            out.append(names[item.strip().upper()])
        elif isinstance(item, int) and not isinstance(item, bool) and item in TAPROOT_SIGHASH_TYPES:
            out.append(item)
        else:
            problems.add(
                f"{where}.sighash_types",
                f"{item!r} is not one of: " + ", ".join(sorted(names, key=names.__getitem__)),
            )
    return tuple(dict.fromkeys(out))


def _input_paths(
    table: Mapping[str, object], name: str, where: str, problems: _Problems
) -> KeyPaths | None:
    """``input_paths = ["m/84'/0'/0'", ...]``: the accounts the rule's keys may sign under
    (path patterns as ``policy.allowed_input_paths``; parsed once, here)."""
    from anyhsm.bitcoin.paths import KeyPaths, parse_pattern

    texts = _strings(table, "input_paths", where, problems)
    if texts is None:
        return None
    if not texts:
        problems.add(f"{where}.input_paths", "an empty list allows no path; omit it instead")
    patterns = []
    for text in texts:
        try:
            patterns.append(parse_pattern(text))
        except ValueError as e:
            problems.add(f"{where}.input_paths", f"{text!r}: {e}")
    return KeyPaths(tuple(patterns), False, f"rules.{name}.input_paths")


def looser_than(policy: SpendingPolicy, floor: PolicyConfig) -> list[str]:
    """The built-in conditions of ``policy`` that are looser than ``[policy]`` (the
    stricter always applies, so such a value would do nothing but mislead): loosening
    is a change of ``[policy]`` in the configuration, not of the policy file."""
    from anyhsm.bitcoin.sighash import sighash_name

    out: list[str] = []
    for r in policy.rules:
        where = f"rules.{r.name}"
        if r.max_fee_sat is not None and 0 < floor.max_fee_sat < r.max_fee_sat:
            out.append(
                f"{where}.max_fee_sat = {r.max_fee_sat} is above policy.max_fee_sat = "
                f"{floor.max_fee_sat}"
            )
        rate = floor.max_fee_rate_sat_vb
        if r.max_fee_rate_sat_vb is not None and 0 < rate < r.max_fee_rate_sat_vb:
            out.append(
                f"{where}.max_fee_rate_sat_vb = {r.max_fee_rate_sat_vb:g} is above "
                f"policy.max_fee_rate_sat_vb = {rate:g}"
            )
        if r.sighash_types is not None:
            extra = [t for t in r.sighash_types if t not in floor.allowed_sighash_types]
            if extra:
                out.append(
                    f"{where}.sighash_types allows "
                    + ", ".join(sighash_name(t) for t in extra)
                    + ", which policy.allowed_sighash_types does not"
                )
        if r.max_change_index is not None and r.max_change_index > floor.max_change_index:
            out.append(
                f"{where}.max_change_index = {r.max_change_index} is above "
                f"policy.max_change_index = {floor.max_change_index}"
            )
    return out


def _destinations(
    table: Mapping[str, object], where: str, network: Network, problems: _Problems
) -> tuple[frozenset[bytes] | None, int]:
    from anyhsm.bitcoin.address import script_from_address

    addresses = _strings(table, "destinations", where, problems)
    scripts_hex = _strings(table, "destination_scripts", where, problems)
    descriptors = _strings(table, "destination_descriptors", where, problems)
    if addresses is None and scripts_hex is None and descriptors is None:
        if "descriptor_range" in table:
            problems.add(f"{where}.descriptor_range", "needs destination_descriptors")
        return None, 0
    scripts: set[bytes] = set()
    count = 0
    for n, address in enumerate(addresses or ()):
        try:
            scripts.add(script_from_address(address.strip(), network))
            count += 1
        except HsmError as e:
            problems.add(f"{where}.destinations[{n}]", f"{address!r}: {e.message}")
    for n, text in enumerate(scripts_hex or ()):
        try:
            spk = bytes.fromhex(text)
        except ValueError:
            spk = b""
        if not spk:
            problems.add(f"{where}.destination_scripts[{n}]", "must be a scriptPubKey in hex")
            continue
        scripts.add(spk)
        count += 1
    if descriptors:
        low, high = _range(table, where, problems)
        for n, text in enumerate(descriptors):
            derived = _descriptor_scripts(
                text, low, high, f"{where}.destination_descriptors[{n}]", problems
            )
            scripts.update(derived)
            count += len(derived)
    return frozenset(scripts), count


def _range(table: Mapping[str, object], where: str, problems: _Problems) -> tuple[int, int]:
    value = table.get("descriptor_range", list(DEFAULT_DESCRIPTOR_RANGE))
    if (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        and 0 <= value[0] <= value[1] < 2**31
        and value[1] - value[0] < MAX_DESCRIPTOR_SCRIPTS
    ):
        return value[0], value[1]
    problems.add(
        f"{where}.descriptor_range",
        f"must be [first, last] indexes (inclusive, fewer than {MAX_DESCRIPTOR_SCRIPTS})",
    )
    return DEFAULT_DESCRIPTOR_RANGE


def _descriptor_scripts(
    text: str, low: int, high: int, where: str, problems: _Problems
) -> list[bytes]:
    from anyhsm.bitcoin.descriptor import parse_descriptor

    try:
        desc = parse_descriptor(text.strip())
        out: list[bytes] = []
        for branch in range(desc.branch_count):
            if not desc.is_ranged:
                out.append(desc.script_pubkey(None, branch=branch))
                continue
            out.extend(desc.script_pubkey(i, branch=branch) for i in range(low, high + 1))
        return out
    except HsmError as e:
        problems.add(where, e.message)
        return []


def _script_types(
    table: Mapping[str, object], where: str, problems: _Problems
) -> frozenset[str] | None:
    from anyhsm.bitcoin.script_kind import ScriptKind

    names = _strings(table, "script_types", where, problems)
    if names is None:
        return None
    known = {k.value for k in ScriptKind}
    for name in names:
        if name not in known:
            problems.add(
                f"{where}.script_types", f"{name!r} is not one of: " + ", ".join(sorted(known))
            )
    return frozenset(n for n in names if n in known)


def _window(table: Mapping[str, object], where: str, problems: _Problems) -> TimeWindow | None:
    if not any(k in table for k in ("hours", "days", "timezone")):
        return None
    hours = table.get("hours", "00:00-24:00")
    start = end = 0
    m = _HOURS_RE.fullmatch(hours) if isinstance(hours, str) else None
    if m is None:
        problems.add(f"{where}.hours", 'must be "HH:MM-HH:MM" (24-hour clock)')
    else:
        start = int(m.group(1)) * 60 + int(m.group(2))
        end = int(m.group(3)) * 60 + int(m.group(4))
        if end > 24 * 60 or start == end:
            problems.add(f"{where}.hours", "an empty or impossible interval")
    days_raw = _strings(table, "days", where, problems)
    days = list(DAYS) if days_raw is None else [d.lower()[:3] for d in days_raw]
    for d in days:
        if d not in DAYS:
            problems.add(f"{where}.days", f"{d!r} is not one of " + ", ".join(DAYS))
    if days_raw is not None and not days_raw:
        problems.add(f"{where}.days", "an empty list: the rule would never allow")
    tz = table.get("timezone", "UTC")
    if not isinstance(tz, str):
        problems.add(f"{where}.timezone", "must be a time zone name such as UTC or Europe/Zurich")
        tz = "UTC"
    else:
        try:
            _zone(tz)
        except (ValueError, OSError, KeyError):
            problems.add(f"{where}.timezone", f"unknown time zone {tz!r}")
            tz = "UTC"
    text = f"{','.join(days)} {hours} {tz}"
    return TimeWindow(frozenset(DAYS.index(d) for d in days if d in DAYS), start, end, tz, text)


def _approvals(raw: object, where: str, problems: _Problems) -> Approvals | None:
    if raw is None:
        return None
    where = f"{where}.approvals"
    if not isinstance(raw, dict):
        problems.add(where, "must be a table { m = 2, approvers = [...] }")
        return None
    for key in raw:
        if key not in _APPROVAL_KEYS:
            problems.add(f"{where}.{key}", "unknown setting (m, approvers, max_age)")
    approvers_raw = raw.get("approvers")
    if not isinstance(approvers_raw, list) or not approvers_raw:
        problems.add(f"{where}.approvers", "required: a non-empty list of public keys")
        return None
    pubs = [_pubkey(a, f"{where}.approvers", problems) for a in approvers_raw]
    approvers = tuple(dict.fromkeys(p for p in pubs if p is not None))
    if len(approvers) != len(approvers_raw) and all(p is not None for p in pubs):
        problems.add(f"{where}.approvers", "an approver is listed twice")
    m = raw.get("m")
    if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= len(approvers_raw):
        problems.add(f"{where}.m", f"must be an integer from 1 to {len(approvers_raw)}")
        return None
    max_age = DEFAULT_APPROVAL_MAX_AGE
    if "max_age" in raw:
        parsed = parse_duration(raw["max_age"])
        if parsed is None:
            problems.add(f"{where}.max_age", 'must be a duration such as "1h"')
        else:
            max_age = parsed
    return Approvals(m, approvers, max_age)


__all__ = [
    "Action",
    "Approvals",
    "Rule",
    "SpendingPolicy",
    "TimeWindow",
    "format_duration",
    "looser_than",
    "parse_duration",
    "parse_policy",
    "policy_sha256",
]
