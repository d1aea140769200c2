"""The ``anyhsm`` command: global options, command registry, output and exit codes.

Every error is one clear line on stderr and, with ``--json`` anywhere on the command
line, one ``{"error": {...}}`` object on stdout: library errors, usage errors
(``usage_error``, exit 2) and operating-system errors (``os_error``) alike. The exit
status comes from the error's class. Tracebacks are shown only with ``ANYHSM_DEBUG=1``.

Start-up is kept cheap: ``--version`` reads the package metadata and imports nothing
else of anyhsm, and the parser imports only the module that registers the command at
hand (``COMMANDS`` names it); ``--help`` without a command imports none of them.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

TYPE_CHECKING = False  # not typing's: importing typing costs a third of the start-up budget
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence
    from typing import NoReturn

    from anyhsm.cli.app import App, Result

COMMAND_MODULES = (
    "anyhsm.cli.core_cmds",
    "anyhsm.cli.bitcoin_cmds",
    "anyhsm.cli.tpm_cmds",
    "anyhsm.cli.pkcs11_cmds",
    "anyhsm.cli.service_cmds",
    "anyhsm.cli.policy_cmds",
    "anyhsm.cli.completion_cmds",
)
_CORE, _BITCOIN, _TPM, _PKCS11, _SERVICE, _POLICY, _COMPLETION = COMMAND_MODULES
COMMANDS: dict[str, tuple[str, str]] = {
    # name: (module that registers it, one-line help shown by "anyhsm --help").
    # A hint only: a command missing here is still found (every module is then
    # imported); tests/core/test_cli_contract.py keeps it equal to the registered set.
    "init": (_CORE, "create a software keystore, config file and audit log"),
    "key": (_CORE, "create, list, show, delete, import, export keys"),
    "sign": (_CORE, "sign a 32-byte digest"),
    "verify": (_CORE, "verify a signature of a digest"),
    "health": (_CORE, "which provider is active and how each fared"),
    "audit": (_CORE, "audit log"),
    "config": (_CORE, "configuration"),
    "keystore": (_CORE, "keystore maintenance"),
    "xpub": (_BITCOIN, "extended public key of an HD key at a path"),
    "address": (_BITCOIN, "address of a key (HD keys: at a path)"),
    "descriptor": (_BITCOIN, "output descriptor for watch-only wallets"),
    "psbt": (_BITCOIN, "inspect, sign, finalize, create and combine PSBTs"),
    "message": (_BITCOIN, "sign and verify messages (BIP137, BIP322)"),
    "tpm": (_TPM, "seal the keystore master key to a TPM 2.0"),
    "pkcs11": (_PKCS11, "PKCS#11 token administration"),
    "serve": (_SERVICE, "run the HTTP signing service (foreground, until SIGTERM)"),
    "service": (_SERVICE, "signing service clients"),
    "policy": (_POLICY, "spending policy: set, show, check, request, approve, freeze"),
    "completion": (_COMPLETION, "print a shell completion script (bash, zsh, fish)"),
}
EXIT_INTERNAL = 70  # an unexpected exception (a bug); not an HsmError, so no class has it
EXIT_INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT
EXIT_BROKEN_PIPE = 141  # the reader of stdout went away (| head), as shells report SIGPIPE
EXIT_USAGE = 2  # UsageError.exit_code, known without importing anyhsm.errors (start-up)
EXIT_OS_ERROR = 2  # an OSError: bad input, as a usage error (operator guide, section 8)
_VALUE_OPTIONS = ("--config", "--passphrase-file", "--log-format")


class UsageFailure(Exception):
    """Raised instead of argparse's print-and-exit, so that ``main`` reports it like
    every other error (JSON on stdout under ``--json``)."""

    def __init__(self, parser: argparse.ArgumentParser, message: str) -> None:
        super().__init__(message)
        self.parser = parser
        self.message = message


class HelpFormatter(argparse.HelpFormatter):
    """Every option that has a default shows it, as ``(default: X)``, unless its help
    already says (ArgumentDefaultsHelpFormatter would also print "default: None" for
    options without one and "default: False" for every flag)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.help == argparse.SUPPRESS:
            return action.help
        default = action.default
        if default is None or default is False or default == argparse.SUPPRESS:
            return action.help
        if isinstance(action, argparse._SubParsersAction | argparse._HelpAction):
            return action.help
        return f"{text} (default: %(default)s)".lstrip()


