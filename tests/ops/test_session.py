"""anyhsm.ops.session.open_handle: the one way front ends open the handle (passphrase and
PIN rules, no prompt without a terminal, the caller's secrets left to the caller)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.conftest import PASSPHRASE

from anyhsm.config import Config
from anyhsm.errors import AuthenticationFailed
from anyhsm.ops.session import open_handle, unattended
from anyhsm.secret import SecretBytes


def test_opens_from_the_environment_without_asking(
    deployment: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[str] = []
    cfg = Config.load(deployment)
    with open_handle(cfg, prompt=lambda t: asked.append(t) or None) as hsm:
        assert hsm.active_provider == "software"
    assert asked == []  # ANYHSM_PASSPHRASE was there: nothing asked
    monkeypatch.delenv("ANYHSM_PASSPHRASE")
    with pytest.raises(AuthenticationFailed) as exc:
        open_handle(cfg)  # no prompt: never asks, fails with the credential's error
    assert exc.value.exit_code == 5


def test_prompt_and_file_and_given(
    deployment: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("ANYHSM_PASSPHRASE")
    cfg = Config.load(deployment)
    asked: list[str] = []

    def ask(text: str) -> str:
        asked.append(text)
        return PASSPHRASE

    with open_handle(cfg, prompt=ask):
        pass
    assert asked == ["Keystore passphrase: "]  # a software chain uses no token: no PIN asked
    pf = tmp_path / "pw"
    pf.write_text(PASSPHRASE + "\n")
    pf.chmod(0o600)
    with open_handle(cfg, passphrase_file=pf):
        pass
    given = SecretBytes(PASSPHRASE.encode())
    with open_handle(cfg, passphrase=given):
        pass
    assert given.equals(PASSPHRASE.encode())  # the caller's passphrase is not wiped


def test_a_software_chain_is_not_unattended(deployment: Path) -> None:
    assert not unattended(Config.load(deployment))


def test_the_docs_name_only_operations_that_exist() -> None:
    """docs/cli.md's table of the operations layer names real functions."""
    import importlib
    import re

    doc = (Path(__file__).resolve().parents[2] / "docs" / "cli.md").read_text()
    table = doc[doc.index("## Python: the operations layer") :]
    rows = re.findall(r"^\| `(anyhsm\.[a-z_.]+)` \| (.+) \|$", table, re.M)
    assert len(rows) >= 8
    for module_name, ops in rows:
        module = importlib.import_module(module_name)
        for name in re.findall(r"`([a-z_]+)[`(]", ops):
            assert callable(getattr(module, name)), (module_name, name)
