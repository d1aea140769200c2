"""The CLI's public contract for programs: ``--version``, one JSON error object on stdout
for every failure under ``--json`` (usage and OS errors included, ``--json`` anywhere on
the line), a cheap start-up, and config discovery after --config and ANYHSM_CONFIG."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from importlib.metadata import version as dist_version
from pathlib import Path

import pytest
from tests.support.cli import cli

from anyhsm.cli.main import COMMANDS, build_parser, main
from anyhsm.config import config_search_path, find_config
from anyhsm.errors import ConfigError


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


# --- --version and start-up cost -------------------------------------------------------


def test_version_text_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    expected = dist_version("anyhsm")
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out == f"anyhsm {expected}\n"
    code, out, _ = run(capsys, "--version", "--json")
    assert code == 0 and json.loads(out) == {"version": expected, "schema_version": 1}
    code, out, _ = run(capsys, "--json", "--version")
    assert json.loads(out) == {"version": expected, "schema_version": 1}


HEAVY = (
    "cryptography",
    "coincurve",
    "anyhsm.providers",
    "anyhsm.bitcoin",
    "anyhsm.hsm",
    "anyhsm.keystore",
    "anyhsm.tpm",
    "anyhsm.config",
    "anyhsm.cli.core_cmds",
    "anyhsm.cli.bitcoin_cmds",
    "importlib.metadata",
)


def _imported(*args: str) -> set[str]:
    """Every module a fresh ``anyhsm ARGS`` process imports, from ``-X importtime``."""
    code = "import sys; from anyhsm.cli.main import main; sys.exit(main(sys.argv[1:]))"
    r = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    names = set()
    for line in r.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip())
    assert "anyhsm.cli.main" in names  # the parse worked
    return names


@pytest.mark.parametrize("args", [("--version",), ("--help",), ("--version", "--json")])
def test_version_and_help_import_nothing_heavy(args: tuple[str, ...]) -> None:
    names = _imported(*args)
    heavy = sorted(n for n in names if n.startswith(HEAVY))
    assert not heavy, heavy


def test_commands_table_matches_the_registered_commands() -> None:
    """COMMANDS (what --help lists without importing the command modules) is exactly
    what the modules register, help text included."""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    helps = {c.dest: c.help for c in sub._choices_actions}  # type: ignore[attr-defined]
    assert set(sub.choices) == set(COMMANDS)  # type: ignore[arg-type]
    assert helps == {name: text for name, (_, text) in COMMANDS.items()}


def test_top_level_help_lists_every_command(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "250")  # no help line wrapped
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for name, (_, text) in COMMANDS.items():
        assert name in out and text in out
    assert "--version" in out


# --- every failure under --json is one error object on stdout --------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["--json"],  # no command
        ["--json", "no-such-command"],
        ["no-such-command", "--json"],
        ["key", "create", "--json"],  # --label missing; --json after the command
        ["--json", "key", "create", "--label", "x", "--no-such-option"],
        ["sign", "--key", "k", "--json", "--digest"],  # an option without its value
        ["audit", "show", "--limit", "many", "--json"],  # a bad type
        ["verify", "--scheme", "rsa", "--json"],  # a bad choice
        ["--json", "key"],  # a missing sub-command
    ],
)
def test_usage_errors_print_one_json_error(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 2
    body = json.loads(out)  # exactly one JSON document on stdout
    assert set(body) == {"error", "schema_version"}
    assert body["error"]["code"] == "usage_error"
    assert body["error"]["error"] == "UsageError"
    assert body["error"]["message"] and "--help" in body["error"]["hint"]
    assert "error:" in err and "Traceback" not in err


def test_usage_error_without_json_keeps_stdout_empty(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "key", "create")
    assert code == 2 and out == ""
    assert "usage:" in err and "the following arguments are required: --label" in err


def test_os_error_prints_json_error(deployment: Path, tmp_path: Path) -> None:
    """An OS error (here: exporting into a directory that does not exist) is reported as
    os_error, as one JSON object, in a real process."""
    out = tmp_path / "missing-dir" / "audit.copy"
    r = cli(
        "--config",
        str(deployment),
        "audit",
        "export",
        "--out",
        str(out),
        "--json",
        env={"ANYHSM_PASSPHRASE": os.environ["ANYHSM_PASSPHRASE"]},
    )
    assert r.returncode == 2, r.stderr
    body = json.loads(r.stdout)
    assert body["error"]["code"] == "os_error"
    assert body["error"]["error"] == "FileNotFoundError"
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("anyhsm: error: ")


def test_library_error_json_with_json_after_the_command(tmp_path: Path) -> None:
    r = cli(
        "key",
        "list",
        "--json",
        env={"HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "xdg")},
        cwd=tmp_path,
    )
    assert r.returncode == 3
    body = json.loads(r.stdout)
    assert body["error"]["code"] == "config_error"
    # The message names every place searched.
    assert str(tmp_path / "anyhsm.toml") in body["error"]["message"]
    assert str(tmp_path / "xdg" / "anyhsm" / "anyhsm.toml") in body["error"]["message"]
    assert "/etc/anyhsm/anyhsm.toml" in body["error"]["message"]


# --- config discovery --------------------------------------------------------------------


@pytest.fixture
def places(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """A working directory, a HOME, an XDG_CONFIG_HOME and a stand-in for /etc/anyhsm,
    all under tmp_path (the real /etc is never looked at)."""
    p = {
        "cwd": tmp_path / "work",
        "home": tmp_path / "home",
        "xdg": tmp_path / "xdg",
        "etc": tmp_path / "etc-anyhsm",
    }
    for d in p.values():
        d.mkdir()
    monkeypatch.chdir(p["cwd"])
    monkeypatch.setenv("HOME", str(p["home"]))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(p["xdg"]))
    monkeypatch.delenv("ANYHSM_CONFIG", raising=False)
    return p


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# anyhsm\n")
    return path


def test_discovery_order(places: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    etc = _touch(places["etc"] / "anyhsm.toml")
    assert find_config(system_dir=places["etc"]) == etc
    user = _touch(places["xdg"] / "anyhsm" / "anyhsm.toml")
    assert find_config(system_dir=places["etc"]) == user
    here = _touch(places["cwd"] / "anyhsm.toml")
    assert find_config(system_dir=places["etc"]).resolve() == here.resolve()
    named = _touch(places["home"] / "named.toml")
    monkeypatch.setenv("ANYHSM_CONFIG", str(named))
    assert find_config(system_dir=places["etc"]) == named
    flag = _touch(places["home"] / "flag.toml")
    assert find_config(str(flag), system_dir=places["etc"]) == flag


def test_xdg_defaults_to_home_dot_config(
    places: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("XDG_CONFIG_HOME")
    user = _touch(places["home"] / ".config" / "anyhsm" / "anyhsm.toml")
    assert find_config(system_dir=places["etc"]) == user
    # A relative XDG_CONFIG_HOME is invalid per the spec and ignored.
    monkeypatch.setenv("XDG_CONFIG_HOME", "relative/dir")
    assert find_config(system_dir=places["etc"]) == user


def test_named_config_never_falls_back(
    places: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    _touch(places["cwd"] / "anyhsm.toml")
    missing = places["home"] / "missing.toml"
    monkeypatch.setenv("ANYHSM_CONFIG", str(missing))
    assert find_config(system_dir=places["etc"]) == missing


def test_nothing_found_names_every_place(places: dict[str, Path]) -> None:
    with pytest.raises(ConfigError) as exc:
        find_config(system_dir=places["etc"])
    for where in config_search_path(system_dir=places["etc"]):
        assert str(where) in exc.value.message
    assert "--config" in (exc.value.hint or "")


def test_cli_finds_the_config_in_the_working_directory(
    deployment: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`anyhsm init` writes anyhsm.toml: run from its directory, no --config is needed."""
    env = {
        "ANYHSM_PASSPHRASE": os.environ["ANYHSM_PASSPHRASE"],
        "HOME": str(tmp_path),
        "XDG_CONFIG_HOME": str(tmp_path / "xdg"),
    }
    assert deployment.name == "anyhsm.toml"
    r = cli("key", "list", "--json", env=env, cwd=deployment.parent)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["keys"] == []
    # ... and from $XDG_CONFIG_HOME/anyhsm/anyhsm.toml, elsewhere.
    (tmp_path / "xdg" / "anyhsm").mkdir(parents=True)
    (tmp_path / "xdg" / "anyhsm" / "anyhsm.toml").symlink_to(deployment)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = cli("key", "list", "--json", env=env, cwd=elsewhere)
    assert r.returncode == 0, r.stderr


