"""The golden error table: every error class -> (stable code, exit status), pinned as a
literal so that any change is deliberate, checked against docs/operator-guide.md section 8,
and the contract behind it (issue 10 item 5): every authentication failure exits 5, through
whatever chain, on real deployments (software keystore, SoftHSM2 token); a lock timeout
has its own status (10, tested with two processes in tests/reliability/test_lock_wait.py).
"""

from __future__ import annotations

import inspect
import json
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest
from tests.conftest import PASSPHRASE
from tests.support.softhsm import SoftHsmToken

import anyhsm.bitcoin.sighash
import anyhsm.errors
import anyhsm.tpm.errors
from anyhsm import open_hsm
from anyhsm.cli.main import main
from anyhsm.errors import AuthenticationFailed, HsmError

DOC = Path(__file__).resolve().parents[2] / "docs" / "operator-guide.md"

GOLDEN: dict[str, tuple[str, int]] = {
    # anyhsm.errors
    "HsmError": ("hsm_error", 1),
    "ConfigError": ("config_error", 3),
    "SecretFileExposed": ("secret_file_exposed", 3),
    "SecretOnCommandLine": ("secret_on_command_line", 2),
    "UsageError": ("usage_error", 2),
    "ProviderError": ("provider_error", 4),
    "ProviderUnavailable": ("provider_unavailable", 4),
    "ProviderTimeout": ("provider_timeout", 4),
    "ProviderNotInstalled": ("provider_not_installed", 4),
    "UnsupportedOperation": ("unsupported_operation", 4),
    "AuthenticationFailed": ("authentication_failed", 5),
    "PinRejected": ("pin_rejected", 5),
    "PinLocked": ("pin_locked", 5),
    "PinMissing": ("pin_missing", 5),
    "KeystoreError": ("keystore_error", 8),
    "WrongPassphrase": ("wrong_passphrase", 5),
    "KeystoreCorrupted": ("keystore_corrupted", 8),
    "KeystoreTampered": ("keystore_tampered", 8),
    "UnsupportedFormatVersion": ("unsupported_format_version", 8),
    "KeystoreNotFound": ("keystore_not_found", 3),
    "KeystoreExists": ("keystore_exists", 8),
    "LockTimeout": ("lock_timeout", 10),
    "AnchorMissing": ("anchor_missing", 8),
    "AnchorMismatch": ("anchor_mismatch", 8),
    "KeystoreRolledBack": ("keystore_rolled_back", 8),
    "RecordNotInManifest": ("record_not_in_manifest", 8),
    "ManifestMissing": ("manifest_missing", 8),
    "KeystoreRotated": ("keystore_rotated", 8),
    "HsmKeyError": ("key_error", 6),
    "KeyNotFound": ("key_not_found", 6),
    "KeyExists": ("key_exists", 6),
    "ExportNotAllowed": ("export_not_allowed", 7),
    "InvalidKeyMaterial": ("invalid_key_material", 6),
    "KeyNotInDirectory": ("key_not_in_directory", 6),
    "KeyLabelConflict": ("key_label_conflict", 6),
    "KeyBindingMismatch": ("key_binding_mismatch", 8),
    "InvalidDigest": ("invalid_digest", 2),
    "SigningFailed": ("signing_failed", 4),
    "PolicyViolation": ("policy_violation", 7),
    "SecurityLevelTooLow": ("security_level_too_low", 7),
    "NetworkMismatch": ("network_mismatch", 7),
    "EnrolmentOnlyHandle": ("enrolment_only_handle", 7),
    "AllProvidersFailed": ("all_providers_failed", 4),
    "AuditError": ("audit_error", 8),
    "AuditWriteFailed": ("audit_write_failed", 8),
    "AuditTampered": ("audit_tampered", 8),
    "AuditStateMismatch": ("audit_state_mismatch", 8),
    "AuditKeyRotated": ("audit_key_rotated", 8),
    "BitcoinError": ("bitcoin_error", 2),
    "EncodingError": ("encoding_error", 2),
    "TransactionError": ("transaction_error", 2),
    "ScriptError": ("script_error", 2),
    "AddressError": ("address_error", 2),
    "Bip32Error": ("bip32_error", 2),
    "MnemonicError": ("mnemonic_error", 2),
    "DescriptorError": ("descriptor_error", 2),
    "MessageError": ("message_error", 2),
    "PsbtError": ("psbt_error", 2),
    "PsbtLimitExceeded": ("psbt_limit_exceeded", 2),
    "SigningPolicyError": ("signing_policy", 7),
    "SpendingPolicyRefused": ("spending_policy_refused", 7),
    "PolicyNotAuthenticated": ("policy_not_authenticated", 7),
    "ApprovalRejected": ("approval_rejected", 7),
    "NothingSigned": ("nothing_signed", 9),
    # anyhsm.errors: the signing service and its client
    "ServiceError": ("service_error", 11),
    "Unauthenticated": ("unauthenticated", 5),
    "Forbidden": ("forbidden", 7),
    "InvalidRequest": ("invalid_request", 2),
    "RequestTooLarge": ("request_too_large", 2),
    "EndpointNotFound": ("endpoint_not_found", 2),
    "MethodNotAllowed": ("method_not_allowed", 2),
    "IdempotencyConflict": ("idempotency_conflict", 2),
    "RateLimited": ("rate_limited", 11),
    "ServiceBusy": ("service_busy", 11),
    "RequestTimedOut": ("request_timeout", 11),
    "ServiceUnreachable": ("service_unreachable", 11),
    # anyhsm.tpm.errors
    "TpmNotEnrolled": ("tpm_not_enrolled", 4),
    "TpmPolicyMismatch": ("tpm_policy_mismatch", 4),
    "TpmBlobInvalid": ("tpm_blob_invalid", 4),
    "TpmForeignBlob": ("tpm_blob_foreign", 4),
    "TpmLockout": ("tpm_lockout", 4),
    "TpmCommandFailed": ("tpm_command_failed", 4),
    # anyhsm.bitcoin.sighash
    "SighashError": ("sighash_error", 2),
    "InvalidSighashType": ("invalid_sighash_type", 2),
    "SighashSingleWithoutOutput": ("sighash_single_without_output", 2),
}
"""Class name -> (code, exit status). Change it only together with the class and the doc."""

