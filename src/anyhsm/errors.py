"""The one error hierarchy of anyhsm.

Every error anyhsm raises derives from :class:`HsmError`. Each class carries a
stable string ``code`` (for ``--json`` output and programs that branch on it)
and a process ``exit_code`` used by the CLI. Messages say what failed and what
to do; they never contain secret material.
"""

from __future__ import annotations


class HsmError(Exception):
    """Root of every anyhsm error."""

    code: str = "hsm_error"
    exit_code: int = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        self.details: list[dict[str, object]] = []
        super().__init__(message if hint is None else f"{message} ({hint})")

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready description: stable code, class name, message, hint, details."""
        out: dict[str, object] = {
            "code": self.code,
            "error": type(self).__name__,
            "message": self.message,
        }
        if self.hint:
            out["hint"] = self.hint
        if self.details:
            out["details"] = self.details
        return out


# --- configuration -----------------------------------------------------------


class ConfigError(HsmError):
    """The configuration is missing, malformed or unsafe for its environment."""

    code = "config_error"
    exit_code = 3

    def __init__(
        self, message: str, *, hint: str | None = None, problems: list[str] | None = None
    ) -> None:
        super().__init__(message, hint=hint)
        self.problems = list(problems or [])


class SecretFileExposed(ConfigError):
    """A secret file (passphrase, PIN, BIP39 passphrase, imported key) that group or
    others may access, refused outside development: anyone on the host could read it."""

    code = "secret_file_exposed"


class SecretOnCommandLine(HsmError):
    """A secret was given as a command-line argument, which every local user can read
    (``/proc/PID/cmdline``, ``ps``) and shells keep in their history."""

    code = "secret_on_command_line"
    exit_code = 2


class UsageError(HsmError):
    """The command line does not parse (unknown option or command, missing or malformed
    argument); the CLI reports it like every other error, JSON included."""

    code = "usage_error"
    exit_code = 2


# --- providers ---------------------------------------------------------------


class ProviderError(HsmError):
    """A provider (backend) failed."""

    code = "provider_error"
    exit_code = 4


class ProviderUnavailable(ProviderError):
    """A provider cannot be reached, or the key's provider is not open."""

    code = "provider_unavailable"


class ProviderTimeout(ProviderUnavailable):
    """A provider did not answer within its time bound."""

    code = "provider_timeout"


class ProviderNotInstalled(ProviderUnavailable):
    """The optional backend package for a provider is not installed."""

    code = "provider_not_installed"


class UnsupportedOperation(ProviderError):
    """The provider cannot do what was asked (checked before any work is done)."""

    code = "unsupported_operation"

    def __init__(self, provider: str, capability: str, *, hint: str | None = None) -> None:
        self.provider = provider
        self.capability = capability
        super().__init__(
            f"provider {provider!r} does not support {capability}",
            hint=hint or "use a key held by a provider that declares this capability",
        )


class AuthenticationFailed(ProviderError):
    """A PIN, passphrase or other credential was rejected."""

    code = "authentication_failed"
    exit_code = 5


class PinRejected(AuthenticationFailed):
    """The PKCS#11 token rejected the PIN."""

    code = "pin_rejected"


class PinLocked(AuthenticationFailed):
    """The PKCS#11 token's PIN is locked after too many wrong attempts."""

    code = "pin_locked"


class PinMissing(AuthenticationFailed):
    """No PKCS#11 PIN: none given by the caller, no ``pin_file``, no
    ``ANYHSM_PKCS11_PIN``. An authentication failure like a wrong PIN (exit 5), not a
    configuration error: the configuration may be right and the operator simply has not
    given the PIN yet."""

    code = "pin_missing"


# --- keystore ----------------------------------------------------------------


class KeystoreError(HsmError):
    """The encrypted software keystore failed."""

    code = "keystore_error"
    exit_code = 8


class WrongPassphrase(KeystoreError, AuthenticationFailed):
    """The passphrase does not open the keystore."""

    code = "wrong_passphrase"
    exit_code = 5


class KeystoreCorrupted(KeystoreError):
    """A keystore file is unreadable (truncated, not JSON, bad checksum)."""

    code = "keystore_corrupted"


class KeystoreTampered(KeystoreError):
    """A keystore record failed authentication: it was edited, swapped or forged."""

    code = "keystore_tampered"


class UnsupportedFormatVersion(KeystoreError):
    """A file was written by a newer (or unknown) format version."""

    code = "unsupported_format_version"