class _Parser(argparse.ArgumentParser):
    def __init__(self, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(**kwargs)  # type: ignore[arg-type]

    def error(self, message: str) -> NoReturn:
        raise UsageFailure(self, message)


class _VersionAction(argparse.Action):
    """``--version`` (the main path answers it before parsing; this is for help and for
    a ``--version`` that the pre-scan did not see)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print the version and exit")

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        print(f"anyhsm {version()}")
        parser.exit(0)


def version() -> str:
    """The installed distribution's version, from its metadata (``Version:`` in the
    ``anyhsm-*.dist-info/METADATA`` on sys.path, where importlib.metadata would find it,
    read directly: importing importlib.metadata alone costs about 40 ms)."""
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        for name in names:
            if name.startswith("anyhsm-") and name.endswith(".dist-info"):
                try:
                    with open(os.path.join(entry, name, "METADATA"), encoding="utf-8") as f:
                        for line in f:
                            if line.startswith("Version:"):
                                return line.split(":", 1)[1].strip()
                            if not line.strip():
                                break  # end of the headers
                except OSError:
                    continue
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("anyhsm")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "0+unknown"


def _global_options(suppress: bool) -> argparse.ArgumentParser:
    """The global options; after the command they must not reset values given before it."""
    common = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    extra: dict[str, object] = {"default": argparse.SUPPRESS} if suppress else {}
    common.add_argument(
        "--config",
        help="config file (default: $ANYHSM_CONFIG, else ./anyhsm.toml, "
        "$XDG_CONFIG_HOME/anyhsm/anyhsm.toml, /etc/anyhsm/anyhsm.toml)",
        **extra,  # type: ignore[arg-type]
    )
    common.add_argument(
        "--json",
        action="store_true",
        help='machine-readable output; every failure prints one {"error": ...} object',
        **extra,  # type: ignore[arg-type]
    )
    common.add_argument("--passphrase-file", help="file holding the keystore passphrase", **extra)  # type: ignore[arg-type]
    common.add_argument(
        "--addr",
        metavar="URL",
        help="talk to a signing service at URL (default: $ANYHSM_ADDR; token from "
        "$ANYHSM_TOKEN or --token-file)",
        **extra,  # type: ignore[arg-type]
    )
    common.add_argument("--token-file", help="file (mode 600) holding the service token", **extra)  # type: ignore[arg-type]
    common.add_argument(
        "--ca-file",
        help="CA bundle for an https service (default: $ANYHSM_CA_FILE)",
        **extra,  # type: ignore[arg-type]
    )
    common.add_argument("--client-cert", help="client certificate for mutual TLS", **extra)  # type: ignore[arg-type]
    common.add_argument("--client-key", help="its private key file", **extra)  # type: ignore[arg-type]
    common.add_argument(
        "--token",
        nargs="?",
        const="",
        help=argparse.SUPPRESS,  # refused: a token on the command line is in argv
        **extra,  # type: ignore[arg-type]
    )
    common.add_argument(
        "-v",
        "--verbose",
        action="count",
        help="more log output on stderr: -v info, -vv debug (default: warnings)",
        **({"default": argparse.SUPPRESS} if suppress else {"default": 0}),
    )
    common.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="log errors only (default: warnings too)",
        **extra,  # type: ignore[arg-type]
    )
    common.add_argument(
        "--log-format",
        choices=("text", "json"),
        help="log lines on stderr as text (default) or as JSON objects, one per line",
        **({"default": argparse.SUPPRESS} if suppress else {"default": "text"}),  # type: ignore[arg-type]
    )
    return common


class _JsonLogFormatter:
    """One JSON object per log line: ts, level, logger, message (never a secret: anyhsm's
    log messages carry none)."""

    def format(self, record: object) -> str:
        import json
        import logging
        import time

        assert isinstance(record, logging.LogRecord)
        body = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created)),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        return json.dumps(body, sort_keys=True)


def configure_logging(verbose: int, quiet: bool, log_format: str) -> Callable[[], None]:
    """Route the ``anyhsm`` logger to stderr at the level the flags ask for (warnings by
    default), as text or JSON lines. Returns the undo (``main`` may run in-process, in a
    program or a test that has its own logging)."""
    import logging

    logger = logging.getLogger("anyhsm")
    before = logger.level
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(_JsonLogFormatter())  # type: ignore[arg-type]
    else:
        handler.setFormatter(logging.Formatter("%(message)s"))
    level = (
        logging.ERROR
        if quiet
        else (logging.DEBUG if verbose >= 2 else logging.INFO if verbose else logging.WARNING)
    )
    logger.setLevel(level)
    logger.addHandler(handler)

    def undo() -> None:
        logger.removeHandler(handler)
        logger.setLevel(before)

    return undo


def build_parser(modules: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The parser with the commands of ``modules`` (all when None); every other command
    of ``COMMANDS`` is listed (for help and for the usage line) but not loaded."""
    wanted = COMMAND_MODULES if modules is None else tuple(modules)
    common = _global_options(suppress=False)
    parser = _Parser(
        allow_abbrev=False,  # "--passphrase X" must never be read as --passphrase-file X
        prog="anyhsm",
        description="Bitcoin keys in HSMs, TPMs and an encrypted keystore; fallback and audit.",
        parents=[common],
    )
    parser.add_argument("--version", action=_VersionAction)
    sub = parser.add_subparsers(
        dest="command",
        required=True,
        metavar="COMMAND",
        parser_class=_parser_with(_global_options(suppress=True)),
    )
    for name in wanted:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        module.register(sub)
    for command, (module_name, help_text) in COMMANDS.items():
        if module_name not in wanted and command not in sub.choices:
            sub.add_parser(command, help=help_text)  # listed only; never run
    return parser


