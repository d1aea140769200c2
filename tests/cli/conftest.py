"""Real devices for the end-to-end tests of this folder, one per test module: a fresh
SoftHSM2 token (labelled after the module) and a swtpm on a free loopback port."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest


def _module_tag(request: pytest.FixtureRequest) -> str:
    return request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_").replace("_", "-")


@pytest.fixture(scope="module")
def token(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> object:
    from tests.support.softhsm import find_softhsm_module, init_softhsm

    if find_softhsm_module() is None or importlib.util.find_spec("pkcs11") is None:
        pytest.skip("SoftHSM2 / python-pkcs11 not installed (scripts/test.sh installs them)")
    tag = _module_tag(request)
    return init_softhsm(tmp_path_factory.mktemp(f"softhsm-{tag}"), label=tag[:32])


@pytest.fixture(scope="module")
def tpm(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[object]:
    from tests.support.swtpm import start_swtpm, swtpm_available

    if not swtpm_available() or importlib.util.find_spec("tpm2_pytss") is None:
        pytest.skip("swtpm / tpm2-pytss not installed (scripts/install-tpm.sh installs them)")
    t = start_swtpm(tmp_path_factory.mktemp(f"swtpm-{_module_tag(request)}"))
    yield t
    t.stop()


def use_tpm_chain(deployment: Path, tpm: object) -> list[str]:
    """Point a test deployment's chain at ``["tpm", "software"]`` on ``tpm`` (a running
    swtpm); returns the CLI's ``--config`` arguments."""
    tcti = tpm.tcti  # type: ignore[attr-defined]
    text = deployment.read_text().replace('chain = ["software"]', 'chain = ["tpm", "software"]')
    deployment.write_text(text + f'\n[providers.tpm]\ntcti = "{tcti}"\n')
    return ["--config", str(deployment)]