class KeystoreNotFound(KeystoreError):
    """No keystore exists at the configured path."""

    code = "keystore_not_found"
    exit_code = 3


class KeystoreExists(KeystoreError):
    """A keystore already exists where a new one was to be created."""

    code = "keystore_exists"


class LockTimeout(KeystoreError):
    """Another process held the keystore lock for too long. Its own exit status (10):
    nothing is damaged, and a retry once the holder (``holder_pid``, when known) has
    finished usually succeeds."""

    code = "lock_timeout"
    exit_code = 10

    def __init__(
        self, message: str, *, holder_pid: int | None = None, hint: str | None = None
    ) -> None:
        super().__init__(message, hint=hint)
        self.holder_pid = holder_pid


class AnchorMissing(KeystoreError):
    """The anchor of the keystore's generation (a TPM NV counter) no longer exists:
    the TPM was cleared or replaced, or the index was undefined."""

    code = "anchor_missing"
    exit_code = 8


class AnchorMismatch(KeystoreError):
    """The anchor exists but is not what the keystore recorded: another kind of NV
    index at that handle, other attributes or size, or a counter that cannot be it."""

    code = "anchor_mismatch"
    exit_code = 8


class KeystoreRolledBack(KeystoreError):
    """The keystore is older than its anchored generation: the directory (or part of
    it) was put back from an earlier copy."""

    code = "keystore_rolled_back"
    exit_code = 8

    def __init__(
        self,
        message: str,
        *,
        store_generation: int | None = None,
        anchor_generation: int | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.store_generation = store_generation
        self.anchor_generation = anchor_generation


class RecordNotInManifest(KeystoreTampered):
    """A key record is not in the authenticated manifest of live records (a deleted key's
    record restored, a record of another generation, or one listed but missing)."""

    code = "record_not_in_manifest"


class ManifestMissing(KeystoreTampered):
    """The keystore's manifest (its authenticated list of live records and audit state)
    is gone: without it nothing in the directory can be trusted to be current."""

    code = "manifest_missing"


class KeystoreRotated(KeystoreError):
    """Another process re-encrypted the keystore under a new master key: this handle holds
    the retired one and must reopen."""

    code = "keystore_rotated"


# --- keys ----------------------------------------------------------------------


class HsmKeyError(HsmError):
    """Base for key-level problems (named so that it never hides the built-in KeyError)."""

    code = "key_error"
    exit_code = 6


class KeyNotFound(HsmKeyError):
    """No key with that id or label."""

    code = "key_not_found"


class KeyExists(HsmKeyError):
    """A key with that label already exists."""

    code = "key_exists"


class ExportNotAllowed(HsmKeyError):
    """Export was asked for a key or provider that forbids it."""

    code = "export_not_allowed"
    exit_code = 7


class InvalidKeyMaterial(HsmKeyError):
    """Imported key material is malformed or out of range."""

    code = "invalid_key_material"


class KeyNotInDirectory(KeyNotFound):
    """A token holds an object under that label or id, but the key directory (the
    keystore) has no record of it: another application, or anyone with the user PIN,
    may have planted it, so anyhsm never uses it."""

    code = "key_not_in_directory"


class KeyLabelConflict(HsmKeyError):
    """One label names keys in two stores (or two objects in one): anyhsm refuses to
    pick one. The key's id still resolves, through the key directory only."""

    code = "key_label_conflict"


class KeyBindingMismatch(HsmKeyError):
    """The store that answered for a key is not the one its directory record binds
    (token serial), or returned another public key: nothing is signed."""

    code = "key_binding_mismatch"
    exit_code = 8


class InvalidDigest(HsmError):
    """A digest to sign is not exactly 32 bytes."""

    code = "invalid_digest"
    exit_code = 2


class SigningFailed(ProviderError):
    """The provider returned no usable signature."""

    code = "signing_failed"


# --- policy ----------------------------------------------------------------------


class PolicyViolation(HsmError):
    """The security policy refused an operation. ``rules``: the names of the rules that
    refused (in JSON always a list; taken from ``details[*]["rule"]`` when not given)."""

    code = "policy_violation"
    exit_code = 7
    _rules: tuple[str, ...] = ()  # also for an instance made without __init__ (a client's)

    def __init__(
        self, message: str, *, hint: str | None = None, rules: tuple[str, ...] | list[str] = ()
    ) -> None:
        super().__init__(message, hint=hint)
        self._rules = tuple(rules)

    @property
    def rules(self) -> list[str]:
        """The refusing rules' names, each once, in order."""
        if self._rules:
            return list(dict.fromkeys(self._rules))
        named = (d.get("rule") for d in self.details)
        return list(dict.fromkeys(str(r) for r in named if r))

    def to_dict(self) -> dict[str, object]:
        out = super().to_dict()
        out["rules"] = self.rules
        return out


class SecurityLevelTooLow(PolicyViolation):
    """No provider at or above the minimum security level could be opened."""

    code = "security_level_too_low"


class NetworkMismatch(PolicyViolation):
    """An address, key or PSBT belongs to another network than the configured one."""

    code = "network_mismatch"


class EnrolmentOnlyHandle(PolicyViolation):
    """A key operation on a handle opened only to enrol an unlock path (TPM, token wrap)
    below the security floor: such a handle never signs, creates, imports or exports."""

    code = "enrolment_only_handle"


class AllProvidersFailed(ProviderUnavailable):
    """Every provider in the fallback chain failed to open."""

    code = "all_providers_failed"


# --- audit -----------------------------------------------------------------------


class AuditError(HsmError):
    """The audit log cannot be written or read."""

    code = "audit_error"
    exit_code = 8


class AuditWriteFailed(AuditError):
    """An audit entry could not be written; the operation was not performed."""

    code = "audit_write_failed"


class AuditTampered(AuditError):
    """The audit log's chain is broken (edited, deleted, reordered, inserted or truncated)."""

    code = "audit_tampered"

    def __init__(self, message: str, *, line: int | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.line = line


AUDIT_RECOVERY_HINT = (
    "find out what happened to the log (restore it from its forwarded copy or a backup); "
    "if the loss is understood, start a new chain with "
    "'anyhsm audit recover --reason TEXT', which records what was lost"
)


class AuditStateMismatch(AuditError):
    """The audit log on disk is not the chain the keystore's authenticated state records
    (missing, shorter, swapped or replayed): nothing is appended until an operator acts."""

    code = "audit_state_mismatch"

    def __init__(self, message: str, *, hint: str | None = AUDIT_RECOVERY_HINT) -> None:
        super().__init__(message, hint=hint)


class AuditKeyRotated(AuditWriteFailed):
    """Another process rotated the audit key (master-key rotation): this handle's key is
    retired, so it must reopen before it can append."""

    code = "audit_key_rotated"


# --- Bitcoin -----------------------------------------------------------------------


class BitcoinError(HsmError):
    """Base for errors of the Bitcoin layer."""

    code = "bitcoin_error"
    exit_code = 2


class EncodingError(BitcoinError):
    """Base58Check, Bech32/Bech32m or compact-size data is malformed."""

    code = "encoding_error"


class TransactionError(BitcoinError):
    """A transaction is malformed."""

    code = "transaction_error"


class ScriptError(BitcoinError):
    """A script is malformed or of a kind that is not supported here."""

    code = "script_error"


class AddressError(BitcoinError):
    """An address is malformed or belongs to another network."""

    code = "address_error"


class Bip32Error(BitcoinError):
    """A BIP32 extended key or derivation path is invalid."""

    code = "bip32_error"


class MnemonicError(BitcoinError):
    """A BIP39 mnemonic is invalid (unknown word, wrong length, bad checksum)."""

    code = "mnemonic_error"


class DescriptorError(BitcoinError):
    """An output descriptor is malformed or has a wrong checksum."""

    code = "descriptor_error"


class MessageError(BitcoinError):
    """A signed message (BIP137 / BIP322) is malformed or does not verify."""

    code = "message_error"


class PsbtError(BitcoinError):
    """A PSBT is malformed; the message names the field that is wrong."""

    code = "psbt_error"

    def __init__(self, message: str, *, field: str | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.field = field


class PsbtLimitExceeded(PsbtError):
    """A PSBT is larger than the signer's resource limits allow (bytes, inputs, outputs,
    derivations, path depth, weight, legacy sighash work); refused before any key is
    derived or any signature made. ``field`` names the ``policy.*`` setting."""

    code = "psbt_limit_exceeded"


class SigningPolicyError(PolicyViolation):
    """The Bitcoin signing policy refused to sign (missing UTXO, absurd fee, sighash...)."""

    code = "signing_policy"


class SpendingPolicyRefused(SigningPolicyError):
    """The spending policy (``anyhsm policy``) refused a transaction: a rule's limit,
    allowlist, output shape, time window or approvals, a frozen key, or no rule for the
    key. ``rules`` names every refusing rule; nothing was signed or debited."""

    code = "spending_policy_refused"


class PolicyNotAuthenticated(PolicyViolation):
    """The spending policy or its state cannot be trusted: the policy file differs from
    the one ``anyhsm policy set`` recorded, its binding or the velocity state fails
    authentication or is missing. Nothing is signed until an admin step restores it."""

    code = "policy_not_authenticated"


class ApprovalRejected(PolicyViolation):
    """An approval submitted for the spending policy is not valid: its signature, its
    approver, its expiry, the transaction or policy version it names, or its reuse."""

    code = "approval_rejected"


class NothingSigned(BitcoinError):
    """No input of the PSBT could be signed with the keys available."""

    code = "nothing_signed"
    exit_code = 9


# --- the signing service (anyhsm serve) and its client --------------------------------------


class ServiceError(HsmError):
    """The signing service refused or could not serve a request for a reason of its own
    (not of the handle behind it): too many requests, too busy, too slow, unreachable.
    Its own exit status (11): nothing was signed that the caller was told of; retry
    later (``Retry-After`` says when)."""

    code = "service_error"
    exit_code = 11

    def __init__(
        self, message: str, *, hint: str | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message, hint=hint)
        self.retry_after = retry_after


class Unauthenticated(ServiceError):
    """No valid credentials: no ``Authorization: Bearer`` token, an unknown one, or a
    token used without the client certificate it is bound to. Nothing was done."""

    code = "unauthenticated"
    exit_code = 5


class Forbidden(ServiceError):
    """The client is authenticated but not allowed this operation or this key (its
    ``ops`` and ``keys`` in ``[[service.clients]]``). Nothing was done."""

    code = "forbidden"
    exit_code = 7


class InvalidRequest(ServiceError):
    """The request does not parse: not JSON, a member missing or of the wrong type, an
    unknown query parameter value. The HTTP form of a usage error."""

    code = "invalid_request"
    exit_code = 2


class RequestTooLarge(InvalidRequest):
    """The request body is larger than ``[service] max_body_bytes`` (or a batch longer
    than ``max_batch``)."""

    code = "request_too_large"


class EndpointNotFound(InvalidRequest):
    """No endpoint at that path."""

    code = "endpoint_not_found"


class MethodNotAllowed(InvalidRequest):
    """The endpoint exists but not with that HTTP method."""

    code = "method_not_allowed"


class IdempotencyConflict(InvalidRequest):
    """An ``Idempotency-Key`` already used by this client for another request (another
    path or body): the stored result is not returned and nothing is signed."""

    code = "idempotency_conflict"


class RateLimited(ServiceError):
    """The client's rate limit (``rate_limit_per_s``, ``rate_limit_burst``) is exhausted."""

    code = "rate_limited"


class ServiceBusy(ServiceError):
    """Every worker is busy and the queue is full (``max_concurrency``, ``max_pending``),
    or the service is shutting down."""

    code = "service_busy"


class RequestTimedOut(ServiceError):
    """The operation did not finish within ``request_timeout_ms``. It may still finish
    (its audit entry says so); with an ``Idempotency-Key`` a retry gets its result."""

    code = "request_timeout"


class ServiceUnreachable(ServiceError):
    """The client could not reach the service, or its answer was not the service's
    (connection refused or reset, TLS failure, a body that is not the API's JSON)."""

    code = "service_unreachable"


def error_class_for_code(code: str) -> type[HsmError]:
    """The error class whose stable ``code`` this is (any module that defines anyhsm
    errors and is imported); :class:`HsmError` for a code this version does not know.
    The inverse of ``cls.code``, for front ends that receive an error as JSON (the
    service's client, the CLI's JSON) and raise it again as its class."""
    found = _codes().get(code)
    return found if found is not None else HsmError


_CODES: dict[str, type[HsmError]] = {}


def _codes() -> dict[str, type[HsmError]]:
    if _CODES:
        return _CODES
    import anyhsm.bitcoin.sighash  # the modules that define errors outside this one
    import anyhsm.tpm.errors

    del anyhsm  # imported for their classes only
    pending: list[type[HsmError]] = [HsmError]
    while pending:
        cls = pending.pop()
        if cls.__module__.startswith("anyhsm.") and "code" in vars(cls):
            _CODES.setdefault(cls.code, cls)
        pending.extend(cls.__subclasses__())
    return _CODES
