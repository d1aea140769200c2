"""Opening the provider: token selection, PIN sources and failures, each as a typed error."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from tests.providers.pkcs11.conftest import ProviderMaker, unique_label
from tests.support.softhsm import SoftHsmToken

from anyhsm.errors import (
    ConfigError,
    PinLocked,
    PinMissing,
    PinRejected,
    ProviderNotInstalled,
    ProviderUnavailable,
)
from anyhsm.provider import ProviderContext
from anyhsm.providers.pkcs11 import cryptoki as pkcs11_cryptoki
from anyhsm.providers.pkcs11.errors import CKR_PIN_LOCKED
from anyhsm.providers.pkcs11.module import loaded_module
from anyhsm.providers.pkcs11.provider import Pkcs11Provider
from anyhsm.types import Environment, KeySpec, Network

REPO = Path(__file__).resolve().parents[3]


# --- token selection --------------------------------------------------------------------


def test_select_by_label(
    make_provider: ProviderMaker, softhsm: SoftHsmToken, second_token: SoftHsmToken
) -> None:
    p = make_provider(token=second_token)
    assert p.store_id() == f"pkcs11:{second_token.serial}"
    details = p.health().details
    assert details["token_label"] == second_token.label
    assert details["token_serial"] == second_token.serial


def test_select_by_serial(
    make_provider: ProviderMaker, softhsm: SoftHsmToken, second_token: SoftHsmToken
) -> None:
    p = make_provider(token=second_token, token_label=None, token_serial=second_token.serial)
    assert p.health().details["token_label"] == second_token.label
    q = make_provider(token_label=None, token_serial=softhsm.serial)
    assert q.health().details["token_label"] == softhsm.label


def test_keys_stay_on_their_token(
    make_provider: ProviderMaker, softhsm: SoftHsmToken, second_token: SoftHsmToken
) -> None:
    one = make_provider()
    two = make_provider(token=second_token)
    info = two.generate_key(KeySpec(unique_label()))
    assert info.store == f"pkcs11:{second_token.serial}"
    assert info.id not in {k.id for k in one.list_keys()}
    assert two.get_key(info.id) == info


def test_label_and_serial_must_both_match(
    make_provider: ProviderMaker, second_token: SoftHsmToken
) -> None:
    with pytest.raises(ProviderUnavailable, match="no PKCS#11 token"):
        make_provider(token_serial=second_token.serial)  # main label, second serial


def test_absent_token_label(make_provider: ProviderMaker) -> None:
    with pytest.raises(ProviderUnavailable, match="no PKCS#11 token") as err:
        make_provider(token_label="no-such-token-" + unique_label())
    assert "token_label" in (err.value.hint or "")


def test_token_added_after_the_module_was_loaded_is_found(
    make_provider: ProviderMaker, softhsm: SoftHsmToken
) -> None:
    from tests.support.softhsm import add_token

    first = make_provider()
    assert loaded_module(softhsm.module) is not None
    late = add_token(softhsm, "anyhsm-pkcs11-late")
    p = make_provider(token=late)  # found after a module re-initialisation
    assert p.store_id() == f"pkcs11:{late.serial}"
    info = first.generate_key(KeySpec(unique_label()))  # the first provider reconnects
    assert first.get_key(info.id) == info


# --- module ----------------------------------------------------------------------------------


def test_missing_module_is_unavailable(make_provider: ProviderMaker, tmp_path: Path) -> None:
    with pytest.raises(ProviderUnavailable, match="module not found"):
        make_provider(module=str(tmp_path / "nope" / "libvendor-pkcs11.so"))


def test_module_that_is_not_a_library(make_provider: ProviderMaker, tmp_path: Path) -> None:
    fake = tmp_path / "libfake.so"
    fake.write_bytes(b"not an ELF file")
    with pytest.raises(ProviderUnavailable, match="cannot load"):
        make_provider(module=str(fake))


def test_library_that_is_not_pkcs11(make_provider: ProviderMaker) -> None:
    import ctypes.util

    libz = ctypes.util.find_library("z")
    candidates = [
        p for p in ("/lib/x86_64-linux-gnu/libz.so.1", "/usr/lib/libz.so.1") if os.path.isfile(p)
    ]
    if not candidates:
        pytest.skip(f"no plain shared library found to try (find_library says {libz})")
    with pytest.raises(ProviderUnavailable, match="cannot load"):
        make_provider(module=candidates[0])


def test_without_python_pkcs11(
    make_provider: ProviderMaker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault injection: the optional extra is missing."""
    p = make_provider(open=False)
    monkeypatch.setitem(sys.modules, "pkcs11", None)
    with pytest.raises(ProviderNotInstalled) as err:
        p.open()
    assert err.value.hint == "pip install 'anyhsm[pkcs11]'"


