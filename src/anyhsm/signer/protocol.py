"""The external signer protocol as Bitcoin Core speaks it: command line, chains, errors, output.

No keys and no handle here; docs/bitcoin-core.md ("The protocol") cites the Core and HWI
sources every rule below comes from.

Command line. Core runs ``<cmd> enumerate``, ``<cmd> --fingerprint FP --chain C
getdescriptors --account N``, ``<cmd> --fingerprint FP --chain C displayaddress --desc D``
and ``<cmd> --stdin --fingerprint FP --chain C`` with ``signtx PSBT`` on standard input.
Up to v27 it built one command string with quoted values (``--fingerprint "FP"``,
``signtx "PSBT"`` plus a newline on stdin) that Boost.Process split into arguments,
dropping the quotes around a whole argument; since v28 it passes separate arguments and
writes ``signtx PSBT`` without quotes or newline. Both are accepted, and ``--name=value``
as well as ``--name value``. With ``--stdin``, standard input is read line by line up to
an empty line or its end and each line split like a shell would (HWI does the same), its
words appended to the arguments.

Output. Core reads the first line of standard output as JSON and nothing else; when the
exit status is not 0 it throws away standard output and reports the first line of
standard error instead. So every answer, error or not, is one JSON line on stdout with
exit status 0 (an error is ``{"error": MESSAGE, "code": N}`` with HWI's negative codes,
and, for ``enumerate``, that object inside the array Core expects), and the message is
also the first line on stderr. Usage errors exit 2 as HWI's do, still with the JSON line.
"""

from __future__ import annotations

import argparse
import enum
import json
import re
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO, NoReturn

from anyhsm.errors import (
    AuthenticationFailed,
    BitcoinError,
    ConfigError,
    Forbidden,
    HsmError,
    InvalidRequest,
    KeyNotFound,
    KeystoreNotFound,
    LockTimeout,
    NetworkMismatch,
    PolicyViolation,
    ProviderUnavailable,
    PsbtError,
    RateLimited,
    SecretOnCommandLine,
    SecurityLevelTooLow,
    ServiceBusy,
    ServiceUnreachable,
    TransactionError,
    Unauthenticated,
    UnsupportedOperation,
    UsageError,
    WrongPassphrase,
)
from anyhsm.types import Network

PROG = "anyhsm-signer"

# --- HWI's error codes (hwilib/errors.py) -----------------------------------------------------

NO_DEVICE_TYPE = -1  # no --fingerprint for a command that needs one
MISSING_ARGUMENTS = -2  # the command line does not parse
DEVICE_CONN_ERROR = -3  # the key (device) cannot be reached or is not there
INVALID_TX = -5  # the PSBT is malformed
NO_PASSWORD = -6  # a passphrase or PIN is needed and missing, or is wrong
BAD_ARGUMENT = -7  # a malformed or conflicting argument (chain, descriptor...)
UNAVAILABLE_ACTION = -9  # the key's provider cannot do this
DEVICE_NOT_READY = -12  # the deployment is not set up (config, keystore)
UNKNOWN_ERROR = -13
ACTION_CANCELED = -14  # the signing policy refused (a device's user would have declined)
DEVICE_BUSY = -15  # the keystore is locked by another process
HELP_TEXT = -17

EXIT_OK = 0
EXIT_USAGE = 2  # argparse's, as HWI's _cli.py exits on a usage error

