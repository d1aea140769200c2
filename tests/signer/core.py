"""Bitcoin Core's side of the external signer protocol, for driving ``anyhsm-signer``.

No bitcoind is packaged for this machine, so this module does what Core does, version by
version (docs/bitcoin-core.md, "The protocol", cites the sources):

- v22-v27 (``src/external_signer.cpp`` with Boost.Process): one command string,
  ``m_command + " --fingerprint \\"" + fp + "\\"" + " --chain " + chain + ...``, split into
  arguments by Boost.Process's ``build_args`` (ported below: spaces outside double quotes
  split, quotes around a whole argument dropped), and for ``signtx`` the standard input
  ``signtx "<base64>"`` followed by ``std::endl``;
- v28 and later (cpp-subprocess): ``Cat(split(command), {"--fingerprint", fp, "--chain",
  chain, ...})``, the ``-signer`` value split on spaces and tabs, and the standard input
  ``signtx <base64>`` with no newline;
- ``RunCommandParseJSON``: a non-zero exit status is an error carrying the first line of
  standard error; otherwise the first line of standard output is parsed as JSON.

``Core.enumerate`` and friends then read the answer the way ``ExternalSigner`` and the
wallet do, raising :class:`CoreError` with the message Core would show.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

STYLES = ("v27", "v28")


def signer_command() -> str:
    """The ``-signer=`` value: the installed console script, else the module."""
    script = Path(sys.executable).with_name("anyhsm-signer")
    if script.exists():
        return str(script)
    return f"{sys.executable} -m anyhsm.signer"


def boost_build_args(data: str) -> list[str]:
    """Boost.Process ``detail::posix::build_args``: how Core v22-v27's command string
    became the signer's argv."""

    def entry(part: str) -> str:
        if part[:1] == '"' and part[-1:] == '"':
            part = part[1:-1]
        return part.replace('\\"', '"')

    out: list[str] = []
    in_quote = False
    begin = 0
    for i, c in enumerate(data):
        if c == '"':
            in_quote = not in_quote
        if not in_quote and c == " ":
            if i != 0 and data[i - 1] != " ":
                out.append(entry(data[begin:i]))
            begin = i + 1
    if begin != len(data):
        out.append(entry(data[begin:]))
    return out


def subprocess_split(command: str) -> list[str]:
    """cpp-subprocess ``util::split`` (delimiters space and tab), as Core v28+ splits
    the ``-signer`` value."""
    return [t for t in re.split(r"[ \t]", command) if t]


class CoreError(Exception):
    """What Core would report (the RPC error message)."""


@dataclass
class Reply:
    argv: list[str]
    stdin: str
    status: int
    stdout: str
    stderr: str

    @property
    def first_line(self) -> str:
        return self.stdout.split("\n", 1)[0]

    def json(self) -> object:
        """``RunCommandParseJSON``: status first, then the first stdout line."""
        if self.status:
            first_err = self.stderr.split("\n", 1)[0]
            raise CoreError(
                f"RunCommandParseJSON error: process({' '.join(self.argv)}) returned "
                f"{self.status}: {first_err}"
            )
        try:
            return json.loads(self.first_line)
        except ValueError:
            raise CoreError("Unable to parse JSON: " + self.first_line) from None