def test_importing_the_provider_does_not_import_pkcs11() -> None:
    code = (
        "import sys, anyhsm, anyhsm.providers.pkcs11.provider, anyhsm.providers.pkcs11.wrap;"
        "assert 'pkcs11' not in sys.modules, 'pkcs11 imported';"
        "print('ok')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=dict(os.environ, PYTHONPATH=str(REPO / "src")),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


# --- PIN ----------------------------------------------------------------------------------


def test_wrong_pin_is_rejected(make_provider: ProviderMaker) -> None:
    with pytest.raises(PinRejected) as err:
        make_provider(pin="000000000")
    text = str(err.value)
    assert "PIN" in text and "rejected" in text
    assert "CKR_PIN_INCORRECT" in text


def test_second_user_with_a_different_pin_is_rejected(make_provider: ProviderMaker) -> None:
    """Login is per process: a second provider must not ride on the first one's login."""
    make_provider()
    with pytest.raises(PinRejected, match="PIN"):
        make_provider(pin="99999999")


def test_softhsm2_does_not_lock_the_pin(make_provider: ProviderMaker) -> None:
    """SoftHSM2 has no retry counter: after many wrong PINs the right one still works
    (it only sets CKF_USER_PIN_COUNT_LOW). Real HSMs lock; see the fault test below."""
    for _ in range(12):
        with pytest.raises(PinRejected):
            make_provider(pin="12121212")
    assert make_provider().health().ok


def test_locked_pin_is_reported(
    make_provider: ProviderMaker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault injection around the real token: C_Login answers CKR_PIN_LOCKED."""
    monkeypatch.setattr(pkcs11_cryptoki.Cryptoki, "login", lambda self, s, pin: CKR_PIN_LOCKED)
    with pytest.raises(PinLocked, match="CKR_PIN_LOCKED") as err:
        make_provider()
    assert "security officer" in (err.value.hint or "")


def test_no_pin_configured(make_provider: ProviderMaker) -> None:
    """No PIN at all is an authentication failure (exit 5), not a configuration error."""
    with pytest.raises(PinMissing, match="ANYHSM_PKCS11_PIN") as exc:
        make_provider(pin=None)
    assert exc.value.exit_code == 5


def _pin_file(tmp_path: Path, text: str, mode: int) -> Path:
    path = tmp_path / f"pin-{unique_label()}"
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)
    return path


def test_pin_file(make_provider: ProviderMaker, softhsm: SoftHsmToken, tmp_path: Path) -> None:
    path = _pin_file(tmp_path, softhsm.pin + "\n", 0o600)
    p = make_provider(pin=None, pin_file=str(path), environment=Environment.PRODUCTION)
    assert p.health().ok


def test_pin_file_relative_to_config_dir(
    make_provider: ProviderMaker, softhsm: SoftHsmToken, tmp_path: Path
) -> None:
    path = _pin_file(tmp_path, softhsm.pin, 0o600)
    assert make_provider(pin=None, pin_file=path.name).health().ok


def test_pin_file_wins_over_the_environment(make_provider: ProviderMaker, tmp_path: Path) -> None:
    path = _pin_file(tmp_path, "11111111\n", 0o600)
    with pytest.raises(PinRejected):
        make_provider(pin_file=str(path))  # env has the right PIN, the file does not


@pytest.mark.parametrize("mode", [0o640, 0o644, 0o604, 0o660])
def test_open_pin_file_is_refused_in_production(
    make_provider: ProviderMaker, softhsm: SoftHsmToken, tmp_path: Path, mode: int
) -> None:
    path = _pin_file(tmp_path, softhsm.pin, mode)
    with pytest.raises(ConfigError, match="group or others") as err:
        make_provider(pin=None, pin_file=str(path), environment=Environment.PRODUCTION)
    assert "chmod 600" in (err.value.hint or "")


def test_open_pin_file_is_allowed_in_development(
    make_provider: ProviderMaker, softhsm: SoftHsmToken, tmp_path: Path
) -> None:
    path = _pin_file(tmp_path, softhsm.pin, 0o644)
    assert make_provider(pin=None, pin_file=str(path)).health().ok


def test_missing_or_empty_pin_file(make_provider: ProviderMaker, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        make_provider(pin=None, pin_file=str(tmp_path / "absent"))
    empty = _pin_file(tmp_path, "\n", 0o600)
    with pytest.raises(ConfigError, match="empty"):
        make_provider(pin=None, pin_file=str(empty))


def test_pin_file_symlink_is_refused(
    make_provider: ProviderMaker, softhsm: SoftHsmToken, tmp_path: Path
) -> None:
    target = _pin_file(tmp_path, softhsm.pin, 0o600)
    link = tmp_path / "pin-link"
    link.symlink_to(target)
    with pytest.raises(ConfigError, match="cannot be opened"):
        make_provider(pin=None, pin_file=str(link))


# --- settings -----------------------------------------------------------------------------


def _ctx(settings: dict[str, object]) -> ProviderContext:
    return ProviderContext(
        environment=Environment.DEVELOPMENT,
        network=Network.REGTEST,
        config_dir=Path("/etc/anyhsm"),
        settings=settings,
    )


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"token_label": "x"}, "module is required"),
        ({"module": "", "token_label": "x"}, "non-empty"),
        ({"module": "/m.so"}, "token_label or token_serial"),
        ({"module": "/m.so", "token_label": 5}, "token_label"),
        ({"module": "/m.so", "token_label": "x", "pool_size": 0}, "pool_size"),
        ({"module": "/m.so", "token_label": "x", "pool_size": "4"}, "pool_size"),
        ({"module": "/m.so", "token_label": "x", "pool_size": True}, "pool_size"),
        ({"module": "/m.so", "token_label": "x", "pool_size": 1000}, "pool_size"),
        ({"module": "/m.so", "token_label": "x", "threadsafe_module": "yes"}, "threadsafe"),
        ({"module": "/m.so", "token_label": "x", "pin": "1234"}, "never live in the config"),
        ({"module": "/m.so", "token_label": "x", "pin_file": 3}, "pin_file"),
    ],
)
def test_bad_settings_are_config_errors(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Pkcs11Provider(_ctx(settings))


def test_relative_module_path_is_relative_to_config_dir() -> None:
    p = Pkcs11Provider(_ctx({"module": "lib/p11.so", "token_label": "x"}))
    assert p.settings.module == Path("/etc/anyhsm/lib/p11.so")
    assert p.settings.pool_size == 4
    assert p.settings.threadsafe_module is False