# --- text output shows no Python reprs -------------------------------------------------


def test_text_value_has_no_python_reprs() -> None:
    from anyhsm.cli.app import text_value

    assert text_value(True) == "yes" and text_value(False) == "no"
    assert text_value(None) == "none" and text_value([]) == "none"
    assert text_value([1, 2]) == "1, 2"
    status = {
        "state": "ok",
        "recorded": None,
        "live": 3,
        "error": {"code": "x", "ok": False},
        "pcrs": [0, 7],
    }
    assert text_value(status) == (
        "state=ok, recorded=none, live=3, error=(code=x, ok=no), pcrs=(0, 7)"
    )


def test_tpm_status_text_renders_through_text_value() -> None:
    """``tpm status`` text goes through the one renderer (no dict or True in its lines)."""
    from anyhsm.cli import tpm_cmds

    line = tpm_cmds._text({"enrolled": True, "tpm": {"reachable": False, "counter": None}})
    assert line == "enrolled=yes, tpm=(reachable=no, counter=none)"
    assert "{" not in line and "True" not in line and "None" not in line


# --- help shows every default -------------------------------------------------------------


def _parsers(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _parsers(child, (*path, name))


def test_help_shows_the_default_of_every_option_that_has_one() -> None:
    from anyhsm.cli.main import HelpFormatter

    missing = []
    for path, parser in _parsers(build_parser()):
        formatter = HelpFormatter(prog="anyhsm")
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction | argparse._HelpAction):
                continue
            if action.help == argparse.SUPPRESS:
                continue
            if action.default in (None, False, argparse.SUPPRESS):
                continue
            text = formatter._get_help_string(action) or ""
            shown = "default" in text and bool(action.help and action.help.strip())
            if not shown:
                missing.append((" ".join(path), action.dest))
    assert not missing, missing


