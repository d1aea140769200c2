"""``anyhsm-signer``: parse what Core sends, run one command, print one JSON line.

Whatever happens, exactly one line goes to standard output, the JSON Core reads (HWI's
``main`` prints ``json.dumps(result)`` the same way); anything else the library might
print is sent to standard error while a command runs. Errors are JSON too, with exit
status 0 so that Core reads them (its ``RunCommandParseJSON`` discards standard output
of a command that exits non-zero), and their message is the first line on standard
error. Tracebacks only with ``ANYHSM_DEBUG=1``, on standard error.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Sequence
from typing import IO, TYPE_CHECKING

from anyhsm.errors import HsmError
from anyhsm.signer import protocol
from anyhsm.signer.protocol import (
    EXIT_OK,
    HELP_TEXT,
    UNKNOWN_ERROR,
    HelpRequested,
    SignerError,
)

if TYPE_CHECKING:
    from anyhsm.config import Config


class _Config:
    """The config, loaded once and only when asked for (``--version`` and usage errors
    need none)."""

    def __init__(self, explicit: str | None) -> None:
        self.explicit = explicit
        self._cfg: Config | None = None

    def get(self) -> Config:
        if self._cfg is None:
            from anyhsm.signer import _ops

            self._cfg = _ops.load_config(self.explicit)
        return self._cfg

    def max_psbt_bytes(self) -> int:
        try:
            return self.get().policy.max_psbt_bytes
        except HsmError:  # reported by the command that needs the config
            from anyhsm.config import PolicyConfig

            return PolicyConfig().max_psbt_bytes


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("anyhsm")
    except PackageNotFoundError:  # a source tree that is not installed
        return "0+unknown"


def _answer(argv: list[str], stdin: IO[bytes], config: _Config) -> tuple[object, int]:
    """(the JSON answer, exit status) of one invocation; raises SignerError/HsmError.
    ``argv`` gets the words read from standard input (``--stdin``) appended."""
    if protocol.wants_stdin(argv):
        limit = protocol.stdin_limit(config.max_psbt_bytes())
        argv.extend(protocol.read_stdin_words(stdin, limit))
    request = protocol.parse(argv)
    if request is None:
        return {"version": version()}, EXIT_OK
    from anyhsm.signer.commands import COMMANDS
    from anyhsm.signer.sources import Context

    return COMMANDS[request.command](request, Context(request.service, config)), EXIT_OK


def _command_word(argv: Sequence[str]) -> str | None:
    for a in argv:
        if protocol.dequote(a) in ("enumerate", "getdescriptors", "displayaddress", "signtx"):
            return protocol.dequote(a)
    return None


def main(
    argv: Sequence[str] | None = None,
    *,
    stdin: IO[bytes] | None = None,
    stdout: IO[str] | None = None,
) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    out = sys.stdout if stdout is None else stdout
    source = sys.stdin.buffer if stdin is None else stdin
    config = _Config(protocol.config_argument(args))
    error: SignerError | None = None
    answer: object = None
    status = EXIT_OK
    with contextlib.redirect_stdout(sys.stderr):
        try:
            answer, status = _answer(args, source, config)
        except SignerError as e:
            error = e
        except HelpRequested:
            error = SignerError("Help text requested", HELP_TEXT)
        except HsmError as e:
            error = SignerError.of(e)
        except KeyboardInterrupt:
            error = SignerError("interrupted", UNKNOWN_ERROR, 130)
        except Exception as e:
            if os.environ.get("ANYHSM_DEBUG"):
                import traceback

                traceback.print_exc(file=sys.stderr)
            # The text of an unexpected exception may quote input: only its type is shown.
            error = SignerError(
                f"internal error: {type(e).__name__} (set ANYHSM_DEBUG=1 for a traceback)",
                UNKNOWN_ERROR,
            )
    if error is not None:
        answer = error.to_dict()
        if _command_word(args) == "enumerate":
            answer = [answer]  # Core reads enumerate's array and reports an element's error
        status = error.exit_status
        prefix = "" if error.message.startswith(protocol.PROG) else f"{protocol.PROG}: error: "
        print(prefix + error.message, file=sys.stderr)
    out.write(protocol.json_line(answer) + "\n")
    out.flush()
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
