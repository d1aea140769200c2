"""A BIP341 tweak at or above the group order is a typed refusal (invalid_digest, exit
status of the error table) through the library and the CLI, never an internal error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from anyhsm import open_hsm
from anyhsm.cli.main import main
from anyhsm.errors import InvalidDigest
from anyhsm.types import SignParams, SigScheme

DIGEST = bytes.fromhex("cd" * 32)
ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


@pytest.mark.parametrize("tweak", [ORDER, ORDER + 1, 2**256 - 1])
def test_tweak_at_or_above_the_order_is_refused(deployment: Path, tweak: int) -> None:
    raw = tweak.to_bytes(32, "big")
    with open_hsm(deployment) as hsm:
        key = hsm.generate_key("t")
        with pytest.raises(InvalidDigest):
            hsm.sign(key.id, DIGEST, SigScheme.SCHNORR, params=SignParams(tweak=raw))
        below = (ORDER - 1).to_bytes(32, "big")
        assert (
            len(hsm.sign(key.id, DIGEST, SigScheme.SCHNORR, params=SignParams(tweak=below))) == 64
        )


def test_cli_names_the_error(deployment: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(deployment), "key", "create", "--label", "t", "--json"]) == 0
    capsys.readouterr()
    code = main(
        ["--config", str(deployment), "sign", "--key", "t", "--digest", DIGEST.hex(),
         "--scheme", "schnorr", "--tweak", "ff" * 32, "--json"]
    )  # fmt: skip
    err = json.loads(capsys.readouterr().out)["error"]
    assert err["code"] == "invalid_digest" and "group order" in err["message"]
    assert code == InvalidDigest.exit_code