ERROR_MODULES: tuple[ModuleType, ...] = (anyhsm.errors, anyhsm.tpm.errors, anyhsm.bitcoin.sighash)
CLI_CODES = {"os_error", "interrupted", "internal_error"}
"""Codes the CLI itself prints for failures that are not anyhsm errors (docs/cli.md)."""
AUTHENTICATION_EXIT = 5


def defined_errors() -> dict[str, type[HsmError]]:
    """Every HsmError subclass defined in the error modules, by class name."""
    found: dict[str, type[HsmError]] = {}
    for module in ERROR_MODULES:
        for name, obj in vars(module).items():
            if (
                inspect.isclass(obj)
                and issubclass(obj, HsmError)
                and obj.__module__ == module.__name__
            ):
                assert name not in found, f"{name} defined twice"
                found[name] = obj
    return found


def test_every_error_class_is_pinned() -> None:
    actual = {name: (cls.code, cls.exit_code) for name, cls in defined_errors().items()}
    assert actual == GOLDEN


def test_no_subclass_outside_the_pinned_modules() -> None:
    """An HsmError subclass anywhere in the loaded package is in the table (a new module
    defining errors must be added to ERROR_MODULES)."""
    pending = list(HsmError.__subclasses__())
    seen: set[type[HsmError]] = set()
    while pending:
        cls = pending.pop()
        if cls in seen:
            continue
        seen.add(cls)
        pending.extend(cls.__subclasses__())
    ours = {c for c in seen if c.__module__.startswith("anyhsm.")}
    assert {c.__name__ for c in ours} <= set(GOLDEN), {c.__module__ for c in ours}