@dataclass
class Core:
    """One bitcoind: its ``-signer`` value, chain, protocol style and environment."""

    style: str
    chain: str
    env: dict[str, str]
    signer: str = field(default_factory=signer_command)
    cwd: Path | None = None

    # --- the command lines ---------------------------------------------------------------------

    def argv(
        self, fingerprint: str | None, tail: Sequence[str], *, stdin: bool = False
    ) -> list[str]:
        """The argv of ``<signer> [--stdin] [--fingerprint FP --chain C] TAIL...``."""
        if self.style == "v27":
            cmd = self.signer
            if fingerprint is not None:
                cmd += (" --stdin" if stdin else "") + ' --fingerprint "' + fingerprint + '"'
                cmd += " --chain " + self.chain
            for word in tail:
                cmd += " " + word
            return boost_build_args(cmd)
        args = subprocess_split(self.signer)
        if fingerprint is not None:
            args += [*(["--stdin"] if stdin else []), "--fingerprint", fingerprint]
            args += ["--chain", self.chain]
        return args + list(tail)

    def stdin_signtx(self, psbt_b64: str) -> str:
        if self.style == "v27":
            return 'signtx "' + psbt_b64 + '"' + "\n"  # ... << std::endl
        return "signtx " + psbt_b64

    def run(self, argv: list[str], stdin: str = "") -> Reply:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ANYHSM_")}
        env.update(self.env)
        p = subprocess.run(
            argv,
            input=stdin.encode(),
            capture_output=True,
            env=env,
            cwd=self.cwd,
            timeout=120,
        )
        return Reply(argv, stdin, p.returncode, p.stdout.decode(), p.stderr.decode())

    # --- the calls, as ExternalSigner makes them ----------------------------------------------

    def call_enumerate(self) -> Reply:
        return self.run(self.argv(None, ["enumerate"]))

    def call_getdescriptors(self, fingerprint: str, account: int = 0) -> Reply:
        return self.run(self.argv(fingerprint, ["getdescriptors", "--account", str(account)]))

    def call_displayaddress(self, fingerprint: str, descriptor: str) -> Reply:
        desc = '"' + descriptor + '"' if self.style == "v27" else descriptor
        return self.run(self.argv(fingerprint, ["displayaddress", "--desc", desc]))

    def call_signtx(self, fingerprint: str, psbt_b64: str) -> Reply:
        return self.run(self.argv(fingerprint, [], stdin=True), self.stdin_signtx(psbt_b64))

    # --- what Core does with the answers ---------------------------------------------------------

    def enumerate(self) -> list[dict[str, str]]:
        """``ExternalSigner::Enumerate``: an array; an element's error is thrown; the
        fingerprint must be 8 hex digits; duplicates skipped."""
        result = self.call_enumerate().json()
        if not isinstance(result, list):
            raise CoreError(f"'{self.signer}' received invalid response, expected array of signers")
        signers: list[dict[str, str]] = []
        for s in result:
            if "error" in s:
                if not isinstance(s["error"], str):
                    raise CoreError(f"'{self.signer}' error")
                raise CoreError(f"'{self.signer}' error: {s['error']}")
            fp = s.get("fingerprint")
            if fp is None:
                raise CoreError(
                    f"'{self.signer}' received invalid response, missing signer fingerprint"
                )
            if not re.fullmatch(r"[0-9a-fA-F]{8}", fp):
                raise CoreError(
                    f"'{self.signer}' received invalid fingerprint, must be 8 hex characters"
                )
            if any(x["fingerprint"] == fp for x in signers):
                continue
            model = s.get("model")
            signers.append({"fingerprint": fp, "name": model if isinstance(model, str) else ""})
        return signers

    def the_signer(self) -> str:
        """``GetExternalSigner``: exactly one signer; its fingerprint."""
        signers = self.enumerate()
        if not signers:
            raise CoreError("No external signers found")
        if len(signers) > 1:
            raise CoreError(
                "More than one external signer found. Please connect only one at a time."
            )
        return signers[0]["fingerprint"]

    def getdescriptors(self, account: int = 0) -> dict[str, list[str]]:
        """``SetupDescriptorScriptPubKeyMans`` for an external signer wallet."""
        res = self.call_getdescriptors(self.the_signer(), account).json()
        if not isinstance(res, dict):
            raise CoreError("Unexpected result")
        out: dict[str, list[str]] = {}
        for name in ("receive", "internal"):
            vals = res.get(name)
            if not isinstance(vals, list):
                raise CoreError("Unexpected result")
            out[name] = [str(v) for v in vals]
        return out

    def displayaddress(self, descriptor: str, expected: str) -> None:
        """``ExternalSignerScriptPubKeyMan::DisplayAddress``."""
        res = self.call_displayaddress(self.the_signer(), descriptor).json()
        assert isinstance(res, dict)
        if isinstance(res.get("error"), str):
            raise CoreError(f"Signer returned error: {res['error']}")
        if not isinstance(res.get("address"), str):
            raise CoreError("Signer did not echo address")
        if res["address"] != expected:
            raise CoreError(f"Signer echoed unexpected address {res['address']}")

    def signtx(self, psbt_b64: str) -> str:
        """``ExternalSigner::SignTransaction`` (the input fingerprint check done by the
        caller); the signed PSBT's base64."""
        res = self.call_signtx(self.the_signer(), psbt_b64).json()
        assert isinstance(res, dict)
        if isinstance(res.get("error"), str):
            raise CoreError(res["error"])
        if not isinstance(res.get("psbt"), str):
            raise CoreError("Unexpected result from signer")
        return str(res["psbt"])