# The code of an anyhsm error: its class's nearest entry (in method resolution order).
_CODES: tuple[tuple[type[HsmError], int], ...] = (
    (UsageError, MISSING_ARGUMENTS),
    (SecretOnCommandLine, BAD_ARGUMENT),
    # a signing service (--addr): its answers as a device's
    (Unauthenticated, NO_PASSWORD),
    (Forbidden, UNAVAILABLE_ACTION),
    (ServiceUnreachable, DEVICE_CONN_ERROR),
    (RateLimited, DEVICE_BUSY),
    (ServiceBusy, DEVICE_BUSY),
    (InvalidRequest, BAD_ARGUMENT),
    (WrongPassphrase, NO_PASSWORD),
    (AuthenticationFailed, NO_PASSWORD),
    (LockTimeout, DEVICE_BUSY),
    (KeystoreNotFound, DEVICE_NOT_READY),
    (ConfigError, DEVICE_NOT_READY),
    (SecurityLevelTooLow, DEVICE_CONN_ERROR),
    (ProviderUnavailable, DEVICE_CONN_ERROR),
    (KeyNotFound, DEVICE_CONN_ERROR),
    (UnsupportedOperation, UNAVAILABLE_ACTION),
    (NetworkMismatch, BAD_ARGUMENT),
    (PolicyViolation, ACTION_CANCELED),
    (PsbtError, INVALID_TX),
    (TransactionError, INVALID_TX),
    (BitcoinError, BAD_ARGUMENT),
)


def error_code(error: HsmError) -> int:
    """HWI's code for an anyhsm error (UNKNOWN_ERROR for one no entry covers)."""
    table: dict[type, int] = dict(_CODES)
    for cls in type(error).__mro__:
        code = table.get(cls)
        if code is not None:
            return code
    return UNKNOWN_ERROR


class SignerError(Exception):
    """An answer that is an error: the message and HWI code Core gets, and the exit
    status (0, so that Core reads the message; 2 for a usage error, as HWI)."""

    def __init__(self, message: str, code: int, exit_status: int = EXIT_OK) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.exit_status = exit_status

    @classmethod
    def of(cls, error: HsmError) -> SignerError:
        return cls(str(error), error_code(error))

    def to_dict(self) -> dict[str, object]:
        return {"error": self.message, "code": self.code}


# --- chains -------------------------------------------------------------------------------------


class Chain(enum.Enum):
    """Core's chain names (``--chain``: ``ChainTypeToString``; before v26
    ``NetworkIDString``, the same words; testnet4 since v28)."""

    MAIN = "main"
    TEST = "test"
    TESTNET4 = "testnet4"
    SIGNET = "signet"
    REGTEST = "regtest"

    @property
    def network(self) -> Network:
        return _NETWORKS[self]

    @classmethod
    def parse(cls, text: str) -> Chain:
        for chain in cls:
            if chain.value == text:
                return chain
        names = ", ".join(c.value for c in cls)
        raise SignerError(f"unknown chain {text!r}; Core's chains are {names}", BAD_ARGUMENT)


_NETWORKS = {
    Chain.MAIN: Network.MAINNET,
    Chain.TEST: Network.TESTNET,
    Chain.TESTNET4: Network.TESTNET4,
    Chain.SIGNET: Network.SIGNET,
    Chain.REGTEST: Network.REGTEST,
}


def check_chain(chain: Chain | None, configured: Network) -> None:
    """NetworkMismatch unless ``--chain`` (when given) is the configured network: a
    mismatch is an error before any key is touched, never a signature."""
    if chain is not None and chain.network is not configured:
        raise NetworkMismatch(
            f"bitcoind runs on chain {chain.value!r} ({chain.network.value}) but this anyhsm "
            f"deployment is configured for {configured.value}",
            hint="point -signer at the deployment of that network, or set its network",
        )


# --- requests -----------------------------------------------------------------------------------

_FINGERPRINT = re.compile(r"[0-9a-fA-F]{8}")
_SHELL_SPACE = re.compile(r"[ \t\r\n]+")  # shlex's whitespace


@dataclass(frozen=True)
class ServiceArgs:
    """``--addr``, ``--token-file``, ``--ca-file``, ``--client-cert``, ``--client-key``:
    a signing service to use instead of a local keystore (``ANYHSM_ADDR`` also selects
    one). The token is never an argument: Core's ``-signer`` command line is visible to
    every local user."""

    addr: str | None = None
    token_file: str | None = None
    ca_file: str | None = None
    client_cert: str | None = None
    client_key: str | None = None


