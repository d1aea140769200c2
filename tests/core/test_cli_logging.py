"""-v / --quiet / --log-format json (issue 10 item 10): the warnings anyhsm logs (here: a
provider skipped by the fallback chain) reach stderr as text, as JSON lines, or not at
all; stdout keeps only the command's output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from anyhsm.cli.main import main


@pytest.fixture
def falls_back(deployment: Path, tmp_path: Path) -> Path:
    text = deployment.read_text().replace('chain = ["software"]', 'chain = ["pkcs11", "software"]')
    text += f'\n[providers.pkcs11]\nmodule = "{tmp_path / "absent.so"}"\ntoken_label = "x"\n'
    deployment.write_text(text)
    return deployment


def test_log_lines_as_json(falls_back: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(falls_back), "key", "list", "--json", "--log-format", "json"]) == 0
    out, err = capsys.readouterr()
    json.loads(out)  # stdout: the command's JSON only
    lines = [json.loads(x) for x in err.splitlines() if x.strip()]
    assert lines and all(x["logger"].startswith("anyhsm") for x in lines)
    assert any(x["level"] == "warning" and "pkcs11" in x["message"] for x in lines)


def test_text_by_default_and_quiet(falls_back: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(falls_back), "key", "list"]) == 0
    err = capsys.readouterr().err
    assert "pkcs11" in err and not err.lstrip().startswith("{")
    assert main(["-q", "--config", str(falls_back), "key", "list"]) == 0
    assert capsys.readouterr().err == ""
