"""Fixtures for the PKCS#11 provider tests: real SoftHSM2 tokens, opened providers.

Everything runs against SoftHSM2 through its real module: the session's ``softhsm``
token (tests/conftest.py); tests are skipped (with the reason) only when SoftHSM2 or
python-pkcs11 is not installed. CI installs both (scripts/install-softhsm.sh), so
nothing is skipped there.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tests.support.softhsm import SoftHsmToken

from anyhsm.provider import ProviderContext
from anyhsm.providers.pkcs11.provider import Pkcs11Provider  # (imports no pkcs11)
from anyhsm.types import Environment, Network

PIN_ENV = "ANYHSM_PKCS11_PIN"
ProviderMaker = Callable[..., Pkcs11Provider]


_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything here runs against SoftHSM2: mark it (select with -m pkcs11)."""
    for item in items:
        if item.path.resolve().is_relative_to(_HERE):
            item.add_marker(pytest.mark.pkcs11)


@pytest.fixture(scope="session")
def second_token(new_token: Callable[[str], SoftHsmToken]) -> SoftHsmToken:
    """Another token in the session's SoftHSM2 configuration (token selection tests)."""
    return new_token("anyhsm-pkcs11-second")


def unique_label(prefix: str = "key") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def make_provider(
    softhsm: SoftHsmToken, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[ProviderMaker]:
    """Build (and by default open) providers; all are closed after the test.

    Keyword arguments become ``[providers.pkcs11]`` settings (a value of None removes
    the default one); ``token``, ``pin``, ``environment``, ``timeout_s`` and ``open``
    control the rest. The PIN goes through ANYHSM_PKCS11_PIN unless ``pin`` is None.
    """
    made: list[Pkcs11Provider] = []

    def make(
        *,
        token: SoftHsmToken | None = None,
        pin: str | None = "",
        environment: Environment = Environment.DEVELOPMENT,
        timeout_s: float = 20.0,
        open: bool = True,
        **settings: object,
    ) -> Pkcs11Provider:
        tok = token or softhsm
        table: dict[str, object] = {"module": tok.module, "token_label": tok.label}
        for key, value in settings.items():
            if value is None:
                table.pop(key, None)
            else:
                table[key] = value
        if pin is None:
            monkeypatch.delenv(PIN_ENV, raising=False)
        else:
            monkeypatch.setenv(PIN_ENV, pin or tok.pin)
        context = ProviderContext(
            environment=environment,
            network=Network.REGTEST,
            config_dir=tmp_path,
            settings=table,
            timeout_s=timeout_s,
        )
        provider = Pkcs11Provider(context)
        made.append(provider)
        if open:
            provider.open()
        return provider

    yield make
    for provider in reversed(made):
        provider.close()


@pytest.fixture
def provider(make_provider: ProviderMaker) -> Pkcs11Provider:
    """An open provider on the main token."""
    return make_provider()