@dataclass(frozen=True)
class Request:
    """One invocation, parsed."""

    command: str
    fingerprint: str | None = None  # 8 lowercase hex digits
    chain: Chain | None = None
    config: str | None = None
    account: int = 0
    desc: str | None = None
    psbt: str | None = None
    stdin: bool = False
    service: ServiceArgs = field(default_factory=lambda: ServiceArgs())  # --addr & co.

    def require_fingerprint(self) -> str:
        if self.fingerprint is None:
            raise SignerError(
                f"{self.command} needs --fingerprint (the master key fingerprint that "
                "'enumerate' reports)",
                NO_DEVICE_TYPE,
            )
        return self.fingerprint


class _Parser(argparse.ArgumentParser):
    """Usage errors as SignerError (HWI: code -2, exit 2)."""

    def error(self, message: str) -> NoReturn:
        raise SignerError(f"{self.prog}: error: {message}", MISSING_ARGUMENTS, EXIT_USAGE)


class HelpRequested(Exception):
    """``-h``/``--help``: help went to stderr; HWI answers {"error": ..., "code": -17}."""


class _HelpAction(argparse.Action):
    def __init__(self, option_strings: Sequence[str], dest: str, **_: object) -> None:
        super().__init__(option_strings, dest, nargs=0, help="show this help on stderr")

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        parser.print_help(sys.stderr)
        raise HelpRequested


def _parser() -> _Parser:
    p = _Parser(
        prog=PROG,
        description="Bitcoin Core external signer (bitcoind -signer=...) over anyhsm keys. "
        "Answers are one JSON line on stdout; see docs/bitcoin-core.md.",
        add_help=False,
        allow_abbrev=False,
    )
    p.add_argument("-h", "--help", action=_HelpAction)
    p.add_argument("--fingerprint", "-f", help="master key fingerprint (8 hex digits)")
    p.add_argument("--chain", help="Core's chain: main, test, testnet4, signet, regtest")
    p.add_argument("--stdin", action="store_true", help="read the command from stdin")
    p.add_argument("--config", help="anyhsm config file (default: $ANYHSM_CONFIG, discovery)")
    p.add_argument("--version", action="store_true", help="print the version")
    p.add_argument(
        "--addr", metavar="URL", help="use a signing service (anyhsm serve; default $ANYHSM_ADDR)"
    )
    p.add_argument("--token-file", help="file (mode 600) holding the service token")
    p.add_argument("--ca-file", help="CA certificate(s) for an https service")
    p.add_argument("--client-cert", help="client certificate for mutual TLS")
    p.add_argument("--client-key", help="its private key")
    p.add_argument("--token", help=argparse.SUPPRESS)  # refused: it would be in argv
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.add_parser("enumerate", help="the signer Core may use", add_help=False)
    g = sub.add_parser("getdescriptors", help="descriptors of an account", add_help=False)
    g.add_argument("--account", type=_account, default=0)
    d = sub.add_parser("displayaddress", help="the address of a descriptor", add_help=False)
    d.add_argument("--desc", required=True)
    s = sub.add_parser("signtx", help="sign a PSBT (base64)", add_help=False)
    s.add_argument("psbt")
    sub.add_parser(
        "setup",
        help="(operator, not Core) write the public key index enumerate reads",
        add_help=False,
    )
    return p


def _account(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"account {text!r} is not a number") from None
    return value


def dequote(token: str) -> str:
    """A token without the double quotes around it, as Boost.Process's ``build_args``
    split Core's command string up to v27: ``"abcd1234"`` -> ``abcd1234``, and
    ``--desc="..."`` -> ``--desc=...``."""
    if len(token) >= 2 and token[0] == token[-1] == '"':
        return token[1:-1]
    if token.startswith("--") and "=" in token:
        name, _, value = token.partition("=")
        return f"{name}={dequote(value)}"
    return token


def split_line(line: str) -> list[str]:
    """One line of ``--stdin`` input split into words as a shell would (``shlex``, as
    HWI), without its cost for the common forms: plain words, or words each quoted
    whole (``signtx "PSBT"``), which a 5 MB PSBT would make slow to scan a character at
    a time."""
    words = [w for w in _SHELL_SPACE.split(line) if w]
    if not any(c in line for c in "\"'\\"):
        return words
    if all(_whole_or_unquoted(w) for w in words):
        return [dequote(w) for w in words]
    try:
        return shlex.split(line)
    except ValueError as e:
        raise SignerError(f"standard input does not split into words: {e}", BAD_ARGUMENT) from None


