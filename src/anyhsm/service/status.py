"""The one table from error class to HTTP status.

Every error the service answers with is an :class:`~anyhsm.errors.HsmError`, sent in the
CLI's JSON error shape (``{"error": {"code", "error", "message", "hint"?, "details"?}}``)
with the status of the most specific class listed here (the class's own entry, else its
nearest listed base). The rule of thumb: the request is wrong (4xx: the caller can fix
it), or the service or what is behind it cannot serve now (503, with ``Retry-After``:
retry later), or the deployment is damaged (500: an operator must act).
"""

from __future__ import annotations

from anyhsm import errors as e

STATUS: dict[type[e.HsmError], int] = {
    e.HsmError: 500,
    # configuration of the service's deployment: not the caller's fault
    e.ConfigError: 500,
    e.SecretOnCommandLine: 400,
    e.UsageError: 400,
    # providers: the service cannot serve now
    e.ProviderError: 502,
    e.ProviderUnavailable: 503,
    e.ProviderTimeout: 504,
    e.UnsupportedOperation: 422,
    e.AuthenticationFailed: 503,  # the service's own PIN/passphrase, not the caller's
    # keystore: damage or a busy lock
    e.KeystoreError: 500,
    e.LockTimeout: 503,
    e.KeystoreRotated: 503,
    # keys
    e.HsmKeyError: 422,
    e.KeyNotFound: 404,
    e.KeyExists: 409,
    e.KeyLabelConflict: 409,
    e.ExportNotAllowed: 403,
    e.KeyBindingMismatch: 500,
    e.InvalidDigest: 400,
    # policy
    e.PolicyViolation: 403,
    e.NetworkMismatch: 422,
    e.SecurityLevelTooLow: 503,
    e.EnrolmentOnlyHandle: 503,
    # audit: a request fails when it cannot be audited
    e.AuditError: 503,
    e.AuditTampered: 500,
    e.AuditStateMismatch: 500,
    # Bitcoin input
    e.BitcoinError: 400,
    e.PsbtLimitExceeded: 413,
    e.NothingSigned: 422,
    # the service itself
    e.ServiceError: 503,
    e.Unauthenticated: 401,
    e.Forbidden: 403,
    e.InvalidRequest: 400,
    e.RequestTooLarge: 413,
    e.EndpointNotFound: 404,
    e.MethodNotAllowed: 405,
    e.IdempotencyConflict: 422,
    e.RateLimited: 429,
    e.ServiceBusy: 503,
    e.RequestTimedOut: 504,
    e.ServiceUnreachable: 502,
}

RETRY_AFTER_S = 1
"""``Retry-After`` for a 503 that does not say otherwise."""


def status_for(error: e.HsmError) -> int:
    """The HTTP status of ``error``: its class's entry, else its nearest listed base."""
    for cls in type(error).__mro__:
        status = STATUS.get(cls)
        if status is not None:
            return status
    return 500


def retry_after(error: e.HsmError, status: int) -> int | None:
    """Seconds for ``Retry-After`` (429 and 503), else None."""
    if status not in (429, 503):
        return None
    given = error.retry_after if isinstance(error, e.ServiceError) else None
    return max(1, round(given)) if given is not None else RETRY_AFTER_S