def test_codes_are_unique_and_distinct_from_the_cli_codes() -> None:
    codes = [code for code, _ in GOLDEN.values()]
    assert len(codes) == len(set(codes))
    assert not set(codes) & CLI_CODES
    assert all(re.fullmatch(r"[a-z][a-z0-9_]*", c) for c in codes)


def test_every_authentication_failure_exits_5() -> None:
    for name, cls in defined_errors().items():
        if issubclass(cls, AuthenticationFailed):
            assert cls.exit_code == AUTHENTICATION_EXIT, name
    assert {n for n, c in defined_errors().items() if issubclass(c, AuthenticationFailed)} == {
        "AuthenticationFailed",
        "PinRejected",
        "PinLocked",
        "PinMissing",
        "WrongPassphrase",
    }


# --- the doc ------------------------------------------------------------------------------


def _section_8() -> str:
    text = DOC.read_text(encoding="utf-8")
    start = text.index("## 8. Exit codes")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else len(text)]


def test_the_doc_lists_every_class_with_its_code_and_exit() -> None:
    rows = re.findall(r"^\| (\d+) \| `([a-z0-9_]+)` \| `(\w+)` \|$", _section_8(), re.M)
    documented = {name: (code, int(status)) for status, code, name in rows}
    assert len(rows) == len(documented), "a class is listed twice"
    assert documented == GOLDEN


def test_the_doc_explains_every_exit_status() -> None:
    meanings = {int(s) for s in re.findall(r"^\| (\d+) \| (?!`)", _section_8(), re.M)}
    used = {status for _, status in GOLDEN.values()}
    assert used <= meanings
    from anyhsm.cli.main import EXIT_BROKEN_PIPE, EXIT_INTERNAL, EXIT_INTERRUPTED

    cli_only = {0, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE}
    assert cli_only <= meanings
    assert meanings - used <= cli_only  # no status documented but unused


# --- authentication failures exit 5 on real deployments --------------------------------


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, object], str]:
    code = main([*args, "--json"])
    out, err = capsys.readouterr()
    return code, json.loads(out) if out.strip() else {}, err


def _error(out: dict[str, object]) -> dict[str, object]:
    err = out["error"]
    assert isinstance(err, dict)
    return err