def _whole_or_unquoted(word: str) -> bool:
    if "'" in word or "\\" in word:
        return False
    if '"' not in word:
        return True
    return len(word) >= 2 and word[0] == word[-1] == '"' and '"' not in word[1:-1]


def read_stdin_words(stream: IO[bytes], limit: int) -> list[str]:
    """The words of standard input up to an empty line or its end (HWI's rule), at most
    ``limit`` bytes (more is an error: nothing is parsed from a stream that long)."""
    words: list[str] = []
    total = 0
    while True:
        raw = stream.readline(limit - total + 1)
        if not raw:
            break
        total += len(raw)
        if total > limit:
            raise PsbtError(
                f"standard input is longer than {limit} bytes",
                hint="policy.max_psbt_bytes bounds the PSBT a signer accepts",
            )
        try:
            line = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            raise SignerError("standard input is not UTF-8 text", BAD_ARGUMENT) from None
        if line == "":
            break
        words.extend(split_line(line))
    return words


def stdin_limit(max_psbt_bytes: int) -> int:
    """Bytes of ``--stdin`` input accepted: a base64 PSBT of the policy's largest size,
    the command word, quotes and a newline."""
    return (max_psbt_bytes + 2) // 3 * 4 + 4096


def wants_stdin(argv: Sequence[str]) -> bool:
    return any(dequote(a) == "--stdin" for a in argv)


def config_argument(argv: Sequence[str]) -> str | None:
    """``--config`` from the arguments before they are fully parsed (it decides how much
    standard input may be read)."""
    args = [dequote(a) for a in argv]
    for n, a in enumerate(args):
        if a == "--config" and n + 1 < len(args):
            return args[n + 1]
        if a.startswith("--config="):
            return a.partition("=")[2]
    return None


def parse(argv: Sequence[str]) -> Request | None:
    """The request of a command line (stdin words already appended); None for
    ``--version``. SignerError for a usage error, HelpRequested for ``--help``."""
    ns = _parser().parse_args([dequote(a) for a in argv])
    if ns.version:
        return None
    if ns.command is None:
        raise SignerError(
            f"{PROG}: error: a command is required (enumerate, getdescriptors, "
            "displayaddress, signtx)",
            MISSING_ARGUMENTS,
            EXIT_USAGE,
        )
    if ns.token is not None:
        raise SecretOnCommandLine(
            "a service token is never taken from the command line (bitcoind's -signer "
            "command line is visible to every local user)",
            hint="set ANYHSM_TOKEN in bitcoind's environment or pass --token-file FILE",
        )
    fingerprint = ns.fingerprint
    if fingerprint is not None:
        if not _FINGERPRINT.fullmatch(fingerprint):
            raise SignerError(
                f"--fingerprint {fingerprint!r} is not a master key fingerprint (8 hex digits)",
                BAD_ARGUMENT,
            )
        fingerprint = fingerprint.lower()
    return Request(
        command=ns.command,
        fingerprint=fingerprint,
        chain=None if ns.chain is None else Chain.parse(ns.chain),
        config=ns.config,
        account=getattr(ns, "account", 0),
        desc=getattr(ns, "desc", None),
        psbt=getattr(ns, "psbt", None),
        stdin=ns.stdin,
        service=ServiceArgs(ns.addr, ns.token_file, ns.ca_file, ns.client_cert, ns.client_key),
    )


def json_line(answer: object) -> str:
    """The one line Core reads: compact JSON, no newline inside."""
    return json.dumps(answer)


__all__ = [
    "Chain",
    "HelpRequested",
    "Request",
    "ServiceArgs",
    "SignerError",
    "check_chain",
    "config_argument",
    "dequote",
    "error_code",
    "json_line",
    "parse",
    "read_stdin_words",
    "split_line",
    "stdin_limit",
    "wants_stdin",
]