def test_help_renders_the_defaults(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "250")  # no line wrapped inside "(default: X)"
    code, out, _ = run(capsys, "init", "--help")
    assert code == 0
    assert "(default: regtest)" in out and "(default: development)" in out
    code, out, _ = run(capsys, "descriptor", "--help")
    assert "(default: wpkh)" in out and "(default: 0)" in out


# --- shell completion -----------------------------------------------------------------------


def _tree() -> dict[str, list[str]]:
    """Every command path and its sub-commands, from the parser itself."""
    out: dict[str, list[str]] = {}
    for path, parser in _parsers(build_parser()):
        subs = [
            name
            for a in parser._actions
            if isinstance(a, argparse._SubParsersAction)
            for name in a.choices
        ]
        out[" ".join(path)] = subs
    return out


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_script_lists_every_command(
    shell: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "completion", shell)
    assert code == 0 and out.endswith("\n")
    tree = _tree()
    assert len(tree) > 30  # every level, not just the top
    for path, subs in tree.items():
        for sub in subs:
            assert sub in out, (path, sub)
    for opt in ("config", "json", "passphrase-file", "label", "network", "out"):
        assert (f"--{opt}" if shell != "fish" else f"-l {opt}") in out
    assert "--mnemonic " not in out and "--mnemonic'" not in out  # refused forms not offered
    code, out, _ = run(capsys, "completion", shell, "--json")
    assert json.loads(out)["shell"] == shell


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_bash_completion_completes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The script really completes in bash: every sub-command at every level, options,
    and the choices of an option."""
    code, out, _ = run(capsys, "completion", "bash")
    assert code == 0
    script = tmp_path / "anyhsm.bash"
    script.write_text(out)
    subprocess.run(["bash", "-n", str(script)], check=True)
    probe = [
        f"source {script}",
        't() { COMP_WORDS=("$@"); COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); COMPREPLY=(); '
        '_anyhsm; echo "${COMPREPLY[*]}"; }',
    ]
    cases = [(path, subs) for path, subs in _tree().items() if subs]
    for path, _ in cases:
        probe.append(f"t anyhsm {path} ''")
    probe += ["t anyhsm --json key cr", "t anyhsm init --network ''", "t anyhsm psbt sign --o"]
    r = subprocess.run(["bash", "-c", "\n".join(probe)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    answers = r.stdout.split("\n")
    for (_path, subs), got in zip(cases, answers, strict=False):
        assert got.split() == subs
    assert answers[len(cases) :][:3] == [
        "create",
        "mainnet testnet testnet4 signet regtest",
        "--out",
    ]


def test_a_closed_stdout_is_not_an_error(tmp_path: Path) -> None:
    """``anyhsm ... | head -1``: no 'Broken pipe' error line, the SIGPIPE status."""
    code = (
        "import subprocess, sys\n"
        "p = subprocess.Popen([sys.executable, '-m', 'anyhsm.cli.main', 'completion', 'bash'],"
        " stdout=subprocess.PIPE, stderr=subprocess.PIPE)\n"
        "p.stdout.close()\n"  # before the child (still importing) writes anything
        "err = p.stderr.read(); rc = p.wait()\n"
        "print(rc, repr(err))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    rc, err = r.stdout.split(" ", 1)
    assert int(rc) == 141 and err.strip() == "b''", r.stdout