def test_wrong_passphrase_on_a_software_deployment(
    deployment: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ANYHSM_PASSPHRASE", "not the passphrase at all")
    code, out, err = run(capsys, "--config", str(deployment), "key", "list")
    assert code == 5, err
    assert _error(out)["code"] == "wrong_passphrase"
    details = _error(out)["details"]
    assert isinstance(details, list) and details[0]["name"] == "software"


def test_missing_passphrase_is_an_authentication_failure(
    deployment: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """No ANYHSM_PASSPHRASE, no passphrase file, no terminal (pytest's stdin is not one)."""
    monkeypatch.delenv("ANYHSM_PASSPHRASE")
    code, out, err = run(capsys, "--config", str(deployment), "key", "list")
    assert code == 5, err
    assert _error(out)["code"] == "authentication_failed"
    assert "no passphrase" in str(_error(out)["message"])


def test_mixed_reasons_stay_all_providers_failed(
    deployment: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A provider that is simply not there and a missing passphrase: not a credential
    problem alone, so the chain's own error (exit 4), with both reasons."""
    text = deployment.read_text().replace('chain = ["software"]', 'chain = ["pkcs11", "software"]')
    deployment.write_text(
        text + '\n[providers.pkcs11]\nmodule = "/nonexistent/libhsm.so"\ntoken_label = "x"\n'
    )
    monkeypatch.delenv("ANYHSM_PASSPHRASE")
    monkeypatch.setenv("ANYHSM_PKCS11_PIN", "1234")
    code, out, err = run(capsys, "--config", str(deployment), "key", "list")
    assert code == 4, err
    assert _error(out)["code"] == "all_providers_failed"
    assert [d["name"] for d in _error(out)["details"]] == ["pkcs11", "software"]  # type: ignore[union-attr,index]


# --- PKCS#11 (real SoftHSM2 token) ------------------------------------------------------


def with_token(deployment: Path, token: SoftHsmToken, chain: str, top: str = "") -> Path:
    text = deployment.read_text().replace('chain = ["software"]', f"chain = {chain}")
    text = top + text
    text += f'\n[providers.pkcs11]\nmodule = "{token.module}"\ntoken_label = "{token.label}"\n'
    deployment.write_text(text)
    return deployment


def test_wrong_passphrase_behind_a_pkcs11_provider(
    deployment: Path,
    token: SoftHsmToken,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The token opens; the keystore that holds the audit key does not (it was exit 8,
    'damaged or tampered')."""
    with_token(deployment, token, '["pkcs11", "software"]')
    monkeypatch.setenv("ANYHSM_PKCS11_PIN", token.pin)
    monkeypatch.setenv("ANYHSM_PASSPHRASE", "not the passphrase at all")
    code, out, err = run(capsys, "--config", str(deployment), "key", "list")
    assert code == 5, err
    assert _error(out)["code"] == "wrong_passphrase"
    rows = {(d["name"], d.get("purpose")) for d in _error(out)["details"]}  # type: ignore[union-attr,index]
    assert ("pkcs11", None) in rows and ("software", "keystore") in rows


def test_wrong_pin_when_the_floor_skips_the_rest_of_the_chain(
    deployment: Path,
    token: SoftHsmToken,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A minimum of hsm: software is skipped by policy, so the token's refusal of the PIN is
    the reason (it was exit 7, security_level_too_low)."""
    with_token(deployment, token, '["pkcs11", "software"]', 'min_security_level = "hsm"\n')
    monkeypatch.setenv("ANYHSM_PKCS11_PIN", "000000-wrong")
    code, out, err = run(capsys, "--config", str(deployment), "key", "list")
    assert code == 5, err
    assert _error(out)["code"] == "pin_rejected"
    statuses = {d["name"]: d["status"] for d in _error(out)["details"]}  # type: ignore[union-attr,index]
    assert statuses == {"pkcs11": "unavailable", "software": "below_minimum"}


def test_wrong_pin_on_a_token_only_chain(
    deployment: Path,
    token: SoftHsmToken,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """It was exit 4 (all_providers_failed)."""
    with_token(deployment, token, '["pkcs11"]')
    monkeypatch.setenv("ANYHSM_PKCS11_PIN", "000000-wrong")
    code, out, err = run(capsys, "--config", str(deployment), "key", "list")
    assert code == 5, err
    assert _error(out)["code"] == "pin_rejected"
    # the library raises the same class
    with pytest.raises(anyhsm.errors.PinRejected):
        open_hsm(deployment, passphrase=PASSPHRASE)


@pytest.mark.parametrize(
    ("ckr", "code"),
    [
        ("CKR_PIN_INCORRECT", "pin_rejected"),
        ("CKR_PIN_INVALID", "pin_rejected"),
        ("CKR_PIN_LEN_RANGE", "pin_rejected"),
        ("CKR_PIN_LOCKED", "pin_locked"),
        ("CKR_PIN_EXPIRED", "authentication_failed"),
    ],
)
def test_the_pkcs11_pin_translations_are_authentication_failures(ckr: str, code: str) -> None:
    from anyhsm.providers.pkcs11 import errors as pkcs11_errors

    rv = next(v for v, n in pkcs11_errors.CKR_NAMES.items() if n == ckr)
    err = pkcs11_errors.translate_rv(rv, "logging in")
    assert err.code == code and err.exit_code == AUTHENTICATION_EXIT


if __name__ == "__main__":  # print the doc's class table (paste into section 8)
    for name, (code, status) in sorted(GOLDEN.items(), key=lambda kv: (kv[1][1], kv[1][0])):
        sys.stdout.write(f"| {status} | `{code}` | `{name}` |\n")
