"""The one place where PKCS#11 failures become typed anyhsm errors.

Every python-pkcs11 exception and every raw ``CK_RV`` returned by the few
calls anyhsm makes itself (C_Initialize, C_Login, ...) is translated here into
an :class:`~anyhsm.errors.HsmError` whose message names the ``CKR_*`` code and
whose hint says what the operator can do about it. This module does not
import python-pkcs11: exceptions are recognised by their class name, so the
table can be read (and tested) without the optional dependency.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from anyhsm.errors import (
    AuthenticationFailed,
    HsmError,
    KeyNotFound,
    PinLocked,
    PinRejected,
    ProviderError,
    ProviderUnavailable,
    UnsupportedOperation,
)

CKR_OK = 0x000
CKR_CANT_LOCK = 0x00A
CKR_PIN_INCORRECT = 0x0A0
CKR_PIN_LOCKED = 0x0A4
CKR_SESSION_HANDLE_INVALID = 0x0B3
CKR_USER_ALREADY_LOGGED_IN = 0x100
CKR_USER_NOT_LOGGED_IN = 0x101
CKR_CRYPTOKI_NOT_INITIALIZED = 0x190
CKR_CRYPTOKI_ALREADY_INITIALIZED = 0x191
CKR_VENDOR_DEFINED = 0x80000000

CKR_NAMES: dict[int, str] = {
    0x000: "CKR_OK",
    0x001: "CKR_CANCEL",
    0x002: "CKR_HOST_MEMORY",
    0x003: "CKR_SLOT_ID_INVALID",
    0x005: "CKR_GENERAL_ERROR",
    0x006: "CKR_FUNCTION_FAILED",
    0x007: "CKR_ARGUMENTS_BAD",
    0x008: "CKR_NO_EVENT",
    0x009: "CKR_NEED_TO_CREATE_THREADS",
    0x00A: "CKR_CANT_LOCK",
    0x010: "CKR_ATTRIBUTE_READ_ONLY",
    0x011: "CKR_ATTRIBUTE_SENSITIVE",
    0x012: "CKR_ATTRIBUTE_TYPE_INVALID",
    0x013: "CKR_ATTRIBUTE_VALUE_INVALID",
    0x01B: "CKR_ACTION_PROHIBITED",
    0x020: "CKR_DATA_INVALID",
    0x021: "CKR_DATA_LEN_RANGE",
    0x030: "CKR_DEVICE_ERROR",
    0x031: "CKR_DEVICE_MEMORY",
    0x032: "CKR_DEVICE_REMOVED",
    0x040: "CKR_ENCRYPTED_DATA_INVALID",
    0x041: "CKR_ENCRYPTED_DATA_LEN_RANGE",
    0x042: "CKR_AEAD_DECRYPT_FAILED",
    0x050: "CKR_FUNCTION_CANCELED",
    0x051: "CKR_FUNCTION_NOT_PARALLEL",
    0x054: "CKR_FUNCTION_NOT_SUPPORTED",
    0x060: "CKR_KEY_HANDLE_INVALID",
    0x062: "CKR_KEY_SIZE_RANGE",
    0x063: "CKR_KEY_TYPE_INCONSISTENT",
    0x064: "CKR_KEY_NOT_NEEDED",
    0x065: "CKR_KEY_CHANGED",
    0x066: "CKR_KEY_NEEDED",
    0x067: "CKR_KEY_INDIGESTIBLE",
    0x068: "CKR_KEY_FUNCTION_NOT_PERMITTED",
    0x069: "CKR_KEY_NOT_WRAPPABLE",
    0x06A: "CKR_KEY_UNEXTRACTABLE",
    0x070: "CKR_MECHANISM_INVALID",
    0x071: "CKR_MECHANISM_PARAM_INVALID",
    0x082: "CKR_OBJECT_HANDLE_INVALID",
    0x090: "CKR_OPERATION_ACTIVE",
    0x091: "CKR_OPERATION_NOT_INITIALIZED",
    0x0A0: "CKR_PIN_INCORRECT",
    0x0A1: "CKR_PIN_INVALID",
    0x0A2: "CKR_PIN_LEN_RANGE",
    0x0A3: "CKR_PIN_EXPIRED",
    0x0A4: "CKR_PIN_LOCKED",
    0x0B0: "CKR_SESSION_CLOSED",
    0x0B1: "CKR_SESSION_COUNT",
    0x0B3: "CKR_SESSION_HANDLE_INVALID",
    0x0B4: "CKR_SESSION_PARALLEL_NOT_SUPPORTED",
    0x0B5: "CKR_SESSION_READ_ONLY",
    0x0B6: "CKR_SESSION_EXISTS",
    0x0B7: "CKR_SESSION_READ_ONLY_EXISTS",
    0x0B8: "CKR_SESSION_READ_WRITE_SO_EXISTS",
    0x0C0: "CKR_SIGNATURE_INVALID",
    0x0C1: "CKR_SIGNATURE_LEN_RANGE",
    0x0D0: "CKR_TEMPLATE_INCOMPLETE",
    0x0D1: "CKR_TEMPLATE_INCONSISTENT",
    0x0E0: "CKR_TOKEN_NOT_PRESENT",
    0x0E1: "CKR_TOKEN_NOT_RECOGNIZED",
    0x0E2: "CKR_TOKEN_WRITE_PROTECTED",
    0x0F0: "CKR_UNWRAPPING_KEY_HANDLE_INVALID",
    0x0F1: "CKR_UNWRAPPING_KEY_SIZE_RANGE",
    0x0F2: "CKR_UNWRAPPING_KEY_TYPE_INCONSISTENT",
    0x100: "CKR_USER_ALREADY_LOGGED_IN",
    0x101: "CKR_USER_NOT_LOGGED_IN",
    0x102: "CKR_USER_PIN_NOT_INITIALIZED",
    0x103: "CKR_USER_TYPE_INVALID",
    0x104: "CKR_USER_ANOTHER_ALREADY_LOGGED_IN",
    0x105: "CKR_USER_TOO_MANY_TYPES",
    0x110: "CKR_WRAPPED_KEY_INVALID",
    0x112: "CKR_WRAPPED_KEY_LEN_RANGE",
    0x113: "CKR_WRAPPING_KEY_HANDLE_INVALID",
    0x114: "CKR_WRAPPING_KEY_SIZE_RANGE",
    0x115: "CKR_WRAPPING_KEY_TYPE_INCONSISTENT",
    0x120: "CKR_RANDOM_SEED_NOT_SUPPORTED",
    0x121: "CKR_RANDOM_NO_RNG",
    0x130: "CKR_DOMAIN_PARAMS_INVALID",
    0x140: "CKR_CURVE_NOT_SUPPORTED",
    0x150: "CKR_BUFFER_TOO_SMALL",
    0x160: "CKR_SAVED_STATE_INVALID",
    0x170: "CKR_INFORMATION_SENSITIVE",
    0x180: "CKR_STATE_UNSAVEABLE",
    0x190: "CKR_CRYPTOKI_NOT_INITIALIZED",
    0x191: "CKR_CRYPTOKI_ALREADY_INITIALIZED",
    0x1A0: "CKR_MUTEX_BAD",
    0x1A1: "CKR_MUTEX_NOT_LOCKED",
    0x1B0: "CKR_NEW_PIN_MODE",
    0x1B1: "CKR_NEXT_OTP",
    0x1B5: "CKR_EXCEEDED_MAX_ITERATIONS",
    0x1B6: "CKR_FIPS_SELF_TEST_FAILED",
    0x1B7: "CKR_LIBRARY_LOAD_FAILED",
    0x1B8: "CKR_PIN_TOO_WEAK",
    0x1B9: "CKR_PUBLIC_KEY_INVALID",
    0x200: "CKR_FUNCTION_REJECTED",
    0x201: "CKR_TOKEN_RESOURCE_EXCEEDED",
    0x202: "CKR_OPERATION_CANCEL_FAILED",
}

# python-pkcs11 exception class name -> the CKR code it stands for. Names that
# python-pkcs11 raises on its own (no CKR behind them) map to pseudo codes.
_EXCEPTION_CKR: dict[str, str] = {
    "AnotherUserAlreadyLoggedIn": "CKR_USER_ANOTHER_ALREADY_LOGGED_IN",
    "AttributeTypeInvalid": "CKR_ATTRIBUTE_TYPE_INVALID",
    "AttributeValueInvalid": "CKR_ATTRIBUTE_VALUE_INVALID",
    "AttributeReadOnly": "CKR_ATTRIBUTE_READ_ONLY",
    "AttributeSensitive": "CKR_ATTRIBUTE_SENSITIVE",
    "ArgumentsBad": "CKR_ARGUMENTS_BAD",
    "DataInvalid": "CKR_DATA_INVALID",
    "DataLenRange": "CKR_DATA_LEN_RANGE",
    "DomainParamsInvalid": "CKR_DOMAIN_PARAMS_INVALID",
    "DeviceError": "CKR_DEVICE_ERROR",
    "DeviceMemory": "CKR_DEVICE_MEMORY",
    "DeviceRemoved": "CKR_DEVICE_REMOVED",
    "EncryptedDataInvalid": "CKR_ENCRYPTED_DATA_INVALID",
    "EncryptedDataLenRange": "CKR_ENCRYPTED_DATA_LEN_RANGE",
    "ExceededMaxIterations": "CKR_EXCEEDED_MAX_ITERATIONS",
    "FunctionCancelled": "CKR_FUNCTION_CANCELED",
    "FunctionFailed": "CKR_FUNCTION_FAILED",
    "FunctionRejected": "CKR_FUNCTION_REJECTED",
    "FunctionNotSupported": "CKR_FUNCTION_NOT_SUPPORTED",
    "KeyHandleInvalid": "CKR_KEY_HANDLE_INVALID",
    "KeyIndigestible": "CKR_KEY_INDIGESTIBLE",
    "KeyNeeded": "CKR_KEY_NEEDED",
    "KeyNotNeeded": "CKR_KEY_NOT_NEEDED",
    "KeyNotWrappable": "CKR_KEY_NOT_WRAPPABLE",
    "KeySizeRange": "CKR_KEY_SIZE_RANGE",
    "KeyTypeInconsistent": "CKR_KEY_TYPE_INCONSISTENT",
    "KeyUnextractable": "CKR_KEY_UNEXTRACTABLE",
    "GeneralError": "CKR_GENERAL_ERROR",
    "HostMemory": "CKR_HOST_MEMORY",
    "MechanismInvalid": "CKR_MECHANISM_INVALID",
    "MechanismParamInvalid": "CKR_MECHANISM_PARAM_INVALID",
    "NoEvent": "CKR_NO_EVENT",
    "ObjectHandleInvalid": "CKR_OBJECT_HANDLE_INVALID",
    "OperationActive": "CKR_OPERATION_ACTIVE",
    "OperationNotInitialized": "CKR_OPERATION_NOT_INITIALIZED",
    "PinExpired": "CKR_PIN_EXPIRED",
    "PinIncorrect": "CKR_PIN_INCORRECT",
    "PinInvalid": "CKR_PIN_INVALID",
    "PinLenRange": "CKR_PIN_LEN_RANGE",
    "PinLocked": "CKR_PIN_LOCKED",
    "PinTooWeak": "CKR_PIN_TOO_WEAK",
    "PublicKeyInvalid": "CKR_PUBLIC_KEY_INVALID",
    "RandomNoRNG": "CKR_RANDOM_NO_RNG",
    "RandomSeedNotSupported": "CKR_RANDOM_SEED_NOT_SUPPORTED",
    "SessionClosed": "CKR_SESSION_CLOSED",
    "SessionCount": "CKR_SESSION_COUNT",
    "SessionExists": "CKR_SESSION_EXISTS",
    "SessionHandleInvalid": "CKR_SESSION_HANDLE_INVALID",
    "SessionReadOnly": "CKR_SESSION_READ_ONLY",
    "SessionReadOnlyExists": "CKR_SESSION_READ_ONLY_EXISTS",
    "SessionReadWriteSOExists": "CKR_SESSION_READ_WRITE_SO_EXISTS",
    "SignatureLenRange": "CKR_SIGNATURE_LEN_RANGE",
    "SignatureInvalid": "CKR_SIGNATURE_INVALID",
    "SlotIDInvalid": "CKR_SLOT_ID_INVALID",
    "TemplateIncomplete": "CKR_TEMPLATE_INCOMPLETE",
    "TemplateInconsistent": "CKR_TEMPLATE_INCONSISTENT",
    "TokenNotPresent": "CKR_TOKEN_NOT_PRESENT",
    "TokenNotRecognised": "CKR_TOKEN_NOT_RECOGNIZED",
    "TokenWriteProtected": "CKR_TOKEN_WRITE_PROTECTED",
    "UnwrappingKeyHandleInvalid": "CKR_UNWRAPPING_KEY_HANDLE_INVALID",
    "UnwrappingKeySizeRange": "CKR_UNWRAPPING_KEY_SIZE_RANGE",
    "UnwrappingKeyTypeInconsistent": "CKR_UNWRAPPING_KEY_TYPE_INCONSISTENT",
    "UserAlreadyLoggedIn": "CKR_USER_ALREADY_LOGGED_IN",
    "UserNotLoggedIn": "CKR_USER_NOT_LOGGED_IN",
    "UserPinNotInitialized": "CKR_USER_PIN_NOT_INITIALIZED",
    "UserTooManyTypes": "CKR_USER_TOO_MANY_TYPES",
    "WrappedKeyInvalid": "CKR_WRAPPED_KEY_INVALID",
    "WrappedKeyLenRange": "CKR_WRAPPED_KEY_LEN_RANGE",
    "WrappingKeyHandleInvalid": "CKR_WRAPPING_KEY_HANDLE_INVALID",
    "WrappingKeySizeRange": "CKR_WRAPPING_KEY_SIZE_RANGE",
    "WrappingKeyTypeInconsistent": "CKR_WRAPPING_KEY_TYPE_INCONSISTENT",
    # Raised by python-pkcs11 itself, not by the module:
    "NoSuchKey": "NO_SUCH_OBJECT",
    "MultipleObjectsReturned": "MULTIPLE_OBJECTS",
    "NoSuchToken": "NO_SUCH_TOKEN",
    "MultipleTokensReturned": "MULTIPLE_TOKENS",
}

# python-pkcs11 raises plain PKCS11Error with these texts for a few codes.
_MESSAGE_CKR: tuple[tuple[str, str], ...] = (
    ("not initialized", "CKR_CRYPTOKI_NOT_INITIALIZED"),
    ("already initialized", "CKR_CRYPTOKI_ALREADY_INITIALIZED"),
    ("Buffer was too small", "CKR_BUFFER_TOO_SMALL"),
    ("Parallel not supported", "CKR_SESSION_PARALLEL_NOT_SUPPORTED"),
    ("User type invalid", "CKR_USER_TYPE_INVALID"),
    ("exception while loading", "CKR_LIBRARY_LOAD_FAILED"),
)
_UNMAPPED = re.compile(r"Unmapped error code (0x[0-9a-fA-F]+)")


@dataclass(frozen=True)
class _Rule:
    kind: type[HsmError]
    meaning: str
    advice: str


_RELOGIN = "anyhsm reconnects by itself; if this persists, check the token and its module"
_PIN_ADVICE = (
    "check the PIN in ANYHSM_PKCS11_PIN or the pin_file; every wrong attempt counts "
    "towards the token's lockout"
)
_UNSUPPORTED = "this token or its module does not offer it; see docs/pkcs11/ for your device"

_RULES: dict[str, _Rule] = {
    # --- the PIN ---------------------------------------------------------------
    "CKR_PIN_INCORRECT": _Rule(PinRejected, "the PIN was rejected by the token", _PIN_ADVICE),
    "CKR_PIN_INVALID": _Rule(
        PinRejected, "the PIN was rejected by the token (invalid characters)", _PIN_ADVICE
    ),
    "CKR_PIN_LEN_RANGE": _Rule(
        PinRejected, "the PIN was rejected by the token (wrong length)", _PIN_ADVICE
    ),
    "CKR_PIN_LOCKED": _Rule(
        PinLocked,
        "the user PIN is locked after too many wrong attempts",
        "unblock it with the security officer (SO) PIN using the vendor's tool "
        "(for SoftHSM2: softhsm2-util / pkcs11-tool --init-pin), then fix the configured PIN",
    ),
    "CKR_PIN_EXPIRED": _Rule(
        AuthenticationFailed,
        "the user PIN has expired",
        "set a new PIN with the vendor's tool, then update ANYHSM_PKCS11_PIN or the pin_file",
    ),
    "CKR_USER_PIN_NOT_INITIALIZED": _Rule(
        ProviderUnavailable,
        "the token has no user PIN yet",
        "initialise the user PIN with the vendor's tool (pkcs11-tool --init-pin)",
    ),
    "CKR_USER_ANOTHER_ALREADY_LOGGED_IN": _Rule(
        ProviderUnavailable,
        "another user (the security officer) is logged in to the token in this process",
        "close the SO session first",
    ),
    "CKR_USER_TOO_MANY_TYPES": _Rule(
        ProviderUnavailable,
        "the token refuses another kind of user login right now",
        "close other applications' SO sessions on this token",
    ),
    "CKR_USER_NOT_LOGGED_IN": _Rule(ProviderUnavailable, "the login was lost", _RELOGIN),
    # --- the token and the module ---------------------------------------------------
    "CKR_TOKEN_NOT_PRESENT": _Rule(
        ProviderUnavailable,
        "the token is not present in its slot",
        "insert or reconnect the token; anyhsm reconnects when it is back",
    ),
    "CKR_DEVICE_REMOVED": _Rule(
        ProviderUnavailable,
        "the token was removed during the operation",
        "reconnect the token; anyhsm reconnects when it is back",
    ),
    "CKR_TOKEN_NOT_RECOGNIZED": _Rule(
        ProviderUnavailable, "the module does not recognise the token", _UNSUPPORTED
    ),
    "CKR_SLOT_ID_INVALID": _Rule(ProviderUnavailable, "the slot disappeared", _RELOGIN),
    "CKR_DEVICE_ERROR": _Rule(ProviderUnavailable, "the device reported an error", _RELOGIN),
    "CKR_GENERAL_ERROR": _Rule(
        ProviderUnavailable,
        "the module reported an unrecoverable error",
        "the token may have gone away; anyhsm reconnects when it is back",
    ),
    "CKR_SESSION_HANDLE_INVALID": _Rule(ProviderUnavailable, "the session was lost", _RELOGIN),
    "CKR_SESSION_CLOSED": _Rule(ProviderUnavailable, "the session was closed", _RELOGIN),
    "CKR_SESSION_COUNT": _Rule(
        ProviderUnavailable,
        "the token refuses more sessions",
        "lower pool_size, or close other applications using the token",
    ),
    "CKR_CRYPTOKI_NOT_INITIALIZED": _Rule(
        ProviderUnavailable, "the module was finalised underneath anyhsm", _RELOGIN
    ),
    "CKR_CRYPTOKI_ALREADY_INITIALIZED": _Rule(
        ProviderError,
        "the module was already initialised by other code in this process",
        "let anyhsm own the module, or do not finalise it elsewhere",
    ),
    "CKR_LIBRARY_LOAD_FAILED": _Rule(
        ProviderUnavailable,
        "the PKCS#11 module could not be loaded",
        "check the module path and that its dependencies are installed (ldd MODULE)",
    ),
    "CKR_FIPS_SELF_TEST_FAILED": _Rule(
        ProviderUnavailable, "the module failed its FIPS self test", "contact the HSM vendor"
    ),
    "CKR_CANT_LOCK": _Rule(
        ProviderError,
        "the module cannot use OS locking",
        "set threadsafe_module = false (calls are then serialised)",
    ),
    "CKR_TOKEN_WRITE_PROTECTED": _Rule(
        ProviderError,
        "the token is write-protected",
        "use a token (or partition) that allows key generation",
    ),
    "CKR_SESSION_READ_ONLY": _Rule(
        ProviderError, "the session is read-only", "the token does not allow writing objects"
    ),
    "CKR_DEVICE_MEMORY": _Rule(
        ProviderError, "the token is out of memory", "delete unused objects from the token"
    ),
    "CKR_TOKEN_RESOURCE_EXCEEDED": _Rule(
        ProviderError, "the token is out of resources", "delete unused objects from the token"
    ),
    "CKR_HOST_MEMORY": _Rule(ProviderError, "the host ran out of memory", "free memory"),
    "CKR_FUNCTION_FAILED": _Rule(
        ProviderError, "the token could not perform the function", _RELOGIN
    ),
    # --- mechanisms and curves ----------------------------------------------------
    "CKR_MECHANISM_INVALID": _Rule(
        UnsupportedOperation, "the mechanism is not supported", _UNSUPPORTED
    ),
    "CKR_MECHANISM_PARAM_INVALID": _Rule(
        UnsupportedOperation, "the mechanism parameters are not supported", _UNSUPPORTED
    ),
    "CKR_CURVE_NOT_SUPPORTED": _Rule(
        UnsupportedOperation, "the curve secp256k1 is not supported", _UNSUPPORTED
    ),
    "CKR_DOMAIN_PARAMS_INVALID": _Rule(
        UnsupportedOperation,
        "the EC domain parameters (curve secp256k1) are not supported",
        _UNSUPPORTED,
    ),
    "CKR_FUNCTION_NOT_SUPPORTED": _Rule(
        UnsupportedOperation, "the module does not implement the function", _UNSUPPORTED
    ),
    "CKR_KEY_TYPE_INCONSISTENT": _Rule(
        UnsupportedOperation, "the key type does not fit the mechanism", _UNSUPPORTED
    ),
    "CKR_KEY_FUNCTION_NOT_PERMITTED": _Rule(
        UnsupportedOperation,
        "the key's attributes do not permit this operation",
        "check the key was made for this use (CKA_SIGN, CKA_ENCRYPT, ...)",
    ),
    # --- objects -----------------------------------------------------------------
    "CKR_OBJECT_HANDLE_INVALID": _Rule(KeyNotFound, "the key object is gone", "list the keys"),
    "CKR_KEY_HANDLE_INVALID": _Rule(KeyNotFound, "the key object is gone", "list the keys"),
    "NO_SUCH_OBJECT": _Rule(KeyNotFound, "no such object on the token", "list the keys"),
    "MULTIPLE_OBJECTS": _Rule(
        ProviderError,
        "several objects on the token match",
        "refer to the key by its id instead of its label",
    ),
    "NO_SUCH_TOKEN": _Rule(
        ProviderUnavailable,
        "no token matches the configured token_label / token_serial",
        "check the token is initialised and the selection in the config",
    ),
    "MULTIPLE_TOKENS": _Rule(
        ProviderError,
        "several tokens match the configured selection",
        "select the token by token_serial",
    ),
    "CKR_TEMPLATE_INCONSISTENT": _Rule(
        ProviderError,
        "the token refused the object's attributes",
        "the token may not support sensitive non-extractable secp256k1 token keys; "
        "see docs/pkcs11/ for your device",
    ),
    "CKR_TEMPLATE_INCOMPLETE": _Rule(
        ProviderError,
        "the token wants more object attributes",
        "see docs/pkcs11/ for your device",
    ),
    "CKR_ATTRIBUTE_VALUE_INVALID": _Rule(
        ProviderError,
        "the token refused an attribute value",
        "see docs/pkcs11/ for your device",
    ),
    "CKR_ATTRIBUTE_TYPE_INVALID": _Rule(
        ProviderError,
        "the token does not know an attribute anyhsm uses",
        "see docs/pkcs11/ for your device",
    ),
}

_DEFAULT_ADVICE = "see docs/pkcs11/README.md (error table) and the module's own log"

# Failures after which the connection (sessions, login) must be rebuilt.
_CONNECTION_LOST = frozenset(
    {
        "CKR_SESSION_HANDLE_INVALID",
        "CKR_SESSION_CLOSED",
        "CKR_USER_NOT_LOGGED_IN",
        "CKR_DEVICE_REMOVED",
        "CKR_TOKEN_NOT_PRESENT",
        "CKR_TOKEN_NOT_RECOGNIZED",
        "CKR_DEVICE_ERROR",
        "CKR_GENERAL_ERROR",
        "CKR_SLOT_ID_INVALID",
        "CKR_CRYPTOKI_NOT_INITIALIZED",
    }
)
# Of those, the ones meaning the session handles are already closed (so they may
# have been reused by other sessions and must not be closed again).
_HANDLES_GONE = frozenset(
    {"CKR_SESSION_HANDLE_INVALID", "CKR_SESSION_CLOSED", "CKR_CRYPTOKI_NOT_INITIALIZED"}
)
_STALE_OBJECT = frozenset({"CKR_OBJECT_HANDLE_INVALID", "CKR_KEY_HANDLE_INVALID"})


def rv_name(rv: int) -> str:
    """``CKR_*`` name of a raw return value (vendor codes shown in hex)."""
    name = CKR_NAMES.get(rv)
    if name is not None:
        return name
    if rv >= CKR_VENDOR_DEFINED:
        return f"CKR_VENDOR_DEFINED+{rv - CKR_VENDOR_DEFINED:#x}"
    return f"CKR_{rv:#x}"


def ckr_name(exc: BaseException) -> str:
    """``CKR_*`` name (or pseudo code) behind a python-pkcs11 exception."""
    name = _EXCEPTION_CKR.get(type(exc).__name__)
    if name is not None:
        return name
    text = str(exc)
    match = _UNMAPPED.search(text)
    if match:
        return rv_name(int(match.group(1), 16))
    for needle, code in _MESSAGE_CKR:
        if needle in text:
            return code
    return "CKR_UNKNOWN"


def _build(
    code: str, action: str, provider: str, detail: str | None, extra_hint: str | None
) -> HsmError:
    rule = _RULES.get(code)
    kind: type[HsmError] = rule.kind if rule else ProviderError
    meaning = rule.meaning if rule else "the PKCS#11 module reported a failure"
    advice = rule.advice if rule else _DEFAULT_ADVICE
    if extra_hint:
        advice = f"{extra_hint}; {advice}"
    if kind is UnsupportedOperation:
        return UnsupportedOperation(provider, f"{action}: {meaning} ({code})", hint=advice)
    message = f"PKCS#11 {action} failed: {meaning} ({code})"
    if detail:
        message = f"{message}: {detail}"
    return kind(message, hint=advice)


def translate(
    exc: BaseException, action: str, *, provider: str = "pkcs11", hint: str | None = None
) -> HsmError:
    """Typed anyhsm error for a python-pkcs11 exception raised while doing ``action``."""
    code = ckr_name(exc)
    detail = None
    if code == "CKR_UNKNOWN" or code == "CKR_LIBRARY_LOAD_FAILED":
        detail = str(exc) or type(exc).__name__
    return _build(code, action, provider, detail, hint)


def translate_rv(
    rv: int, action: str, *, provider: str = "pkcs11", hint: str | None = None
) -> HsmError:
    """Typed anyhsm error for a raw ``CK_RV`` returned by a direct module call."""
    return _build(rv_name(rv), action, provider, None, hint)


def connection_lost(exc: BaseException) -> bool:
    """Whether the failure means sessions/login must be rebuilt (then retried)."""
    return ckr_name(exc) in _CONNECTION_LOST


def handles_gone(exc: BaseException) -> bool:
    """Whether the module already closed the sessions (their handles may be reused)."""
    return ckr_name(exc) in _HANDLES_GONE


def stale_object(exc: BaseException) -> bool:
    """Whether a cached object handle went stale (key deleted, or login lost)."""
    return ckr_name(exc) in _STALE_OBJECT


def error_table() -> list[tuple[str, str, str, str]]:
    """(CKR name, anyhsm error class, meaning, advice) rows, for the documentation."""
    return [
        (code, rule.kind.__name__, rule.meaning, rule.advice)
        for code, rule in sorted(_RULES.items())
    ]