def _parser_with(common: argparse.ArgumentParser) -> type[argparse.ArgumentParser]:
    """Sub-parsers accept the global options after the command too."""

    class _SubParser(_Parser):
        def __init__(self, **kwargs: object) -> None:
            parents = list(kwargs.pop("parents", []) or [])  # type: ignore[call-overload]
            kwargs["allow_abbrev"] = False
            super().__init__(parents=[*parents, common], **kwargs)

    return _SubParser


def _scan(argv: Sequence[str]) -> tuple[str | None, bool, bool]:
    """(command word, --json anywhere, --version before the command) from the raw argv,
    before any parsing: what the cheap paths and the error reporting need."""
    tokens = list(argv)
    if "--" in tokens:
        tokens = tokens[: tokens.index("--")]
    want_json = "--json" in tokens
    command: str | None = None
    want_version = False
    skip = False
    for tok in tokens:
        if skip:
            skip = False
            continue
        if tok in _VALUE_OPTIONS:
            skip = True
        elif tok == "--version":
            want_version = True
        elif not tok.startswith("-"):
            command = tok
            break
    return command, want_json, want_version


def _modules_for(command: str | None) -> tuple[str, ...]:
    """Only the module that registers ``command``; none for help or a missing command;
    all of them for a word ``COMMANDS`` does not know (it may be new, or a typo whose
    error message lists every command)."""
    if command is None:
        return ()
    entry = COMMANDS.get(command)
    return (entry[0],) if entry else COMMAND_MODULES


def _dump(obj: dict[str, object]) -> str:
    """One JSON object as the CLI prints it: with the top-level ``schema_version``
    (docs/cli.md, "JSON output")."""
    import json  # only when there is JSON to print: start-up budget

    from anyhsm.ops import SCHEMA_VERSION

    return json.dumps({"schema_version": SCHEMA_VERSION, **obj}, indent=2, sort_keys=True)


def _fail(
    want_json: bool, code: str, error: str, message: str, hint: str | None, exit_code: int
) -> int:
    """Report a failure that is not an HsmError: one line on stderr, and the JSON error
    object on stdout under --json."""
    if want_json:
        body: dict[str, object] = {"code": code, "error": error, "message": message}
        if hint:
            body["hint"] = hint
        print(_dump({"error": body}))
    print(f"anyhsm: error: {message}", file=sys.stderr)
    return exit_code


