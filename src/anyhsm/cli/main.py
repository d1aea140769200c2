"""The ``anyhsm`` command: global options, command registry, output and exit codes.

Every error is one clear line on stderr (and, with ``--json``, an ``error``
object on stdout); the exit status comes from the error's class. Tracebacks
are shown only with ``ANYHSM_DEBUG=1``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Sequence

from anyhsm.cli.app import App, Result
from anyhsm.errors import HsmError

COMMAND_MODULES = (
    "anyhsm.cli.core_cmds",
    "anyhsm.cli.bitcoin_cmds",
    "anyhsm.cli.tpm_cmds",
    "anyhsm.cli.pkcs11_cmds",
)
EXIT_INTERNAL = 70
EXIT_USAGE = 2


def _global_options(suppress: bool) -> argparse.ArgumentParser:
    """The global options; after the command they must not reset values given before it."""
    common = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    extra: dict[str, object] = {"default": argparse.SUPPRESS} if suppress else {}
    common.add_argument("--config", help="config file (default: $ANYHSM_CONFIG)", **extra)  # type: ignore[arg-type]
    common.add_argument("--json", action="store_true", help="machine-readable output", **extra)  # type: ignore[arg-type]
    common.add_argument("--passphrase-file", help="file holding the keystore passphrase", **extra)  # type: ignore[arg-type]
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _global_options(suppress=False)
    parser = argparse.ArgumentParser(
        allow_abbrev=False,  # "--passphrase X" must never be read as --passphrase-file X
        prog="anyhsm",
        description="Bitcoin keys in HSMs, TPMs and an encrypted keystore; fallback and audit.",
        parents=[common],
    )
    sub = parser.add_subparsers(
        dest="command", required=True, parser_class=_parser_with(_global_options(suppress=True))
    )
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        module.register(sub)
    return parser


def _parser_with(common: argparse.ArgumentParser) -> type[argparse.ArgumentParser]:
    """Sub-parsers accept the global options after the command too."""

    class _Parser(argparse.ArgumentParser):
        def __init__(self, **kwargs: object) -> None:
            parents = list(kwargs.pop("parents", []) or [])  # type: ignore[call-overload]
            kwargs["allow_abbrev"] = False
            super().__init__(parents=[*parents, common], **kwargs)  # type: ignore[arg-type]

    return _Parser


def _emit(app: App, result: Result) -> None:
    if app.json:
        print(json.dumps(result.data, indent=2, sort_keys=True))
    else:
        for line in result.text:
            print(line)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0) if isinstance(e.code, int) else EXIT_USAGE
    app = App(args)
    try:
        result: Result = args.func(args, app)
        _emit(app, result)
        return result.exit_code
    except HsmError as e:
        if app.json:
            print(json.dumps({"error": e.to_dict()}, indent=2, sort_keys=True))
        print(f"anyhsm: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        print(f"anyhsm: error: {e.strerror or type(e).__name__}{where}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("anyhsm: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if os.environ.get("ANYHSM_DEBUG"):
            raise
        # The text of an unexpected exception may quote input (e.g. a byte of a secret
        # file in a UnicodeDecodeError): only its type is printed.
        print(
            f"anyhsm: internal error: {type(e).__name__} (set ANYHSM_DEBUG=1 for a traceback)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL
    finally:
        try:
            app.close()
        except HsmError as e:
            print(f"anyhsm: error while closing: {e}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