def _emit(app: App, result: Result) -> None:
    if result.lines is not None:  # JSON lines (audit show --json) or plain lines
        for line in result.lines:
            print(line)
    elif app.json:
        print(_dump(result.data))
    else:
        for line in result.text:
            print(line)


def _stdout_gone() -> int:
    """A closed stdout (``anyhsm audit show | head``) is normal for a command line tool:
    no error line, nothing more written (stdout pointed at /dev/null, so the flush at
    exit cannot fail again), the status a shell gives a process ended by SIGPIPE."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no real file descriptor (captured in a test)
        pass
    return EXIT_BROKEN_PIPE


def _remote_gate(args: argparse.Namespace, app: App) -> None:
    """Refuse a token in argv, and, with a service address set, every command a service
    does not serve (``serve`` itself and ``service`` run locally whatever the address)."""
    from anyhsm.cli.app import REMOTE_HANDLERS, command_name
    from anyhsm.errors import SecretOnCommandLine, UsageError

    if getattr(args, "token", None) is not None:
        raise SecretOnCommandLine(
            "a service token is never taken from the command line (it would be in argv)",
            hint="set ANYHSM_TOKEN or pass --token-file FILE (mode 600)",
        )
    func = args.func
    if app.addr() is None or func in REMOTE_HANDLERS:
        return
    name = command_name(func)
    if name in ("serve", "add client", "list clients"):
        return
    raise UsageError(
        f"'{name}' is not offered against a service (--addr / ANYHSM_ADDR is set)",
        hint="run it where the keys are, without --addr and with ANYHSM_ADDR unset",
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command, want_json, want_version = _scan(argv)
    if want_version:
        print(_dump({"version": version()}) if want_json else f"anyhsm {version()}")
        return 0
    try:
        parser = build_parser(_modules_for(command))
        args = parser.parse_args(argv)
        if command is not None and not hasattr(args, "func"):
            # COMMANDS named a module that did not register this command: load them all.
            args = build_parser().parse_args(argv)
    except UsageFailure as e:
        from anyhsm.errors import UsageError

        err = UsageError(e.message, hint=f"see '{e.parser.prog} --help'")
        if want_json:
            print(_dump({"error": err.to_dict()}))
        e.parser.print_usage(sys.stderr)
        print(f"{e.parser.prog}: error: {e.message}", file=sys.stderr)
        return err.exit_code
    except SystemExit as e:  # --help, or an argparse exit we did not route
        return int(e.code or 0) if isinstance(e.code, int) else EXIT_USAGE
    undo_logging = configure_logging(
        getattr(args, "verbose", 0) or 0,
        bool(getattr(args, "quiet", False)),
        getattr(args, "log_format", "text") or "text",
    )
    from anyhsm.cli.app import App
    from anyhsm.errors import HsmError

    app = App(args)
    try:
        _remote_gate(args, app)
        result: Result = args.func(args, app)
        _emit(app, result)
        return result.exit_code
    except BrokenPipeError:
        return _stdout_gone()
    except HsmError as e:
        try:
            if app.json:
                print(_dump({"error": e.to_dict()}))
            print(f"anyhsm: error: {e}", file=sys.stderr)
        except BrokenPipeError:
            return _stdout_gone()
        return e.exit_code
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        message = f"{e.strerror or type(e).__name__}{where}"
        return _fail(app.json, "os_error", type(e).__name__, message, None, EXIT_OS_ERROR)
    except KeyboardInterrupt:
        return _fail(
            app.json, "interrupted", "KeyboardInterrupt", "interrupted", None, EXIT_INTERRUPTED
        )
    except Exception as e:
        if os.environ.get("ANYHSM_DEBUG"):
            raise
        # The text of an unexpected exception may quote input (e.g. a byte of a secret
        # file in a UnicodeDecodeError): only its type is printed.
        return _fail(
            app.json,
            "internal_error",
            type(e).__name__,
            f"internal error: {type(e).__name__}",
            "set ANYHSM_DEBUG=1 for a traceback",
            EXIT_INTERNAL,
        )
    finally:
        try:
            app.close()
        except HsmError as e:
            print(f"anyhsm: error while closing: {e}", file=sys.stderr)
        undo_logging()


if __name__ == "__main__":
    sys.exit(main())
